"""`python -m models.conditioning`: dead layers and the peak activation of a checkpoint, from samples or photos."""
import json

import numpy as np

from helpers import make_checkpoint, write_shared_layout
from models.conditioning import load_samples, main, save_samples
from models.dataset import VALIDATION, pack


def test_samples_round_trip_and_the_cli_reports_peak_and_dead_layers(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 48, 1), np.uint8)
    masks[:, 8:20, 10:30] = 255
    save_samples(tmp_path / "s.npz", images, masks, ["a#1", "a#2", "b#1"])
    back_images, back_masks, names = load_samples(tmp_path / "s.npz")
    assert np.array_equal(back_images, images) and back_masks.shape == (3, 32, 48) and names == ["a#1", "a#2", "b#1"]
    assert set(np.unique(back_masks)) == {0, 1}
    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    assert main(["--checkpoint", str(ckpt), "--samples", str(tmp_path / "s.npz"), "--threads", "1",
                 "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    assert "peak |output|" in text and "dead layers" in text and "3 at 32x48" in text
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["summary"]["peak"] == max(r["peak"] for r in report["layers"]) and len(report["layers"]) == 44
    assert main(["--checkpoint", str(ckpt), "--samples", str(ckpt)]) == 2
    assert "not a samples file" in capsys.readouterr().err


def test_the_cli_measures_the_validation_photos_of_a_packed_folder(tmp_path, capsys):
    data = write_shared_layout(tmp_path / "data")
    pack(data, tmp_path / "packed", budget_bytes=2**30, long_side=96, progress=False)
    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    assert main(["--checkpoint", str(ckpt), "--photos", str(tmp_path / "packed"), "--validation", "--shape", "32x48",
                 "--masks-per-photo", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"samples: {len(VALIDATION)} at 32x48" in out and "Aqua.jpg" not in out
