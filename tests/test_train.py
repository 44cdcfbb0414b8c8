"""Trainer tests on a tiny generated photo folder (cnum 4, 64x64 crops; a few seconds in all)."""
import json

import numpy as np
import pytest
import torch

from helpers import write_photos
from models import load_generator
from models.gmcnn import build_generator
from models.train import confidence_weights, gaussian_taps, reconstruction_loss, train
from models.train_config import TrainConfig
from models.train_data import BatchStream, Recipe, list_photos, load_photo, sample_batch
from gmcnn_mobile.cli import main as cli_main


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Four 96x128 synthetic photos (distinct seeds, so crops differ)."""
    return write_photos(tmp_path_factory.mktemp("photos"), [(96, 128)] * 4, names=["a.jpg", "b.png", "c.jpg", "val.jpg"],
                        seed=123, period=9.0, noise=6.0)


def small_config(photo_dir, out, **kw):
    base = dict(photos=str(photo_dir), out=str(out), cnum=4, crop=64, batch_size=2, lr=1e-3, max_minutes=5,
                val_photos=["val.jpg"], val_size=(48, 64), val_masks_per_photo=2, log_every=1, cache_short_side=96,
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
    torch.manual_seed(0)
    torch.set_num_threads(1)
    photos = [load_photo(p, 96) for p in list_photos(photo_dir)]
    _, images, masks = sample_batch(np.random.default_rng(0), photos, Recipe(2, 64, 1.5))
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
    photos = [load_photo(p, 96) for p in list_photos(photo_dir)]
    recipe = Recipe(2, 64, 1.5, whole_fraction=0.5, whole_size=(48, 64), whole_batch_size=1)
    inline = BatchStream(photos, recipe, seed=5, first_step=3)
    ahead = BatchStream(photos, recipe, seed=5, first_step=3, threads=3, depth=5)
    try:
        drawn = [(inline.next(), ahead.next()) for _ in range(7)]
    finally:
        ahead.close()
    for (kind_a, img_a, mask_a), (kind_b, img_b, mask_b) in drawn:
        assert kind_a == kind_b and torch.equal(img_a, img_b) and torch.equal(mask_a, mask_b)
    # both kinds of batch occur, consecutive steps differ, and a stream started later joins the same sequence
    assert {d[0][0] for d in drawn} == {"crop", "whole"}
    assert not torch.equal(drawn[0][0][1][0], drawn[1][0][1][0])
    later = BatchStream(photos, recipe, seed=5, first_step=5)
    assert torch.equal(later.next()[1], drawn[2][0][1])


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


# ------------------------------------------------------------------ default model v2: continuing, conditioning

def _read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _checkpoint_at_step(path, step, cnum=4, seed=1):
    from models.checkpoint import save_checkpoint
    from models.train import he_init_

    gen = build_generator("tf", cnum, seed=seed)
    he_init_(gen, seed)
    gen.meta.extra = {"step": step, "trained_s": 12.5}
    save_checkpoint(gen, path)
    return gen


def test_init_from_continues_the_step_count_and_records_each_run(photo_dir, tmp_path):
    start = _checkpoint_at_step(tmp_path / "start.safetensors", 50)
    # no steps: the run holds exactly the starting weights, at the starting step
    idle = train(small_config(photo_dir, tmp_path / "idle", init_from=str(tmp_path / "start.safetensors"),
                              max_steps=50), progress=False)
    assert idle["step"] == 50
    state = torch.load(tmp_path / "idle" / "last.pt", weights_only=True)
    for k, v in start.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    run = tmp_path / "run"
    summary = train(small_config(photo_dir, run, init_from=str(tmp_path / "start.safetensors"), max_steps=53),
                    progress=False)
    assert summary["step"] == 53
    assert [r["step"] for r in _read_log(run) if r["kind"] == "train"] == [51, 52, 53]
    resumed = train(small_config(photo_dir, run, max_steps=55), resume=True, progress=False)
    assert resumed["step"] == 55
    runs = torch.load(run / "last.pt", weights_only=True)["invocations"]
    assert [(r["from_step"], r["to_step"]) for r in runs] == [(50, 53), (53, 55)]
    best = load_generator(run / "best.safetensors")
    history = best.meta.extra["runs"]
    assert history[0]["to_step"] == 50 and "before runs were recorded" in history[0]["note"]
    assert history[1]["from_step"] == 50 and history[1]["device"] == "cpu" and history[1]["wall_s"] > 0
    assert "start.safetensors at step 50" in best.meta.description


def test_a_new_learning_rate_does_not_restart_the_hole_curriculum():
    from models.train import hole_curriculum_start

    holes = {"max_hole": 0.4, "hole_start": 0.3, "hole_ramp_steps": 2000}
    phases = [{"from_step": 0, "lr": 1e-3, **holes}, {"from_step": 500, "lr": 1e-4, **holes}]
    assert hole_curriculum_start(phases) == 0
    phases.append({"from_step": 900, "lr": 1e-4, **holes, "max_hole": 0.5})
    assert hole_curriculum_start(phases) == 900


def test_learning_rate_warms_up_from_the_optimiser_start():
    from models.train import learning_rate

    cfg = TrainConfig(photos="", out="", lr=1e-3, warmup_steps=10)
    assert learning_rate(cfg, 100, 100) == pytest.approx(1e-4)
    assert learning_rate(cfg, 104, 100) == pytest.approx(5e-4)
    assert learning_rate(cfg, 109, 100) == pytest.approx(1e-3) == learning_rate(cfg, 5000, 100)
    assert learning_rate(TrainConfig(photos="", out="", lr=1e-3), 0, 0) == 1e-3


def test_learning_rate_anneals_over_the_last_minutes_of_the_budget():
    from models.train import check_config, learning_rate
    from runtime_py.errors import UserError

    cfg = TrainConfig(photos="", out="", lr=1e-3, max_minutes=10, lr_decay_minutes=4, lr_final_fraction=0.1)
    assert learning_rate(cfg, 50, 0, elapsed_s=0) == learning_rate(cfg, 50, 0, elapsed_s=360) == 1e-3
    assert learning_rate(cfg, 50, 0, elapsed_s=480) == pytest.approx(0.55e-3)  # half way: cosine midpoint
    assert learning_rate(cfg, 50, 0, elapsed_s=600) == pytest.approx(1e-4)
    assert learning_rate(cfg, 50, 0, elapsed_s=700) == pytest.approx(1e-4)  # the final validation, past the budget
    rates = [learning_rate(cfg, 50, 0, elapsed_s=t) for t in range(360, 601, 10)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    warm = TrainConfig(photos="", out="", lr=1e-3, warmup_steps=10, max_minutes=1, lr_decay_minutes=2)
    assert learning_rate(warm, 4, 0, elapsed_s=30) == pytest.approx(0.5e-3 * 0.55)  # both apply; decay capped at the budget
    with pytest.raises(UserError, match="lr-final-fraction"):
        check_config(TrainConfig(photos="", out="", lr_final_fraction=0))


def _dead_b1(gen):
    """Make the tf generator's first branch dead the way the shipped model's is: b1conv11 stuck at ELU -1."""
    conv = gen.net.layers["b1conv11"]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-1000.0)
    return gen


def test_dead_layer_check_flags_a_layer_stuck_at_the_floor():
    from models.conditioning import measure, summarize, well_conditioned
    from models.train import he_init_

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[:, 16:40, 20:44] = 1
    gen = build_generator("tf", 4, seed=0)
    he_init_(gen, 0)
    healthy = summarize(measure(gen, images, masks))
    assert healthy["dead_layers"] == [] and healthy["worst_floor_share"] < 0.95
    rows = measure(_dead_b1(gen), images, masks)
    s = summarize(rows)
    assert "net.layers.b1conv11" in s["dead_layers"] and not well_conditioned(s)
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer["net.layers.b1conv11"]["floor_share"] == 1.0
    assert by_layer["net.layers.mergeconv18"]["floor_share"] is None  # no ELU after the last layer
    # the peak is the largest |output| of any convolution, as a plain hook sees it
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(float(o.abs().max())))
             for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for i in range(2):
            gen(torch.from_numpy(images[i:i + 1] / 127.5 - 1).permute(0, 3, 1, 2).float(),
                torch.from_numpy(masks[i:i + 1, None].astype(np.float32)))
    for h in hooks:
        h.remove()
    assert s["peak"] == pytest.approx(max(seen), rel=1e-6)
    assert not well_conditioned({"dead_layers": [], "peak": 150.0}) and well_conditioned({"dead_layers": [], "peak": 99.0})


def test_reinit_revives_a_dead_branch_without_changing_the_output():
    from models.conditioning import measure, summarize
    from models.train import branch_channels, he_init_, reinit_branches

    gen = build_generator("tf", 4, seed=0)
    he_init_(gen, 0)
    _dead_b1(gen)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    m = torch.zeros(2, 1, 128, 128)
    m[..., 30:90, 40:100] = 1
    with torch.no_grad():
        before = gen(x, m)
    old_b1 = gen.net.layers["b1conv3"].weight.clone()
    redrawn = reinit_branches(gen, ["b1"], seed=5, images=x, masks=m)
    assert redrawn[0] == "b1conv1" and len(redrawn) == 12
    assert not torch.equal(gen.net.layers["b1conv3"].weight, old_b1)
    assert float(gen.net.layers["mergeconv17"].weight.detach()[:, branch_channels(4)["b1"]].abs().max()) == 0
    with torch.no_grad():
        after = gen(x, m)
    # the dead branch's output was constant away from the zero-padded border; the merge bias took it over.
    # Measured: interior difference 0 to float32 rounding (< 1e-6); the border band (b1's 7x7 convolutions at
    # quarter resolution, ~12 px at full size, plus the merge convolutions) differs.
    assert float((after - before)[..., 24:-24, 24:-24].abs().max()) < 1e-5
    images = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    s = summarize(measure(gen, images, m[:, 0].numpy().astype(np.uint8)))
    assert s["dead_layers"] == []


def test_compile_failure_falls_back_to_eager(photo_dir, tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    train(small_config(photo_dir, tmp_path / "compiled", max_steps=2, compile="default"), progress=False)
    failed = [r for r in _read_log(tmp_path / "compiled") if r["kind"] == "compile_failed"]
    assert len(failed) == 1 and "no C++ compiler" in failed[0]["error"]
    train(small_config(photo_dir, tmp_path / "eager", max_steps=2), progress=False)
    a = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "eager" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_validation_and_checkpoints_between_steps_are_not_booked_to_the_steps(photo_dir, tmp_path):
    """With a validation and a checkpoint after every logged step, their time goes to their own timers only:
    the parts still add up to no more than the wall time (the steps' window used to start before them)."""
    train(small_config(photo_dir, tmp_path / "run", max_steps=4, val_every_minutes=0.0, checkpoint_every_minutes=0.0),
          progress=False)
    log = _read_log(tmp_path / "run")
    timing = log[-1]
    val_steps = [r["step"] for r in log if r["kind"] == "val"]
    # the start and after each of the 4 steps; the closing validation is not repeated at the same step
    assert val_steps == [0, 1, 2, 3, 4], val_steps
    parts = timing["setup_s"] + timing["steps_s"] + timing["warmup_s"] + timing["validation_s"] + timing["checkpoint_s"]
    assert timing["validation_s"] > 0 and timing["checkpoint_s"] > 0
    assert parts <= timing["wall_s"] + 0.03, timing


def test_the_log_books_wall_time_to_steps_warm_up_and_validation(photo_dir, tmp_path):
    summary = train(small_config(photo_dir, tmp_path / "run", max_steps=4, whole_fraction=0.5,
                                 whole_size=(48, 64), whole_batch_size=1, clip_grad_norm=0.5, warmup_steps=2),
                    progress=False)
    log = _read_log(tmp_path / "run")
    timing = log[-1]
    assert timing["kind"] == "timing" and timing == {**summary["timing"]}
    warm = [r for r in log if r["kind"] == "warmup"]
    assert 1 <= len(warm) <= 2 and timing["timed_steps"] == 4 - len(warm)  # one warm-up per batch shape
    parts = timing["setup_s"] + timing["steps_s"] + timing["warmup_s"] + timing["validation_s"] + timing["checkpoint_s"]
    assert parts <= timing["wall_s"] + 0.03 and parts > 0.8 * timing["wall_s"]  # 0.03: six values rounded to 10 ms
    assert 0 < timing["step_share"] <= 1
    trains = [r for r in log if r["kind"] == "train"]
    assert trains[0]["lr"] == pytest.approx(0.5e-3) and trains[-1]["lr"] == pytest.approx(1e-3)
    assert all(r["grad_norm"] > 0 for r in trains)
    vals = [r for r in log if r["kind"] == "val"]
    assert all({"dead_layers", "val_peak", "well_conditioned"} <= set(r) for r in vals)


def test_peak_samples_and_the_activation_penalty(photo_dir, tmp_path):
    from models.conditioning import save_samples

    rng = np.random.default_rng(1)
    masks = np.zeros((2, 64, 88), np.uint8)
    masks[:, 20:40, 30:60] = 1
    save_samples(tmp_path / "peak.npz", rng.integers(0, 256, (2, 64, 88, 3), dtype=np.uint8), masks, ["a", "b"])
    train(small_config(photo_dir, tmp_path / "run", max_steps=3, peak_samples=str(tmp_path / "peak.npz"),
                       activation_penalty=1.0, activation_limit=0.05), progress=False)
    log = _read_log(tmp_path / "run")
    vals = [r for r in log if r["kind"] == "val"]
    assert all(r["heldout_peak"] > 0 and r["heldout_peak_layer"] for r in vals)
    assert all(r["penalty"] > 0 for r in log if r["kind"] == "train")


def test_activation_penalty_pulls_outliers_back():
    from models.train import ActivationPenalty, he_init_

    torch.manual_seed(0)
    gen = build_generator("tf", 4, seed=0).train()
    he_init_(gen, 0)
    penalty = ActivationPenalty(gen, limit=0.5)
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m = torch.zeros(2, 1, 32, 32)
    values = []
    for _ in range(15):
        gen(x, m)
        p = penalty.take()
        opt.zero_grad()
        p.backward()
        opt.step()
        values.append(float(p.detach()))
    penalty.remove()
    # measured (cnum 4, limit 0.5, Adam 3e-3): 0.43 -> 0.016 in 15 steps, decreasing at every step
    assert values[0] > 0 and values[-1] < 0.1 * values[0], values
    with torch.no_grad():
        gen(x, m)
    assert penalty.take().numel() == 1  # hooks are gone: nothing was collected


def test_best_checkpoint_prefers_well_conditioned_validations(photo_dir, tmp_path, monkeypatch):
    import models.train as trainer

    # the start and after each of the 4 steps (the closing validation reuses the last one, at the same step)
    scores = iter([(10.0, False), (12.0, False), (11.0, True), (13.0, False), (11.5, True)])

    def fake_validate(*args, **kwargs):
        psnr, ok = next(scores)
        return {"val_hole_psnr": psnr, "val_hole_ssim": 0.5, "dead_layers": [] if ok else ["x"],
                "worst_floor_share": 0.1, "worst_floor_layer": "x", "val_peak": 1.0, "val_peak_layer": "x",
                "well_conditioned": ok}

    monkeypatch.setattr(trainer, "validate", fake_validate)
    train(small_config(photo_dir, tmp_path / "run", max_steps=4, val_every_minutes=0), progress=False)
    vals = [r for r in _read_log(tmp_path / "run") if r["kind"] == "val"]
    assert [r["best"] for r in vals] == [True, True, True, False, True]
    assert load_generator(tmp_path / "run" / "best.safetensors").meta.extra["val_hole_psnr"] == 11.5


def test_device_script_dry_run_packs_trains_resumes_and_hands_back_pieces(tmp_path):
    """models/train_on_device.sh end to end on a CPU at tiny size: the GPU session's exact sequence."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import write_shared_layout
    from models.dataset import HELD_OUT, VALIDATION, pack

    repo = Path(__file__).resolve().parent.parent
    data = write_shared_layout(tmp_path / "data", seed=2)
    pack(data, tmp_path / "packed", budget_bytes=2**30, long_side=96, progress=False)
    env = {**os.environ, "GMCNN_TRAIN_PYTHON": sys.executable, "GMCNN_TRAIN_DEVICE": "cpu", "GMCNN_TRAIN_THREADS": "1",
           "GMCNN_TRAIN_INIT": "none", "GMCNN_TRAIN_REINIT": "b1",
           "GMCNN_TRAIN_CNUM": "4", "GMCNN_TRAIN_CROP": "32", "GMCNN_TRAIN_BATCH": "2", "GMCNN_TRAIN_WHOLE": "48x64",
           "GMCNN_TRAIN_WHOLE_BATCH": "1", "GMCNN_TRAIN_VAL_SIZE": "48x64", "GMCNN_TRAIN_PEAK_SHAPE": "64x88",
           "GMCNN_TRAIN_MAX_STEPS": "4", "GMCNN_TRAIN_MINUTES": "3", "GMCNN_TRAIN_PHOTOS": str(tmp_path / "packed"),
           "GMCNN_TRAIN_RUN": str(tmp_path / "work" / "run"), "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    first = subprocess.run(["bash", "models/train_on_device.sh"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "peak samples: 4 at 64x88" in first.stdout and '"kind": "timing"' in first.stdout
    out = tmp_path / "out"
    parts = sorted(out.glob("best_fp16.safetensors.part-*"))
    assert parts and {p.name for p in out.iterdir()} >= {"best_fp16.sha256", "log.jsonl", "config.json", "summary.json"}
    rebuilt = tmp_path / "best_fp16.safetensors"
    rebuilt.write_bytes(b"".join(p.read_bytes() for p in parts))
    assert (out / "best_fp16.sha256").read_text().split()[0] == hashlib.sha256(rebuilt.read_bytes()).hexdigest()
    gen = load_generator(rebuilt)
    assert gen.meta.cnum == 4 and gen.meta.extra["runs"][-1]["device"] == "cpu"
    config = json.loads((out / "config.json").read_text())
    assert not set(config["train_photos"]) & (set(HELD_OUT) | set(VALIDATION))
    assert config["val_photo_files"] == list(VALIDATION) and config["reinit"] == ["b1"]
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    # a second call on the same machine continues the run
    second = subprocess.run(["bash", "models/train_on_device.sh"], cwd=repo, capture_output=True, text=True,
                            env={**env, "GMCNN_TRAIN_MAX_STEPS": "6", "GMCNN_TRAIN_LR": "1e-4"}, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing the run" in second.stdout and "peak samples: reusing" in second.stdout
    assert json.loads((out / "summary.json").read_text())["step"] == 6
    # without packed photos the script says what to do, in one line
    missing = subprocess.run(["bash", "models/train_on_device.sh"], cwd=repo, capture_output=True, text=True,
                             env={**env, "GMCNN_TRAIN_PHOTOS": str(tmp_path / "nothing")}, timeout=60)
    assert missing.returncode == 2 and "pack-photos" in missing.stderr
