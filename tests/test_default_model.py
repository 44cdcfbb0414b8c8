"""The shipped default model, its card and the demo photo stay consistent."""
import hashlib

import cv2
import numpy as np
import torch

import models
from models.checkpoint import read_project_metadata

CARD = models.WEIGHTS_DIR / "MODEL_CARD.md"
DEMO = models.WEIGHTS_DIR.parent.parent / "runtime_py" / "demo"


def test_default_checkpoint_is_the_documented_fp16_tf_c32_model():
    path = models.DEFAULT_CHECKPOINT
    assert path.is_file() and path.stat().st_size < 30 * 2**20
    meta = read_project_metadata(path)
    assert meta["variant"] == "tf" and meta["cnum"] == 32 and meta["channel_order"] == "rgb"
    assert meta["weights_dtype"] == "float16"
    assert "NOT the official" in meta["description"]
    card = CARD.read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card  # card describes exactly these weights
    assert str(meta["extra"]["step"]) in card and "Telea" in card and "convert-checkpoint" in card


def test_default_model_reproduces_the_demo_photos_known_pixels():
    """The shipped weights load and behave like a trained model: on the demo photo at 96x128 the raw output
    matches the known (unmasked) pixels to 22.7 dB, where the reference-initialised generator gives 11.4 dB and
    inputs scaled to [0, 1] instead of [-1, 1] give 9.7 dB (measured). (Its output range needs no check here:
    the generator clamps it; tests/test_models.py tests the clamp.)"""
    from runtime_py.metrics import psnr

    rows, cols = 96, 128
    bgr = cv2.resize(cv2.imread(str(DEMO / "kite.jpg")), (cols, rows), interpolation=cv2.INTER_AREA)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    hole = cv2.resize(cv2.imread(str(DEMO / "kite_mask.png"), cv2.IMREAD_GRAYSCALE), (cols, rows),
                      interpolation=cv2.INTER_AREA) > 0
    image = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = models.load_generator()(image, torch.from_numpy(hole.astype(np.float32))[None, None])
    assert out.shape == (1, 3, rows, cols) and torch.isfinite(out).all()
    pixels = np.clip(np.round((out[0].permute(1, 2, 0).numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)
    assert psnr(pixels, rgb, ~hole) >= 20.0


def test_demo_photo_mask_and_licence_are_shipped():
    photo = cv2.imread(str(DEMO / "kite.jpg"))
    mask = cv2.imread(str(DEMO / "kite_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert photo is not None and mask is not None and photo.shape[:2] == mask.shape
    assert (DEMO / "kite.jpg").stat().st_size < 1_000_000 and max(photo.shape[:2]) >= 1360
    assert set(np.unique(mask)) == {0, 255} and 0.002 < (mask > 0).mean() < 0.05
    licence = (DEMO / "LICENSE.md").read_text()
    assert "Risto" in licence and "LGPL-3.0" in licence
    assert (DEMO / "LGPL-3.0.txt").is_file() and (DEMO / "GPL-3.0.txt").is_file()


def test_the_shipped_seed_file_was_made_from_the_shipped_checkpoint_and_names_its_convolutions():
    """models/weights/STEM.fallback-seeds.json (docs/EXPORT.md, "Seed files beside the checkpoint"): an export of
    the default model in a fresh folder reads it. Made from an export of these very weights, for both default
    shapes and both quantized TFLite precisions, naming only convolutions this network has. A new default model
    needs it written again: `gmcnn-mobile fallback-seeds DIR --out models/weights/STEM.fallback-seeds.json` from
    its full export."""
    from export import fallback
    from export.fallback_seeds import read_seed_file, seed_file_beside
    from export.options import default_of
    from models.checkpoint import sha256_path
    from models.gmcnn import conv_layers

    path = seed_file_beside(models.DEFAULT_CHECKPOINT)
    assert path == models.DEFAULT_CHECKPOINT.with_name("gmcnn_tf_c32_photos.fallback-seeds.json") and path.is_file()
    source = read_seed_file(path)
    assert source.checkpoint["sha256"] == sha256_path(models.DEFAULT_CHECKPOINT)
    assert "/work" not in path.read_text() and "/home" not in path.read_text()  # nothing of the machine it was made on
    gen = models.load_generator()
    for shape in default_of("shapes"):
        convs = [c["name"] for c in conv_layers(gen, *shape)]
        kinds = [("tflite", tuple(shape), p) for p in ("int8", "int8-dynamic")]
        seeds, left_out = fallback.seeds_from_manifest(source, convs, kinds=kinds)
        assert left_out == [] and sorted(seeds) == sorted(kinds)
        assert all(seed.layers or seed.input_groups for seed in seeds.values())
