"""Trainer tests on a tiny generated photo folder (cnum 4, 64x64 crops; a few seconds in all)."""
import json

import numpy as np
import pytest
import torch

from helpers import write_photos
from models import load_generator
from models.gmcnn import build_generator
from models.train import confidence_weights, gaussian_taps, reconstruction_loss, sample_batch, train
from models.train_cli import TrainConfig
from runtime_py.cli import main as cli_main


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Four 96x128 synthetic photos (distinct seeds, so crops differ)."""
    return write_photos(tmp_path_factory.mktemp("photos"), [(96, 128)] * 4, names=["a.jpg", "b.png", "c.jpg", "val.jpg"],
                        seed=123, period=9.0, noise=6.0)


def small_config(photo_dir, out, **kw):
    base = dict(photos=str(photo_dir), out=str(out), cnum=4, crop=64, batch_size=2, lr=1e-3, max_minutes=5,
                val_photos=["val.jpg"], val_crops_per_photo=2, val_crop=64, log_every=1, cache_short_side=96,
                max_scale=1.5, seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_gaussian_taps_match_the_reference_kernel_shape():
    taps = gaussian_taps(65, 1 / 40)
    kernel = np.outer(taps, taps)
    assert taps.shape == (65,) and np.isclose(kernel.sum(), 1.0)
    # sigma 1/40 of a unit normal over +-0.53: nearly flat, peaked at the centre and symmetric
    assert taps.argmax() == 32 and np.allclose(taps, taps[::-1])
    assert 1.0 < taps.max() / taps.min() < 1.2


def test_confidence_weights_are_in_unit_interval_zero_outside_and_largest_at_the_boundary():
    # The kernel is 65 px wide, so the decay shows on holes wider than it (at 64 px everything is ~1).
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 48:208, 48:208] = 1
    conf = confidence_weights(mask)
    hole = mask.bool()
    assert conf[~hole].abs().max() == 0
    assert conf[hole].min() > 0 and conf[hole].max() <= 1
    edge, centre = conf[0, 0, 48, 128], conf[0, 0, 128, 128]
    assert edge > 0.3 and centre < 0.5 * edge
    # monotone decay from the boundary towards the centre along a row
    row = conf[0, 0, 128, 48:129]
    assert torch.all(row[:-1] >= row[1:])


def test_loss_is_finite_and_decreases_when_fitting_one_batch(photo_dir):
    from models.train import list_photos, load_photo

    torch.manual_seed(0)
    torch.set_num_threads(1)
    photos = [load_photo(p, 96) for p in list_photos(photo_dir)]
    images, masks = sample_batch(np.random.default_rng(0), photos, 2, 64, 1.5)
    gen = build_generator("tf", 4, seed=0).train()
    opt = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(40):
        loss, parts = reconstruction_loss(gen(images, masks), images, masks)
        assert torch.isfinite(loss) and parts["rec"] >= 0 and parts["ae"] >= 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_resumed_run_continues_the_same_stream(photo_dir, tmp_path):
    straight = train(small_config(photo_dir, tmp_path / "straight", max_steps=4), progress=False)
    train(small_config(photo_dir, tmp_path / "split", max_steps=2), progress=False)
    resumed = train(small_config(photo_dir, tmp_path / "split", max_steps=4), resume=True, progress=False)
    assert straight["step"] == resumed["step"] == 4
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the split run logged steps 1-2 once and 3-4 once, like the straight run
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "log.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_loader_threads_draw_the_same_batches_as_inline(photo_dir, tmp_path):
    from models.train import BatchStream, list_photos, load_photo

    photos = [load_photo(p, 96) for p in list_photos(photo_dir)]
    inline = BatchStream(photos, 2, 64, 1.5, seed=5, first_step=3)
    ahead = BatchStream(photos, 2, 64, 1.5, seed=5, first_step=3, threads=3, depth=5)
    try:
        drawn = [(inline.next(), ahead.next()) for _ in range(7)]
    finally:
        ahead.close()
    for (img_a, mask_a), (img_b, mask_b) in drawn:
        assert torch.equal(img_a, img_b) and torch.equal(mask_a, mask_b)
    # consecutive steps differ, and a stream started later joins the same sequence
    assert not torch.equal(drawn[0][0][0], drawn[1][0][0])
    later = BatchStream(photos, 2, 64, 1.5, seed=5, first_step=5)
    assert torch.equal(later.next()[0], drawn[2][0][0])


def test_training_with_loader_threads_matches_inline(photo_dir, tmp_path):
    train(small_config(photo_dir, tmp_path / "inline", max_steps=3, loader_threads=0), progress=False)
    train(small_config(photo_dir, tmp_path / "ahead", max_steps=3, loader_threads=2), progress=False)
    a = torch.load(tmp_path / "inline" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ahead" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_best_checkpoint_loads_in_the_project_format(photo_dir, tmp_path):
    train(small_config(photo_dir, tmp_path / "run", max_steps=3), progress=False)
    gen = load_generator(tmp_path / "run" / "best.safetensors")
    assert gen.meta.variant == "tf" and gen.meta.cnum == 4
    assert gen.meta.channel_order == "rgb" and tuple(gen.meta.train_size) == (64, 64)
    assert "val.jpg" in gen.meta.description
    out = gen(torch.zeros(1, 3, 64, 64), torch.ones(1, 1, 64, 64))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in log if r["kind"] == "val"]
    assert len(vals) == 2 and all(np.isfinite(r["val_hole_psnr"]) for r in vals)


def test_cli_refuses_bad_input_with_one_line(photo_dir, tmp_path, capsys):
    rc = cli_main(["train", "--photos", str(photo_dir), "--out", str(tmp_path / "r"), "--val-photos", "nope.jpg",
                   "--cnum", "4", "--crop", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope.jpg" in err[0]
    rc = cli_main(["train", "--photos", str(photo_dir), "--out", str(tmp_path / "r2"), "--resume"])
    assert rc == 2 and "last.pt" in capsys.readouterr().err
    rc = cli_main(["train", "--photos", str(tmp_path / "missing"), "--out", str(tmp_path / "r3")])
    assert rc == 2


def test_resume_may_change_the_crop_size_as_a_new_phase(photo_dir, tmp_path):
    train(small_config(photo_dir, tmp_path / "run", crop=32, max_steps=2), progress=False)
    train(small_config(photo_dir, tmp_path / "run", crop=64, max_steps=3), resume=True, progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert [(p["crop"], p["from_step"]) for p in state["phases"]] == [(32, 0), (64, 2)]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["crop"] for r in log if r["kind"] == "phase"] == [32, 64]
    # validation crops keep their own fixed size, so scores stay comparable across phases
    gen = load_generator(tmp_path / "run" / "best.safetensors")
    assert gen.meta.cnum == 4


def test_he_init_keeps_the_input_visible_at_the_output():
    from models.train import he_init_

    ref = build_generator("tf", 8, seed=0)
    he = build_generator("tf", 8, seed=0)
    he_init_(he, seed=0)
    conv = he.net.layers["b1conv1"]
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(float(conv.weight.std()) - (2.0 / fan_in) ** 0.5) < 0.1 * (2.0 / fan_in) ** 0.5
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    m = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        # measured (cnum 8, 64x64): reference init output std 0.009, He init 0.23
        assert float(he(x, m).std()) > 10 * float(ref(x, m).std())


def test_bf16_autocast_trains_and_saves_float32_weights(photo_dir, tmp_path):
    summary = train(small_config(photo_dir, tmp_path / "amp", max_steps=3, amp="bf16"), progress=False)
    assert summary["step"] == 3 and np.isfinite(summary["best_val_hole_psnr"])
    log = [json.loads(line) for line in (tmp_path / "amp" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    state = torch.load(tmp_path / "amp" / "last.pt", weights_only=True)
    assert state["config"]["amp"] == "bf16"
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    # bf16 rounding changes the trajectory: the weights differ from a float32 run of the same stream
    train(small_config(photo_dir, tmp_path / "fp32", max_steps=3), progress=False)
    ref = torch.load(tmp_path / "fp32" / "last.pt", weights_only=True)
    assert any(not torch.equal(state["model"][k], ref["model"][k]) for k in ref["model"])


def test_unknown_amp_mode_is_refused_before_anything_is_written(photo_dir, tmp_path):
    from runtime_py.errors import UserError

    with pytest.raises(UserError, match="--amp"):
        train(small_config(photo_dir, tmp_path / "r", amp="fp8"), progress=False)
    assert not (tmp_path / "r").exists()


def test_run_files_get_the_umask_mode(photo_dir, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        train(small_config(photo_dir, tmp_path / "run", max_steps=1), progress=False)
    finally:
        os.umask(old)
    for name in ("config.json", "last.pt", "best.safetensors"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name
