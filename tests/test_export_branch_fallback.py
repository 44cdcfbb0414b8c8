"""The fallback's branch phase (export.fallback, phase 3) on a tiny generator with a planted branch-wide error.

Every convolution of the second branch after its first reads, on its input channel 0, one tap 40x larger than
any other weight of the same output channel; the layer before gives that channel almost nothing (its filter
scaled by 1e-3, no bias), so in float the tap costs little, but 8-bit weights with one scale per output channel
spread that scale over the tap and round every other weight of the branch to a few levels. The error then builds
up along the whole branch, as the shipped model's does at 1024x1360 under Core ML w8 (docs/TOLERANCES.md): no two
layers kept float reach the gate (PyTorch simulation, 2 held-out samples: every weight rounded 20.1 dB, the 2 top
local-SNR layers kept float 20.2 dB, even the 11 top 34.3 dB), the whole second branch kept float 49.8 dB.

The format is a stand-in (``w8sim``) that costs no converter: a "file" is the JSON list of convolutions kept
float; running it is the PyTorch generator with every other convolution's weights rounded to int8 per output
channel, activations float32, which is what Core ML w8 does to a network's weights (its real keep-float lever is
tested in test_coreml_export.py, the TFLite ones in test_export_quant_fallback.py). So this tests the driver:
the phases, their order, the simulation, the early stop, the record.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import lively_generator

SHAPE = (64, 96)
TAP = 40.0


def planted_generator():
    import torch

    from models.gmcnn import conv_branches

    gen = lively_generator("tf", 4, 0, weight_gain=1.2, bias_std=0.05)
    convs = dict(gen.named_modules())
    b2 = conv_branches(gen)["b2"]
    with torch.no_grad():
        for before, name in zip(b2, b2[1:]):
            convs[before].weight[0] *= 1e-3
            convs[before].bias[0] = 0.0
            w = convs[name].weight
            w[:, 0, 0, 0] = TAP * w.abs().amax(dim=(1, 2, 3))
    return gen


def _w8sim_backend():
    """A format module (export.backends' interface) whose files are weight-rounding simulations."""
    from runtime_py.tolerances import COREML_PARITY

    mod = types.ModuleType("w8sim_backend")
    mod.NAME, mod.SUFFIX, mod.PRECISIONS, mod.EXTRA = "w8sim", ".json", ("w8",), "export"
    mod.FALLBACK_PRECISIONS, mod.PARITY_TOLERANCES = ("w8",), COREML_PARITY
    mod.generators = {}

    def convert(job):
        Path(job.out).write_text(json.dumps({"keep_float": list(job.extra.get("keep_float") or ())}))
        mod.generators[str(job.out)] = job.generator
        return job.out

    def run(path, io, samples, threads=2):
        import torch

        from export.activations import _round_weights_int8

        gen = mod.generators[str(path)]  # gated under the name it was converted to
        kept = set(json.loads(Path(path).read_text())["keep_float"])
        convs = {n: m for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d) and n not in kept}
        saved = {n: m.weight.data for n, m in convs.items()}
        x = torch.from_numpy(samples.tensor_image()).permute(0, 3, 1, 2)
        m = torch.from_numpy(samples.tensor_mask()).permute(0, 3, 1, 2)
        try:
            with torch.no_grad():
                for conv in convs.values():
                    conv.weight.data = _round_weights_int8(conv.weight.data)
                out = gen(x, m).permute(0, 2, 3, 1).numpy()
        finally:
            for n, w in saved.items():
                convs[n].weight.data = w
        return out.astype(np.float32), "pytorch fp32, weights rounded to int8 (test stand-in)"

    def quantization_summary(path, precision, details=None):
        return {"float_convs": json.loads(Path(path).read_text())["keep_float"]}

    mod.check_available = lambda: None
    mod.convert, mod.run, mod.quantization_summary = convert, run, quantization_summary
    mod.describe = lambda path, io, shape=None: ([], [])
    mod.inventory = lambda path, threads=1, details=None: {}
    return mod


@pytest.fixture
def w8sim(monkeypatch):
    from export import backends

    monkeypatch.setitem(sys.modules, "w8sim_backend", _w8sim_backend())
    monkeypatch.setitem(backends.FORMAT_MODULES, "w8sim", "w8sim_backend")


def test_a_branch_wide_error_passes_with_the_branch_kept_float(w8sim, tmp_path, monkeypatch):
    """Phase 1 holds only the cheapest convolution (its MAC budget lowered to that), phase 2 the 2 top-ranked
    (the limit), neither enough; the branch phase keeps the second branch float and passes."""
    from export import api, fallback
    from models.gmcnn import conv_branches, conv_layers

    gen = planted_generator()
    macs = [layer["macs"] for layer in conv_layers(gen, *SHAPE)]
    monkeypatch.setattr(fallback, "FLOAT_MAC_BUDGET", 1.5 * min(macs) / sum(macs))
    m = api.export_artifacts(gen, tmp_path, shapes=[SHAPE], formats=["w8sim"], precisions=["w8"], ios=["tensor"],
                             fallback_limit=2, progress=False, calibration_masks_per_photo=1)
    a = m.find("w8sim", SHAPE, "w8", "tensor")
    fb = a.build["quantization"]["fallback"]
    br = fb["branches"]
    b2 = conv_branches(gen)["b2"]
    gate = a.parity.tolerance["min_hole_psnr_db"]
    assert a.parity.passed and a.parity.samples == 4
    assert fb["pure_file"]["hole_psnr_db"] < gate - 10
    # phase 1 (at most 2 layers, as limited) failed; the simulation put the second phase's largest candidate
    # under the gate and the second branch first, so the branch phase went first and passed with b2 alone
    assert [r["branch"] for r in br["ranking"]][0] == "b2" and br["ranking"][0]["layers"] == 14
    assert br["ranking"][0]["hole_psnr_db"] < gate < br["ranking"][1]["hole_psnr_db"]
    assert br["phase_2_predicted_hole_psnr_db"] < gate and br["order"] == [3, 2] and br["limit"] == 22
    assert fb["phase"] == 3 and br["kept_float"] == ["b2"]
    assert [k["layer"] for k in fb["layers_kept_float"]] == b2 and fb["limit"] == 2
    assert json.loads((tmp_path / a.file).read_text())["keep_float"] == b2  # the file is the candidate's
    phases = [c["phase"] for c in fb["search"]]
    assert phases == [1] * (len(phases) - 1) + [3] and len(phases) >= 2  # phase 2 never gated
    # each failing candidate stopped at the first held-out sample it failed; the winner ran them all
    assert all(c["samples"] == 1 and not c["passed"] for c in fb["search"][:-1])
    assert fb["search"][-1] == {"phase": 3, "layers": 14, "inputs_float": False, "branches": 1,
                                "hole_psnr_db": a.parity.hole_psnr_db, "samples": a.parity.samples, "passed": True}
    assert a.parity.hole_psnr_db >= gate + 10
    # every key the record writes is documented
    from test_export_manifest import DOC

    section = DOC.read_text().split("## `build.quantization`", 1)[1].split("\n## ", 1)[0]
    written = {k for part in (fb, br, *br["ranking"], *fb["search"]) for k in part}
    assert all(f"`{k}`" in section or f'"{k}"' in section for k in written), written


def test_the_branch_phase_takes_branches_that_fit_its_limit_most_costly_first():
    from export.fallback import BRANCH_PHASE, after_first, branch_phase, phases

    branches = {"b1": ["a1", "a2", "a3"], "b2": ["c1", "c2", "c3", "c4", "c5"], "b3": ["d1", "d2"], "merge": ["m"]}
    scores = {"b1": 30.0, "b2": 20.0, "b3": 45.0, "merge": 50.0}
    ph = branch_phase(scores, branches, 6)
    # b2 (5 layers) first, b1 (3 more) passed over, then b3 would make 7: passed over; merge fits
    assert ph.number == BRANCH_PHASE and [b for b, _, _ in ph.branches] == ["b2", "merge"] and ph.size == 2
    assert ph.kept(1) == branches["b2"] and ph.kept(2) == branches["b2"] + ["m"]
    assert branch_phase(scores, branches, 20).kept(4) == [*branches["b2"], *branches["b1"], "d1", "d2", "m"]
    assert branch_phase({"b1": 30.0}, {"b1": ["x", "y"]}, 1) is None  # no branch fits
    # the order after phase 1: the branches first only where phase 2's largest candidate is predicted to fail
    second = phases([("a1", 30.0), ("c1", 31.0)], {"a1": 50, "c1": 50}, 2, False, 0.1)
    assert [p.number for p in second] == [2]
    assert [p.number for p in after_first(second, ph, 35.0, 38.0)] == [3, 2]
    assert [p.number for p in after_first(second, ph, 38.0, 38.0)] == [2, 3]
    assert [p.number for p in after_first(second, ph, None, 38.0)] == [2, 3]
    assert [p.number for p in after_first([], None, 20.0, 38.0)] == []


def test_the_simulation_is_a_forward_with_those_weights_rounded():
    """rounded_hole_psnr replays the float outputs of what no rounded layer reaches; the result is the plain
    forward's with the config's weights rounded (and a config of nothing loses nothing)."""
    import torch

    from export.activations import _hole_psnr, _network_batch, _round_weights_int8, rounded_hole_psnr
    from export.samples import HOLDOUT_DIR, load_samples
    from models.gmcnn import conv_branches

    gen = planted_generator()
    s = load_samples(HOLDOUT_DIR, SHAPE, 1, seed=2)
    s = s.subset([0])
    b2 = conv_branches(gen)["b2"]
    got = rounded_hole_psnr(gen, s.images, s.masks, {"b2": b2, "tail": b2[-3:], "none": []}, rounded=("weights",))
    convs = dict(gen.named_modules())
    x, m = _network_batch(s.images, s.masks)
    with torch.no_grad():
        ref = gen(x, m)
        for config, layers in (("b2", b2), ("tail", b2[-3:])):
            saved = {n: convs[n].weight.data for n in layers}
            for n in layers:
                convs[n].weight.data = _round_weights_int8(saved[n])
            y = gen(x, m)
            for n in layers:
                convs[n].weight.data = saved[n]
            assert got[config] == [pytest.approx(_hole_psnr(y, ref, m > 0), abs=1e-9)]
    assert got["none"] == [100.0] and got["b2"][0] < 25.0 < got["tail"][0]
