"""The parity gate runs a file's held-out samples, and then its nudged copies, in one engine (export.api's
gate_in_one_engine), each judged as it comes: the first that fails ends the gate, and a new engine's first
inference is paid once per file, not once per sample.

The format is a stand-in (``gatesim``, no converter): running a "file" is the PyTorch generator plus a small
error, and a large one on the nudged copies where the file says so; both of its precisions are treated as
quantized at run time, so both gates run the copies."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import lively_generator

SHAPE = (64, 96)


def _gatesim_backend(calls):
    from runtime_py.tolerances import COREML_PARITY

    mod = types.ModuleType("gatesim_backend")
    mod.NAME, mod.SUFFIX, mod.PRECISIONS, mod.EXTRA = "gatesim", ".json", ("fp16", "w8"), "export"
    mod.PARITY_TOLERANCES, mod.RUNTIME_QUANTIZED = COREML_PARITY, ("fp16", "w8")
    mod.generators = {}

    def convert(job):
        Path(job.out).write_text(json.dumps({"precision": job.precision, "bad_copies": job.precision == "w8"}))
        mod.generators[str(job.out)] = job.generator
        return job.out

    def run(path, io, samples, threads=2, keep_going=None):
        import torch

        spec = json.loads(Path(path).read_text())
        gen = mod.generators[str(path)]
        x = torch.from_numpy(samples.tensor_image()).permute(0, 3, 1, 2)
        m = torch.from_numpy(samples.tensor_mask()).permute(0, 3, 1, 2)
        outputs = []
        for j, name in enumerate(samples.names):
            with torch.no_grad():
                y = gen(x[j:j + 1], m[j:j + 1]).permute(0, 2, 3, 1).numpy()
            y = y + (0.5 if spec["bad_copies"] and name.endswith("~nudged") else 1e-4)
            outputs.append(np.clip(y, -1, 1).astype(np.float32))
            if keep_going is not None and not keep_going(j, outputs[-1]):
                break
        calls.append((spec["precision"], len(samples), len(outputs),
                       sum(n.endswith("~nudged") for n in samples.names[:len(outputs)])))
        return np.concatenate(outputs), "pytorch fp32 plus an error (test stand-in)"

    mod.check_available = lambda: None
    mod.convert, mod.run = convert, run
    mod.describe = lambda path, io, shape=None: ([], [])
    mod.inventory = lambda path, threads=1, details=None: {}
    return mod


def test_samples_and_copies_run_in_one_engine_and_stop_at_the_first_failing_copy(tmp_path, monkeypatch):
    """The first file at the shape makes the copies' reference and runs them in an engine of their own; the next
    runs its samples and copies in one, stops at its first copy (far off), and fails on it; the record says which
    copies ran."""
    from export import api, backends

    calls = []
    monkeypatch.setitem(sys.modules, "gatesim_backend", _gatesim_backend(calls))
    monkeypatch.setitem(backends.FORMAT_MODULES, "gatesim", "gatesim_backend")
    with pytest.raises(api.ExportFailed) as err:
        api.export_artifacts(lively_generator("tf", 4, seed=0), tmp_path, shapes=[SHAPE], formats=["gatesim"],
                             precisions=["fp16", "w8"], ios=["tensor"], progress=False, calibration_masks_per_photo=1)
    n = calls[0][1]
    assert n > 1
    # fp16: its samples, then (the first file to pass them: no copies' reference yet) its copies on their own
    # w8: samples and copies fed to one engine, which stopped after the first copy
    assert calls == [("fp16", n, n, 0), ("fp16", n, n, n), ("w8", 2 * n, n + 1, 1)]
    assert "w8" in str(err.value) and "one level off" in str(err.value) and "fp16" not in str(err.value)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    fp16 = next(a for a in manifest["artifacts"] if a["precision"] == "fp16")
    assert fp16["parity"]["passed"] and fp16["parity"]["samples"] == 2 * n
    assert fp16["parity"]["details"]["nudged"]["samples"] == n and "sample_indices" not in fp16["parity"]["details"]["nudged"]


def test_a_sample_counts_as_the_worse_of_it_and_the_copies_that_ran():
    """A gate that stopped at a failing copy records the samples whose copies ran: each of them counts as the
    worse of it and its copy, the others as themselves (export.fallback.failing_samples)."""
    from export import fallback
    from runtime_py.manifest import ParityResult

    per = [41.0, 45.0, 39.5, 44.0, 38.0]  # four samples, then the copy of sample 1, which failed
    result = ParityResult(executor="x", samples=5, details={
        "hole_psnr_db_per_sample": per, "nudged": {"samples": 1, "of": 4, "sample_indices": [1], "fraction": 0.01}})
    assert fallback.failing_samples(result, 40.0) == [1, 2]
    assert fallback.failing_samples(result, float("inf")) == [1, 2, 0, 3]


@pytest.mark.parametrize("io", ["tensor", "image"])
def test_the_gates_per_sample_check_is_the_comparisons_hole_psnr(io):
    """parity.hole_psnrs, computed from the hole's pixels alone, is compare()'s hole PSNR of each sample to the
    last bit: the gate may stop on it knowing the whole comparison would fail there too."""
    from export import parity
    from export.samples import CALIBRATION_DIR, load_samples

    samples = load_samples(CALIBRATION_DIR, SHAPE, 2, seed=2, limit=3)
    rng = np.random.default_rng(0)
    reference = rng.uniform(-1, 1, samples.images.shape[:3] + (3,)).astype(np.float32)
    output = np.clip(reference + rng.normal(0, 0.02, reference.shape), -1, 1).astype(np.float32)
    if io == "image":
        output = parity.composite_pixels(output, samples)
    whole = parity.compare(reference, output, samples, io)
    cheap = parity.hole_psnrs(reference, output, samples, io)
    assert [round(v, 3) for v in cheap] == whole["details"]["hole_psnr_db_per_sample"]
    assert round(min(cheap), 3) == whole["hole_psnr_db"] and len(set(cheap)) == len(cheap)
    # unrounded, against the whole composites' hole pixels as compare() takes them
    hole = samples.tensor_mask()[..., 0] > 0.5
    ref_comp = parity.composite_pixels(reference, samples)
    art_comp = parity.composite_pixels(output, samples) if io == "tensor" else output
    assert cheap == [parity.psnr(ref_comp[i][hole[i]], art_comp[i][hole[i]]) for i in range(len(samples))]


def test_the_inventory_runs_after_the_formats_gates_largest_shape_first_in_one_reuse_block(tmp_path, monkeypatch):
    """Issue 17: a file that passes its gate waits under a name of its own; once every file of its format is gated,
    the inventories run one after another, the largest shape first, inside one runtime_py.memory.reuse_freed_memory
    block (the TFLite inventory's XNNPACK loads then reuse each other's pages), and only then do the files go into
    place."""
    import contextlib

    from export import api, backends
    from runtime_py import memory

    shapes = [SHAPE, (2 * SHAPE[0], 2 * SHAPE[1])]
    events = []
    mod = _gatesim_backend([])
    real_run, real_reuse = mod.run, memory.reuse_freed_memory

    def run(path, io, samples, threads=2, keep_going=None):
        events.append(("gate", Path(path).name))
        return real_run(path, io, samples, threads, keep_going)

    def describe(path, io, shape=None):
        final = tmp_path / Path(path).name.split(api.ACCEPTED_PREFIX, 1)[-1]
        events.append(("describe", tuple(shape), memory._reuse_depth, Path(path).name.startswith(api.PARTIAL_PREFIX),
                       final.exists()))
        return [], []

    @contextlib.contextmanager
    def reuse():
        events.append("block")
        with real_reuse():
            yield
        events.append("block left")

    mod.run, mod.describe = run, describe
    mod.RUNTIME_QUANTIZED = ()  # no nudged copies: one gate per file
    monkeypatch.setattr(memory, "reuse_freed_memory", reuse)
    monkeypatch.setitem(sys.modules, "gatesim_backend", mod)
    monkeypatch.setitem(backends.FORMAT_MODULES, "gatesim", "gatesim_backend")
    api.export_artifacts(lively_generator("tf", 4, seed=0), tmp_path, shapes=shapes, formats=["gatesim"],
                         precisions=["fp16", "w8"], ios=["tensor"], progress=False, calibration_masks_per_photo=1)
    last_gate = max(i for i, e in enumerate(events) if e[0] == "gate")
    assert sum(e[0] == "gate" for e in events) == 4  # (the references' blocks come before their gates)
    large, small = tuple(shapes[1]), tuple(shapes[0])
    # after every gate, one block, inside it each file's inventory, the larger shape's first; the file not yet in place
    assert events[last_gate + 1:] == ["block"] + [("describe", large, 1, True, False)] * 2 + \
        [("describe", small, 1, True, False)] * 2 + ["block left"], events
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(a["file"] for a in manifest["artifacts"]) == sorted(p.name for p in tmp_path.glob("*.json")
                                                                      if p.name != "manifest.json"
                                                                      and not p.name.startswith("export"))
    assert len(manifest["artifacts"]) == 4 and not list(tmp_path.glob(api.PARTIAL_PREFIX + "*"))


def test_a_failing_inventory_leaves_no_file_of_the_run(tmp_path, monkeypatch):
    """A file waits for its inventory under a partial name: where an inventory fails, the export stops and no
    file of the run is left, neither the gated files nor a half-described one."""
    from export import api, backends

    mod = _gatesim_backend([])
    mod.RUNTIME_QUANTIZED = ()

    def describe(path, io, shape=None):
        raise RuntimeError("the inventory could not load the file")

    mod.describe = describe
    monkeypatch.setitem(sys.modules, "gatesim_backend", mod)
    monkeypatch.setitem(backends.FORMAT_MODULES, "gatesim", "gatesim_backend")
    with pytest.raises(RuntimeError, match="could not load"):
        api.export_artifacts(lively_generator("tf", 4, seed=0), tmp_path, shapes=[SHAPE], formats=["gatesim"],
                             precisions=["fp16", "w8"], ios=["tensor"], progress=False, calibration_masks_per_photo=1)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".json" or p.name.startswith(api.PARTIAL_PREFIX)]


@pytest.mark.parametrize("over", [True, False], ids=["over-the-budget", "within-it"])
def test_the_inventory_block_gives_back_what_it_holds_before_a_load_that_could_go_over_the_budget(tmp_path, monkeypatch,
                                                                                                 over):
    """A load of the inventory block does not always fit in what the loads before it freed (in a full default export
    the 1024x1360 fp16 file's load came on top of them: 7.3 GiB anonymous, over the 6 GiB budget). So before each load
    after the first the block asks whether what the processes hold and a load as large as the largest so far would
    together go over the budget (export.stages.StageLog.would_exceed); where so it gives back what it holds first,
    else it keeps it for the next load."""
    from export import api, backends
    from export.stages import StageLog
    from runtime_py import memory

    events, held, asked = [], [], []
    mod = _gatesim_backend([])
    mod.RUNTIME_QUANTIZED = ()

    def inventory(path, threads=1, details=None):
        held.append(np.ones(16 << 20, np.float32))  # 64 MiB touched and held to the end of the stage: its growth
        events.append("load")
        return {}

    real_give_back = memory.give_back

    def give_back():
        events.append("give back")
        return real_give_back()

    def would_exceed(self, extra_bytes):
        asked.append(extra_bytes)
        return over

    mod.inventory = inventory
    monkeypatch.setattr(memory, "give_back", give_back)
    monkeypatch.setattr(StageLog, "would_exceed", would_exceed)
    monkeypatch.setitem(sys.modules, "gatesim_backend", mod)
    monkeypatch.setitem(backends.FORMAT_MODULES, "gatesim", "gatesim_backend")
    api.export_artifacts(lively_generator("tf", 4, seed=0), tmp_path, shapes=[SHAPE, (2 * SHAPE[0], 2 * SHAPE[1])],
                         formats=["gatesim"], precisions=["fp16", "w8"], ios=["tensor"], progress=False,
                         calibration_masks_per_photo=1)
    assert events == (["load", "give back"] * 3 + ["load"] if over else ["load"] * 4), events
    # asked before the second, third and fourth load, each time with the largest growth so far: a held array
    assert len(asked) == 3 and min(asked) > 48 << 20, asked
    assert len(json.loads((tmp_path / "manifest.json").read_text())["artifacts"]) == 4
