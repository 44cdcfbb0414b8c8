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


def test_default_model_runs_and_keeps_outputs_in_range():
    gen = models.load_generator()
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 20:44] = 1
    with torch.no_grad():
        out = gen(image, mask)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0


def test_demo_photo_mask_and_licence_are_shipped():
    photo = cv2.imread(str(DEMO / "kite.jpg"))
    mask = cv2.imread(str(DEMO / "kite_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert photo is not None and mask is not None and photo.shape[:2] == mask.shape
    assert (DEMO / "kite.jpg").stat().st_size < 1_000_000 and max(photo.shape[:2]) >= 1360
    assert set(np.unique(mask)) == {0, 255} and 0.002 < (mask > 0).mean() < 0.05
    licence = (DEMO / "LICENSE.md").read_text()
    assert "Risto" in licence and "LGPL-3.0" in licence
    assert (DEMO / "LGPL-3.0.txt").is_file() and (DEMO / "GPL-3.0.txt").is_file()
