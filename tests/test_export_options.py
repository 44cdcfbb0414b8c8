"""export.options.ExportOptions: one value from the command line or the API, checked once, recorded in the
cache key and manifest as before, and carried through the TFLite worker's JSON plan unchanged."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from export.options import ExportOptions, default_of, help_of
from runtime_py.errors import UserError


def parse_export(*flags):
    from gmcnn_mobile.cli import build_parser

    return build_parser().parse_args(["export", "--out", "x", *flags])


def test_command_line_defaults_are_the_dataclass_defaults():
    from export.cli import options_from_args

    assert options_from_args(parse_export(), None, None) == ExportOptions()


def test_every_flag_reaches_its_field():
    from export.cli import options_from_args

    args = parse_export("--shapes", "64x96", "--io", "image", "--calibration", "c", "--holdout", "h",
                        "--threads", "3", "--pad-mode", "mirror_pad", "--upsample-mode", "depth_to_space",
                        "--no-int8-tail", "--no-bias-correction", "--range-method", "auto", "--weight-rounding", "gptq",
                        "--onnx2tf-validation", "always", "--min-hole-psnr", "int8=30", "--no-cache",
                        "--keep-work", "--quiet", "--quant-fallback", "off", "--quant-fallback-limit", "3",
                        "--quant-fallback-branch-limit", "16", "--quant-fallback-prune", "0", "--memory-budget-gib", "2.5",
                        "--quant-fallback-seeds", "none", "--input-groups", "3", "--input-group-layers", "5")
    got = options_from_args(args, ("tflite",), ("int8",))
    expected = ExportOptions(
        shapes=[(64, 96)], formats=["tflite"], precisions=["int8"], ios=["image"], calibration=Path("c"),
        holdout=Path("h"), threads=3, pad_mode="mirror_pad", upsample_mode="depth_to_space", int8_tail=False,
        bias_correction=False, range_method="auto", weight_rounding="gptq", onnx2tf_validation="always",
        tolerances={("int8", "image"): {"min_hole_psnr_db": 30.0, "max_known_pixels_changed": 0}},
        use_cache=False, keep_work=True, progress=False, quant_fallback=False, fallback_limit=3, fallback_branch_limit=16,
        fallback_prune_gates=0, fallback_seeds="none", memory_budget_gib=2.5, input_groups=3, input_group_layers=5)
    assert got == expected
    changed = [f.name for f in dataclasses.fields(ExportOptions) if getattr(got, f.name) == default_of(f.name)]
    assert changed == ["calibration_masks_per_photo"]  # the one option only the API (tests) sets


def test_help_comes_from_the_dataclass():
    from gmcnn_mobile.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    helps = {a.dest: a.help for a in sub._actions}
    for name in ("shapes", "pad_mode", "upsample_mode", "range_method", "threads", "calibration", "holdout"):
        assert helps[name] == help_of(name)
    assert helps["quant_fallback"] == help_of("quant_fallback")
    assert helps["quant_fallback_limit"] == help_of("fallback_limit")
    assert helps["quant_fallback_branch_limit"] == help_of("fallback_branch_limit")
    assert helps["quant_fallback_prune"] == help_of("fallback_prune_gates")
    assert helps["quant_fallback_seeds"] == help_of("fallback_seeds")
    assert helps["input_groups"] == help_of("input_groups")
    assert helps["onnx2tf_validation"] == help_of("onnx2tf_validation")
    assert helps["input_group_layers"] == help_of("input_group_layers")
    assert help_of("int8_tail") in helps["no_int8_tail"] and help_of("progress") in helps["quiet"]


def test_json_round_trip_keeps_every_field():
    o = ExportOptions(shapes=[(64, 96)], precisions=["int8"], calibration="photos", pad_mode="mirror_pad",
                      tolerances={("int8", "image"): {"min_hole_psnr_db": 30.0}, "fp16": {"max_abs": 0.1}})
    back = ExportOptions.from_json(json.loads(json.dumps(o.to_json())))
    assert back == o and back.tolerances[("int8", "image")] == {"min_hole_psnr_db": 30.0}
    assert isinstance(back.calibration, Path) and back.shapes == ((64, 96),)


def test_recorded_options_are_the_cache_keys_and_manifests_before_issue_16():
    """The per-artifact options a cache key and a manifest entry's build record hold, as export_artifacts
    wrote them before the dataclass (same keys, same order, same values)."""
    o = ExportOptions()
    assert list(o.recorded(calibrated=False).items()) == [("pad_mode", "slices"), ("upsample_mode", "resize"),
                                                          ("int8_tail", True)]
    assert list(o.recorded(calibrated=True).items())[-1] == ("range_method", "minmax")
    assert ExportOptions(int8_tail=0).recorded(False)["int8_tail"] is False


def test_the_fallback_setting_is_recorded_where_it_changed_the_file():
    """A file that passed as converted is the same with the fallback on or off: reused under either.
    A file the fallback made records the setting and is reused only under the same one."""
    o = ExportOptions()
    assert "quant_fallback" not in o.recorded(calibrated=True)
    made = {**o.recorded(calibrated=True), **o.fallback_recorded()}
    assert made["quant_fallback"] is True and made["fallback_limit"] == default_of("fallback_limit")
    assert o.reuses(o.recorded(calibrated=True)) and ExportOptions(quant_fallback=False).reuses(o.recorded(True))
    assert o.reuses(made)
    assert not ExportOptions(quant_fallback=False).reuses(made) and not ExportOptions(fallback_limit=2).reuses(made)
    assert made["fallback_branch_limit"] == 33 and not ExportOptions(fallback_branch_limit=14).reuses(made)
    assert made["fallback_prune_gates"] == 12 and not ExportOptions(fallback_prune_gates=0).reuses(made)
    # the input channel groups are int8-dynamic's alone: another precision's fallback file is reused whatever they are
    dynamic = {**o.recorded(calibrated=False), **o.fallback_recorded("int8-dynamic")}
    assert dynamic["input_groups"] == 2 and not ExportOptions(input_groups=1).reuses(dynamic, "int8-dynamic")
    full = {**o.recorded(calibrated=True), **o.fallback_recorded("int8")}
    assert "input_groups" not in full and ExportOptions(input_groups=1).reuses(full, "int8")


@pytest.mark.parametrize("change, words", [
    (dict(ios=["nchw"]), "unknown I/O signature 'nchw'"), (dict(shapes=[]), "no shapes given"),
    (dict(threads=0), "threads must be >= 1"), (dict(pad_mode="reflect"), "unknown pad mode 'reflect'"),
    (dict(upsample_mode="bilinear"), "unknown upsample mode"), (dict(range_method="kl"), "unknown range method"),
    (dict(onnx2tf_validation="never"), "unknown onnx2tf validation 'never'"),
    (dict(calibration_masks_per_photo=0), "calibration masks per photo"),
    (dict(fallback_limit=0), "fallback limit must be at least 1 layer"),
    (dict(fallback_branch_limit=0), "branch limit must be at least 1 layer"),
    (dict(fallback_prune_gates=-1), "pruning candidates must be 0 or more"),
])
def test_bad_options_are_refused_when_built(change, words):
    with pytest.raises(UserError, match=words):
        ExportOptions(**change)
    with pytest.raises(UserError, match=words):  # a changed copy is checked the same way
        dataclasses.replace(ExportOptions(), **change)


def test_options_are_one_frozen_value():
    o = ExportOptions(ios=["tensor", "tensor", "image"])
    assert o.ios == ("tensor", "image")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.threads = 8
