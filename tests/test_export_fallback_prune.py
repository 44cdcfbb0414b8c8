"""The fallback's pruning (export.fallback.prune, phase 4): a passing candidate's float convolutions go back to
quantization, most MACs first, while the file still passes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from test_export_branch_fallback import SHAPE, export_planted, planted_generator, stopping, w8sim  # noqa: F401 (a fixture)


def _needs(*needed):
    """A stand-in gate that passes while every layer of ``needed`` is still float, and records each call."""
    calls = []

    def passes(left):
        calls.append(list(left))
        return set(needed) <= set(left)

    return passes, calls


def test_prune_keeps_exactly_the_layers_the_gate_needs():
    from export.fallback import prune

    layers = list("abcdefgh")
    passes, calls = _needs("c", "f")
    left, tried = prune(layers, layers, passes, max_candidates=50)
    assert left == ["c", "f"] and tried == len(calls)
    assert all(c for c in calls)  # never the empty set (the pure file, which failed)
    # the first candidate takes half the layers out at once: with a and b..d out it fails (c is needed)
    assert calls[0] == list("efgh")


def test_prune_stops_after_its_candidates_and_keeps_what_passed_last():
    from export.fallback import prune

    layers = list("abcdefgh")
    passes, calls = _needs("h")
    left, tried = prune(layers, layers, passes, max_candidates=1)
    assert tried == 1 == len(calls) and left == list("efgh")  # a..d went in the one candidate it could try
    left, tried = prune(layers, layers, _needs("a", "h")[0], max_candidates=0)
    assert left == layers and tried == 0


def test_prune_follows_the_order_it_is_given_and_returns_the_layers_in_their_own():
    from export.fallback import prune

    passes, calls = _needs("b")
    left, _ = prune(["a", "b", "c"], ["c", "b", "a"], passes, max_candidates=10)
    assert left == ["b"]
    assert calls[0] == ["a", "b"]  # c first (the order's first half, rounded down to one layer)
    passes, _ = _needs()
    left, _ = prune(["a", "b", "c"], ["c", "b", "a"], passes, max_candidates=10)
    assert len(left) == 1  # everything passes, but one layer always stays: none at all is the pure file


def test_move_to_front():
    from export.fallback import move_to_front

    assert move_to_front([2, 0, 3, 1], 3) == [3, 2, 0, 1] and move_to_front([2, 0], 2) == [2, 0]


def test_prune_order_takes_the_costliest_layers_first_and_the_least_sensitive_among_equals():
    from export.fallback import prune_order

    macs = {"a": 10, "b": 30, "c": 30, "d": 5}
    snr = {"a": 20.0, "b": 12.0, "c": 40.0, "d": float("nan")}
    assert prune_order(["a", "b", "c", "d"], macs, snr) == ["c", "b", "a", "d"]


def test_a_branch_kept_float_is_pruned_to_the_layers_the_file_needs(w8sim, tmp_path, monkeypatch):  # noqa: F811
    """The planted second branch (test_export_branch_fallback) passes kept float whole, with a wide margin; pruning
    quantizes some of its convolutions again, keeps the file over its gate and records every candidate."""
    from export import api, fallback
    from models.gmcnn import conv_branches, conv_layers

    gen = planted_generator()
    macs = {layer["name"]: layer["macs"] for layer in conv_layers(gen, *SHAPE)}
    monkeypatch.setattr(fallback, "FLOAT_MAC_BUDGET", 1.5 * min(macs.values()) / sum(macs.values()))
    fronts = []
    real_front = fallback.move_to_front

    def spy(order, sample):
        fronts.append((list(order), sample))
        return real_front(order, sample)

    monkeypatch.setattr(fallback, "move_to_front", spy)
    m = api.export_artifacts(gen, tmp_path, shapes=[SHAPE], formats=["w8sim"], precisions=["w8"], ios=["tensor"],
                             fallback_limit=2, fallback_prune_gates=8, progress=False, calibration_masks_per_photo=1)
    a = m.find("w8sim", SHAPE, "w8", "tensor")
    fb = a.build["quantization"]["fallback"]
    b2 = conv_branches(gen)["b2"]
    gate = a.parity.tolerance["min_hole_psnr_db"]
    kept = [k["layer"] for k in fb["layers_kept_float"]]
    pr = fb["pruning"]
    assert a.parity.passed and a.parity.hole_psnr_db >= gate and a.parity.samples == 4
    assert fb["phase"] == fallback.PRUNE_PHASE and pr["from_phase"] == fallback.BRANCH_PHASE
    assert pr["from_layers"] == len(b2) and pr["max_candidates"] == 8 and 1 <= pr["candidates"] <= 8
    assert set(kept) < set(b2) and sorted(kept + pr["quantized_again"]) == sorted(b2)
    assert json.loads((tmp_path / a.file).read_text())["keep_float"] == kept  # the file is the pruned candidate's
    assert a.build["fallback_prune_gates"] == 8
    pruning = [c for c in fb["search"] if c["phase"] == fallback.PRUNE_PHASE]
    assert 1 <= len(pruning) <= pr["candidates"]
    passed = [c for c in pruning if c["passed"]]
    assert passed and passed[-1]["layers"] == len(kept) and passed[-1]["hole_psnr_db"] == a.parity.hole_psnr_db
    # each candidate that passed kept fewer layers float than the one before it
    assert all(x["layers"] > y["layers"] for x, y in zip(passed, passed[1:]))
    # a failing one stopped at the sample it failed, most often the first: the one the branch candidate came
    # closest to failing on
    failed = [c for c in pruning if not c["passed"]]
    assert failed and all(c["hole_psnr_db"] < gate for c in failed) and failed[0]["samples"] == 1
    # after each failing candidate the sample it failed on goes first, and the next candidate gates in that order
    assert len(fronts) == len(failed) and sorted(fronts[0][0]) == [0, 1, 2, 3]
    assert all(after[0][0] == before[1] for before, after in zip(fronts, fronts[1:]))
    assert all(order[c["samples"] - 1] == sample for (order, sample), c in zip(fronts, failed))
    # the costliest convolutions went first: none left float costs more than every one quantized again
    assert max(macs[n] for n in pr["quantized_again"]) >= max(macs[n] for n in kept)
    assert a.build["quantization"].get("float_convs") == kept
    # the candidates that lost are gone
    assert sorted(p.name for p in tmp_path.glob("*.json") if p.name.startswith("gmcnn")) == [a.file]


def test_pruning_off_keeps_the_search_s_candidate(w8sim, tmp_path, monkeypatch):  # noqa: F811
    from export import fallback
    from models.gmcnn import conv_branches

    gen, m = export_planted(tmp_path, monkeypatch, prune_gates=0)
    fb = m.find("w8sim", SHAPE, "w8", "tensor").build["quantization"]["fallback"]
    assert fb["phase"] == fallback.BRANCH_PHASE and "pruning" not in fb
    assert [k["layer"] for k in fb["layers_kept_float"]] == conv_branches(gen)["b2"]



def test_a_pruning_candidate_runs_each_copy_after_its_sample_and_the_next_one_starts_where_it_failed(
        tmp_path, monkeypatch):
    """The planted file again, now rounding at run time (its backend's ``RUNTIME_QUANTIZED``), so that a passing
    candidate runs the nudged copies too. From the pruning on, the copy of one sample (the last of the first pruning
    candidate's order) fails whenever the costliest convolution of the pruning's order is quantized again. Each
    pruning candidate runs every copy right after its sample; the first that fails there stops after that copy,
    that sample goes first, and the next candidate failing on it stops after two inferences."""
    from export import backends, fallback
    from test_export_branch_fallback import _w8sim_backend

    mod = _w8sim_backend()
    mod.RUNTIME_QUANTIZED = ("w8",)
    plain_run = mod.run
    planted, runs = {}, []  # planted: the layer and the sample; runs: (names fed, how many ran) from the pruning on

    def run(path, io, samples, threads=2, keep_going=None):
        out, executor = plain_run(path, io, samples, threads)
        if "layer" not in planted:
            return stopping(out, keep_going), executor
        plain = [n for n in samples.names if not n.endswith("~nudged")]
        planted.setdefault("sample", plain[-1])
        if planted["layer"] not in json.loads(Path(path).read_text())["keep_float"]:
            bad = [j for j, n in enumerate(samples.names) if n == planted["sample"] + "~nudged"]
            out[bad] = np.clip(out[bad] + 0.5, -1, 1)
        out = stopping(out, keep_going)
        runs.append((list(samples.names), len(out)))
        return out, executor

    real_order = fallback.prune_order

    def prune_order(*args):
        order = real_order(*args)
        planted["layer"] = order[0]
        return order

    mod.run = run
    monkeypatch.setitem(sys.modules, "w8sim_backend", mod)
    monkeypatch.setitem(backends.FORMAT_MODULES, "w8sim", "w8sim_backend")
    monkeypatch.setattr(fallback, "prune_order", prune_order)
    _, m = export_planted(tmp_path, monkeypatch, prune_gates=8)
    a = m.find("w8sim", SHAPE, "w8", "tensor")
    fb = a.build["quantization"]["fallback"]
    n = 4
    assert a.parity.passed and a.parity.samples == 2 * n and a.parity.details["nudged"]["samples"] == n
    assert planted["layer"] in [k["layer"] for k in fb["layers_kept_float"]]
    assert fb["pruning"]["quantized_again"]  # others could go
    assert runs and all(names[1::2] == [x + "~nudged" for x in names[0::2]] for names, _ in runs)  # in pairs
    copy = planted["sample"] + "~nudged"
    on_copy = [(names, ran) for names, ran in runs if names[ran - 1] == copy]
    assert len(on_copy) >= 2
    (names, ran), rest = on_copy[0], on_copy[1:]
    assert ran == 2 * n and names[0] != planted["sample"]  # the last sample's copy: after every other pair
    assert all(names[0] == planted["sample"] and ran == 2 for names, ran in rest)
    # the record counts what each ran: samples and copies
    ran_by_failed = [c["samples"] for c in fb["search"] if c["phase"] == fallback.PRUNE_PHASE and not c["passed"]]
    stopped = [ran for names, ran in runs if ran < len(names) or names[ran - 1] == copy]
    assert sorted(ran_by_failed) == sorted(stopped)
