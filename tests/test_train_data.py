"""The default model's data: the split by name, the packed copy for a GPU machine, masks and whole-photo samples."""
import json

import cv2
import numpy as np
import pytest

from models.dataset import HELD_OUT, VALIDATION, find_sources, pack, packing_budget, split_names
from models.train_data import (MIN_HOLE, Recipe, hole_cap, random_whole, sample_batch, training_mask,
                               validation_set, whole_view, window_of_aspect)
from runtime_py.errors import UserError
from helpers import photo, run_cli, write_shared_layout


@pytest.fixture()
def shared(tmp_path):
    return write_shared_layout(tmp_path / "data")


def test_flat_names_and_split_keep_held_out_photos_out_of_training(shared):
    sources = find_sources(shared)
    assert set(VALIDATION) | set(HELD_OUT) <= set(sources)
    assert sources["misc-extra_0.jpg"] == shared / "train" / "misc" / "extra_0.jpg"
    assert sources["Kite.jpg"] == shared / "photos" / "Kite.jpg" and "LICENSES.md" not in " ".join(sources)
    split = split_names(list(sources))
    assert sorted(split.held_out) == sorted(HELD_OUT) and split.validation == list(VALIDATION)
    assert not (set(split.train) & (set(HELD_OUT) | set(VALIDATION)))
    assert sorted(split.train) == ["Aqua.jpg", "misc-extra_0.jpg", "misc-extra_1.jpg", "misc-extra_2.jpg"]


def test_split_refuses_missing_validation_photos_and_overlaps():
    with pytest.raises(UserError, match="nope.jpg"):
        split_names(["a.jpg", "b.jpg"], validation=["nope.jpg"], held_out=[])
    with pytest.raises(UserError, match="both held out and validated"):
        split_names(["a.jpg", "b.jpg"], validation=["a.jpg"], held_out=["a.jpg"])
    with pytest.raises(UserError, match="no training photos"):
        split_names(["a.jpg", "b.jpg"], validation=["a.jpg"], held_out=["b.jpg"])


def test_pack_leaves_held_out_photos_behind_and_stays_under_the_budget(shared, tmp_path):
    out = tmp_path / "packed"
    generous = pack(shared, out, budget_bytes=2**30, long_side=64, progress=False)
    assert generous.quality == 90
    files = sorted(p.name for p in out.glob("*.jpg"))
    assert not set(files) & set(HELD_OUT)
    assert set(VALIDATION) <= set(files) and len(files) == len(VALIDATION) + 4
    manifest = json.loads((out / "split.json").read_text())
    assert manifest["validation"] == list(VALIDATION) and manifest["quality"] == 90
    # long side 64: an 80 px wide photo comes out 64 wide, a portrait one 64 high
    assert cv2.imread(str(out / "Aqua.jpg")).shape[:2] == (48, 64)
    assert cv2.imread(str(out / "misc-extra_0.jpg")).shape[:2] == (64, 48)
    assert generous.packed_pixels < generous.source_pixels
    # a budget below the quality-90 size: a lower quality is chosen and the files fit
    budget = int(generous.data_bytes * 0.8)
    tight = pack(shared, out, budget_bytes=budget, long_side=64, progress=False)
    on_disk = sum(p.stat().st_size for p in out.glob("*.jpg"))
    assert tight.quality < 90 and tight.data_bytes == on_disk <= budget
    assert len(list(out.glob("*.jpg"))) == len(files)


def test_pack_refuses_an_impossible_budget_without_writing(shared, tmp_path):
    out = tmp_path / "packed"
    with pytest.raises(UserError, match="lower --long-side"):
        pack(shared, out, budget_bytes=1000, long_side=64, progress=False)
    assert not out.exists()
    (tmp_path / "someone_elses").mkdir()
    with pytest.raises(UserError, match="not a packed photo folder"):
        pack(shared, tmp_path / "someone_elses", budget_bytes=2**30, long_side=64, progress=False)


def test_packing_budget_subtracts_the_tree_and_margin():
    assert packing_budget(".", limit=64 * 2**20, margin=6 * 2**20, tree_bytes=28 * 2**20) == 30 * 2**20
    with pytest.raises(UserError, match="nothing is left"):
        packing_budget(".", limit=64 * 2**20, margin=6 * 2**20, tree_bytes=60 * 2**20)


def test_pack_photos_cli_measures_the_git_tree(shared, tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "tracked.bin").write_bytes(b"x" * 2**20)
    (repo / ".gitignore").write_text("/.devdata/\n")
    monkeypatch.chdir(repo)
    rc, line, _ = run_cli("pack-photos", "--data", shared, "--long-side", "64", "--limit-mib", "8", "--margin-mib", "1")
    assert rc == 0
    assert "packed 14 photos" in line and "Kite.jpg" in line
    # 8 MiB - 1 MiB margin - (1 MiB tracked + .gitignore, untracked but not ignored)
    assert "6.0 MiB were available" in line
    assert (repo / ".devdata" / "photos" / "split.json").is_file()


# ------------------------------------------------------------------------------ masks

@pytest.mark.parametrize("cap", [0.3, 0.4])
def test_training_masks_reach_the_cap_and_never_exceed_it(cap):
    rng = np.random.default_rng(1)
    fractions = np.array([training_mask(rng, 96, 128, cap).mean() for _ in range(300)])
    # measured (300 masks at 96x128, seed 1): max 0.3998 for cap 0.4, 0.2994 for 0.3; 79 % above 0.3 x cap;
    # rounding of blob/rect sizes may overshoot the cap slightly (blob_mask: 0.4008 at 512x680), hence 0.005
    assert fractions.max() <= cap + 0.005
    assert fractions.max() >= 0.9 * cap
    assert fractions.min() > 0 and np.mean(fractions > 0.3 * cap) > 0.5


def test_hole_cap_ramps_linearly_over_the_phase():
    assert hole_cap(0, 0.4, 0.3, 100) == pytest.approx(0.3)
    assert hole_cap(50, 0.4, 0.3, 100) == pytest.approx(0.35)
    assert hole_cap(500, 0.4, 0.3, 100) == pytest.approx(0.4)
    assert hole_cap(0, 0.4, 0.3, 0) == 0.4
    assert MIN_HOLE < 0.3


def test_batches_mix_crops_and_whole_photos_with_masks_up_to_the_cap():
    photos = [photo(90, 120), photo(120, 90)]
    recipe = Recipe(batch_size=3, crop=32, max_scale=2.0, whole_fraction=0.5, whole_size=(48, 64),
                    whole_batch_size=2, max_hole=0.4)
    kinds = {}
    for step in range(20):
        kind, images, masks = sample_batch(np.random.default_rng([7, step]), photos, recipe, step)
        kinds[kind] = kinds.get(kind, 0) + 1
        expect = (3, 3, 32, 32) if kind == "crop" else (2, 3, 48, 64)
        assert tuple(images.shape) == expect and tuple(masks.shape) == (expect[0], 1) + expect[2:]
        assert float(images.min()) >= -1 and float(images.max()) <= 1
        assert float(masks.mean(dim=(1, 2, 3)).max()) <= 0.405
    assert kinds.get("crop", 0) > 3 and kinds.get("whole", 0) > 3


def test_whole_samples_are_landscape_windows_of_the_target_aspect():
    rng = np.random.default_rng(3)
    portrait = photo(200, 100, seed=3)
    out = random_whole(rng, portrait, (48, 64))
    assert out.shape == (48, 64, 3)
    assert window_of_aspect(100, 200, (48, 64), 1.0) == (100, 133)
    assert window_of_aspect(100, 120, (48, 64), 0.25) == (45, 60)
    # the validation view is deterministic and uses the whole (rotated) photo's centre
    assert np.array_equal(whole_view(portrait, (48, 64)), whole_view(portrait, (48, 64)))
    images, masks = validation_set([portrait, portrait], (48, 64), masks_per_photo=3, seed=0)
    assert images.shape == (6, 48, 64, 3) and masks.shape == (6, 48, 64) and all(m.any() for m in masks)
