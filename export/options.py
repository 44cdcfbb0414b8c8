"""The export's options as one value: :class:`ExportOptions`.

Defaults and help text are stated here once. ``gmcnn-mobile export`` builds one value from its flags
(export/cli.py takes each flag's default and help from :func:`help_of` / the dataclass), the Python
API builds one from its keyword arguments (:func:`export.api.export_artifacts`), and the value
travels whole: into the planning (the options each artifact's cache key and manifest entry
record: :meth:`ExportOptions.recorded`), the backends (``ConvertJob.options``) and, as JSON, the
TFLite worker's plan (:meth:`ExportOptions.to_json` / :meth:`ExportOptions.from_json`).
Constructing one checks it (:class:`runtime_py.errors.UserError`, one line); what needs the
backends (formats, precisions) or the model (shapes allowed for a variant) is checked by the
export when it plans.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

from runtime_py.errors import UserError

from .fallback import DEFAULT_BRANCH_LIMIT as FALLBACK_BRANCH_LIMIT
from .fallback import DEFAULT_LIMIT as FALLBACK_LIMIT
from .fallback import DEFAULT_PRUNE_GATES as FALLBACK_PRUNE_GATES
from .quant_ranges import METHODS

DEFAULT_SHAPES: Tuple[Tuple[int, int], ...] = ((512, 680), (1024, 1360))
IOS = ("tensor", "image")
# How reflection padding and 2x nearest upsampling are spelled in a TFLite file (export/tflite_graph.py,
# docs/EXPORT.md). Defaults from measurement: MIRROR_PAD leaves XNNPACK and costs the torch variant
# ~30 % of its speed, so pads become slices; the 3 nearest resizes outside XNNPACK cost nothing
# measurable here, so they stay (depth_to_space moves them in, for delegates that need it).
PAD_MODES = ("slices", "mirror_pad")
UPSAMPLE_MODES = ("resize", "depth_to_space")
RANGE_METHODS = (METHODS[0], "auto") + METHODS[1:]  # the default first
# nearest first (the default): gptq lifts the shipped model's every-weight-int8 simulation from 38.9 to 53.0 dB, but
# its files gained 0.6 dB (int8-dynamic) or lost 0.3-0.6 dB (int8) and their fallback kept no fewer layers float
# (docs/TOLERANCES.md, "Error-compensating weight rounding")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
# onnx2tf's validation run: only where an op of the graph could read it (export.onnx2tf_validation), or always
ONNX2TF_VALIDATIONS = ("auto", "always")
# The input-grouped fallback candidate of a TFLite int8-dynamic file (export.input_groups): 2 groups on every
# convolution passed at 512x680 on default model v2, 1.12-1.17x the pure file's latency; 4 cost 1.46x
# (docs/TOLERANCES.md, "Input channel groups for int8-dynamic (2026-12-06)").
INPUT_GROUPS = 2
INPUT_GROUP_LAYERS = 44
CALIBRATION_MASKS_PER_PHOTO = 3
# where the fallback's seeds from an earlier export come from (export.fallback.seeds_from_manifest)
SEEDS_AUTO, SEEDS_NONE = "auto", "none"
# Issue 17: a full default export on a laptop-sized CI runner (8 GiB) leaves room for the rest of the machine.
DEFAULT_MEMORY_BUDGET_GIB = 6.0


def default_threads() -> int:
    """Threads for LiteRT (parity runs, calibration): the cores, at most 4 (what a phone's big cores give)."""
    return max(1, min(4, os.cpu_count() or 1))


def _opt(default=None, help: str = "", factory=None):
    meta = {"help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


ToleranceKey = Union[str, Tuple[str, str]]


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export is asked to do besides the checkpoint and the output folder."""

    shapes: Tuple[Tuple[int, int], ...] = _opt(
        DEFAULT_SHAPES, "comma-separated ROWSxCOLS model shapes (multiples of 4; torch variant: sides >= 200)")
    formats: Optional[Tuple[str, ...]] = _opt(
        None, "formats; None: every format whose backend is installed")
    precisions: Optional[Tuple[str, ...]] = _opt(
        None, "precisions; None: all each format makes by default")
    ios: Tuple[str, ...] = _opt(IOS, "comma-separated I/O signatures: tensor, image")
    calibration: Optional[Path] = _opt(
        None, "folder of photos for int8 calibration (default: the bundled export/photos/calibration)")
    holdout: Optional[Path] = _opt(
        None, "folder of photos for the parity gate (default: the bundled export/photos/holdout)")
    threads: int = _opt(help="LiteRT threads for the parity runs and calibration (by default the cores, at most 4)",
                        factory=default_threads)
    pad_mode: str = _opt(
        "slices", "TFLite reflection pads (torch variant): SLICE+CONCATENATION ops XNNPACK runs, or one MIRROR_PAD")
    upsample_mode: str = _opt(
        "resize", "TFLite 2x nearest upsampling: RESIZE_NEAREST_NEIGHBOR (outside XNNPACK, as fast here), "
                  "or CONCATENATION+DEPTH_TO_SPACE (all in XNNPACK)")
    int8_tail: bool = _opt(True, "move the float resize/concatenation tail of int8 files into int8")
    # auto is not the default: lower per-tensor errors did not give a better file end to end (docs/TOLERANCES.md)
    range_method: str = _opt(
        "minmax", "activation ranges of calibrated TFLite files (int8, int16x8): the observed min/max, per "
                  "tensor the method that quantizes held-out calibration samples best (auto), or one method "
                  "for every tensor")
    bias_correction: bool = _opt(
        True, "int8-dynamic: correct each int8 convolution's bias for the mean output shift its rounded weights "
              "cause (the rounding error times the mean of each input channel over the calibration samples)")
    weight_rounding: str = _opt(
        WEIGHT_ROUNDINGS[0], "how TFLite int8 and int8-dynamic files round their convolution weights to int8: "
                             "nearest (the converter's own rounding) or gptq (each output channel's rounding errors "
                             "moved onto its weights not rounded yet, weighted by how the layer's inputs on the "
                             "calibration photos correlate; the same grid)")
    onnx2tf_validation: str = _opt(
        ONNX2TF_VALIDATIONS[0], "onnx2tf's validation run (ONNX Runtime over the whole graph, every intermediate "
                                "value kept, for its handlers that resolve a layout the shapes leave ambiguous): "
                                "auto runs it only where an op of the graph is such a case (none in GMCNN's graphs "
                                "at a shape with rows != columns: the same graphs without it), always runs it")
    quant_fallback: bool = _opt(
        True, "when a quantized file (TFLite int8, int8-dynamic, int16x8; Core ML w8) misses its parity gate, keep "
              "its most sensitive layers in float, the fewest that pass (the manifest lists them and their price); "
              "off: fail it as is")
    fallback_limit: int = _opt(
        FALLBACK_LIMIT, f"the most layers the fallback may keep in float before the file fails "
                        f"({FALLBACK_LIMIT}: a quarter of GMCNN's 44 convolutions)")
    fallback_branch_limit: int = _opt(
        FALLBACK_BRANCH_LIMIT, f"when the per-layer candidates up to the fallback limit fail: the most layers the "
                               f"fallback's branch phase may keep in float, whole branches of the network taken "
                               f"most costly first ({FALLBACK_BRANCH_LIMIT}: three quarters of GMCNN's 44 "
                               f"convolutions; the shipped model at 1024x1360 needs b2, b3 and the merge, 32)")
    fallback_prune_gates: int = _opt(
        FALLBACK_PRUNE_GATES, "once a fallback candidate passes: how many smaller candidates (its float layers "
                              "quantized again, most MACs first, while the file still passes) the fallback may "
                              "convert and gate; 0: keep the candidate the search found")
    fallback_seeds: str = _opt(
        SEEDS_AUTO, f"where the fallback of the first file of each kind (format, shape, precision) first gates the "
                    f"layers a file of its kind kept float in an earlier export, before any search of its own: "
                    f"{SEEDS_AUTO} (the manifest a previous run left in the export folder, unless the cache is "
                    f"off; else the checkpoint's STEM.fallback-seeds.json beside it, which the shipped model has), "
                    f"an export folder, its manifest.json or a *.fallback-seeds.json file, or {SEEDS_NONE}")
    input_groups: int = _opt(
        INPUT_GROUPS, "when a TFLite int8-dynamic file (tf variant) misses its parity gate and no fallback candidate "
                      "within its MAC budget passes, the next candidate keeps every convolution int8 and splits the "
                      "inputs of its --input-group-layers most sensitive convolutions into up to this many channel "
                      "groups, each rounded to its own run-time int8 grid; 1: never")
    input_group_layers: int = _opt(
        INPUT_GROUP_LAYERS, "how many convolutions --input-groups splits, most sensitive first (the fallback's "
                            "ranking; 44: every one GMCNN has)")
    tolerances: Optional[Mapping[ToleranceKey, Dict[str, float]]] = _opt(
        None, "overrides of the parity gate's rows (runtime_py.tolerances.PARITY), keyed by precision or "
              "(precision, io) (tests use it to force a failure; the command line's --min-hole-psnr)")
    calibration_masks_per_photo: int = _opt(
        CALIBRATION_MASKS_PER_PHOTO, "int8 calibration samples per calibration photo (mask kinds and sizes "
                                     "cycle); tests lower it to save time")
    use_cache: bool = _opt(True, "reuse an up-to-date artifact instead of converting it again")
    keep_work: bool = _opt(False, "keep DIR/.work (ONNX, saved_model, logs) after success")
    memory_budget_gib: float = _opt(
        DEFAULT_MEMORY_BUDGET_GIB, "peak anonymous memory (what the system cannot reclaim without swap; not "
                                   "mapped files) the export's processes may use together, GiB: the TFLite worker "
                                   "and the Core ML conversions and gates run side by side only when their "
                                   "estimated peaks fit in it together, else one after the other; int8 calibration "
                                   "measures the graph in groups of ops, one pass over the samples each, when one "
                                   "pass would not fit in what the budget leaves (the report at the end gives each "
                                   "stage's measured resident and anonymous peaks)")
    progress: bool = _opt(True, "show progress (stage lines and a bar on stderr)")

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        try:
            set_("shapes", tuple((int(r), int(c)) for r, c in self.shapes))
        except (TypeError, ValueError):
            raise UserError(f"shapes must be (rows, cols) pairs, got {self.shapes!r}") from None
        for name in ("formats", "precisions"):
            value = getattr(self, name)
            if value is not None:
                set_(name, tuple(dict.fromkeys(value)) if name == "formats" else tuple(value))
        set_("ios", tuple(dict.fromkeys(self.ios)))
        for name in ("calibration", "holdout"):
            if getattr(self, name) is not None:
                set_(name, Path(getattr(self, name)))
        set_("int8_tail", bool(self.int8_tail))
        set_("quant_fallback", bool(self.quant_fallback))
        set_("bias_correction", bool(self.bias_correction))
        set_("fallback_seeds", SEEDS_NONE if self.fallback_seeds is None else str(self.fallback_seeds))
        if self.tolerances is not None:
            set_("tolerances", dict(self.tolerances))
        self._check()

    def _check(self) -> None:
        for io in self.ios:
            if io not in IOS:
                raise UserError(f"unknown I/O signature {io!r}; choose from {', '.join(IOS)}")
        if not self.shapes:
            raise UserError("no shapes given")
        if self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if self.fallback_limit < 1:
            raise UserError(f"the fallback limit must be at least 1 layer, got {self.fallback_limit!r}")
        if self.fallback_branch_limit < 1:
            raise UserError(f"the fallback's branch limit must be at least 1 layer, got {self.fallback_branch_limit!r}")
        if self.fallback_prune_gates < 0:
            raise UserError(f"the fallback's pruning candidates must be 0 or more, got {self.fallback_prune_gates!r}")
        if not self.fallback_seeds:
            raise UserError(f"the fallback's seeds: give {SEEDS_AUTO}, {SEEDS_NONE} or an export folder")
        if self.input_groups < 1:
            raise UserError(f"input groups must be 1 (none) or more, got {self.input_groups!r}")
        if self.input_group_layers < 1:
            raise UserError(f"input group layers must be at least 1, got {self.input_group_layers!r}")
        if not self.memory_budget_gib > 0:
            raise UserError(f"the memory budget must be a positive number of GiB, got {self.memory_budget_gib!r}")
        if self.calibration_masks_per_photo < 1:
            raise UserError(f"calibration masks per photo must be >= 1, got {self.calibration_masks_per_photo}")
        choices = {"pad mode": (self.pad_mode, PAD_MODES), "upsample mode": (self.upsample_mode, UPSAMPLE_MODES),
                   "range method": (self.range_method, RANGE_METHODS),
                   "weight rounding": (self.weight_rounding, WEIGHT_ROUNDINGS),
                   "onnx2tf validation": (self.onnx2tf_validation, ONNX2TF_VALIDATIONS)}
        for what, (value, allowed) in choices.items():
            if value not in allowed:
                raise UserError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")

    # ------------------------------------------------------------------ derived
    @property
    def calibration_dir(self) -> Path:
        from .samples import CALIBRATION_DIR

        return self.calibration if self.calibration is not None else CALIBRATION_DIR

    @property
    def holdout_dir(self) -> Path:
        from .samples import HOLDOUT_DIR

        return self.holdout if self.holdout is not None else HOLDOUT_DIR

    def recorded(self, calibrated: bool, bias_corrected: bool = False, weights_rounded: bool = False) -> Dict[str, object]:
        """The options that shape one artifact's file: part of its cache key and of its manifest entry's
        ``build`` (``range_method`` only for precisions calibrated on photos, ``bias_correction`` only for
        those the backend corrects, ``weight_rounding`` only for those whose weights it rounds)."""
        out: Dict[str, object] = {"pad_mode": self.pad_mode, "upsample_mode": self.upsample_mode,
                                  "int8_tail": self.int8_tail}
        if calibrated:
            out["range_method"] = self.range_method
        if bias_corrected:
            out["bias_correction"] = self.bias_correction
        if weights_rounded:
            out["weight_rounding"] = self.weight_rounding
        return out

    def fallback_recorded(self, precision: Optional[str] = None) -> Dict[str, object]:
        """The fallback setting, recorded in the manifest entry (``build``) of a file the fallback made:
        it changed that file. A file that passed its gate as converted is the same with the fallback
        on or off, so neither its cache key nor its entry records it. The input channel groups only for
        ``int8-dynamic`` (or with no ``precision``), the one precision they apply to."""
        out: Dict[str, object] = {"quant_fallback": self.quant_fallback, "fallback_limit": self.fallback_limit,
                                  "fallback_branch_limit": self.fallback_branch_limit,
                                  "fallback_prune_gates": self.fallback_prune_gates}
        if precision in (None, "int8-dynamic"):
            out.update(input_groups=self.input_groups, input_group_layers=self.input_group_layers)
        return out

    def reuses(self, build: Mapping[str, object], precision: Optional[str] = None) -> bool:
        """Whether an up-to-date file of ``precision`` whose manifest entry has ``build`` is what these options
        make: a file the fallback made only under the same fallback setting."""
        recorded = self.fallback_recorded(precision)
        made = {k: build[k] for k in recorded if k in build}
        return not made or made == recorded

    # ------------------------------------------------------------------ JSON (the TFLite worker's plan)
    def to_json(self) -> Dict[str, object]:
        out: Dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif f.name == "shapes":
                value = [list(s) for s in value]
            elif f.name == "tolerances" and value is not None:
                value = [[list(k) if isinstance(k, tuple) else k, row] for k, row in value.items()]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "ExportOptions":
        data = dict(data)
        if data.get("tolerances") is not None:
            data["tolerances"] = {tuple(k) if isinstance(k, list) else k: row for k, row in data["tolerances"]}
        return cls(**data)


def help_of(name: str) -> str:
    """The help text of option ``name`` (the command line's, the API's docstring)."""
    return next(f.metadata["help"] for f in fields(ExportOptions) if f.name == name)


def default_of(name: str):
    """The default of option ``name``."""
    return getattr(ExportOptions(), name)
