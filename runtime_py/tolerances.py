"""Every tolerance table of the project, in one place (measured; docs/TOLERANCES.md and docs/COREML.md
give the measurements behind each row).

* :data:`PARITY` -- the export's parity gate, TFLite precisions: an artifact against PyTorch fp32 at the
  same shape on the held-out photos (``export.parity.tolerance_for`` picks the row).
* :data:`COREML_PARITY` -- the same gate's rows for the Core ML precisions.
* :data:`COREML_EXECUTOR` -- the Core ML reference executor against PyTorch fp32 (the Core ML tests).
* :data:`DEVICE` -- a device's run of an artifact against the host's run of the same file (golden bundles).

Row keys: ``max_abs`` (<=, in [-1, 1] units unless the key says ``_u8``: 8-bit levels),
``max_abs_per_peak_activation`` (the fp32 max-abs limit grows to this times the reference's peak
activation), ``min_hole_psnr_db`` / ``hole_psnr_db`` / ``min_psnr_db`` (>=, 8-bit PSNR),
``max_known_pixels_changed`` (<=).
"""
from __future__ import annotations

from typing import Dict, Tuple

from .contract import PIXEL_SCALE

ONE_LEVEL = 1.0 / PIXEL_SCALE  # one 8-bit step in [-1, 1] units
# Float32 rounding is relative: two correct fp32 implementations of a network differ by a few ulps of
# the largest values it carries inside, however small its [-1, 1] output. So the fp32 limit grows with
# the reference's peak activation (largest |value| any convolution outputs on the parity samples).
FP32_ULP = 2.0 ** -23

Row = Dict[str, float]


def _gate_rows(min_hole_psnr_db: Dict[str, float]) -> Dict[Tuple[str, str], Row]:
    """Rows of precisions gated on hole PSNR: the same floor for both signatures, and for ``image`` files
    (compositing inside the graph) every known pixel unchanged."""
    rows: Dict[Tuple[str, str], Row] = {}
    for precision, db in min_hole_psnr_db.items():
        rows[(precision, "tensor")] = {"min_hole_psnr_db": db}
        rows[(precision, "image")] = {"min_hole_psnr_db": db, "max_known_pixels_changed": 0}
    return rows


# (precision, io) -> limits of the TFLite gate. Measured and justified in docs/TOLERANCES.md: fp32 on
# exactness (float32 rounding, one 8-bit level after the image graph's rounding), the others on hole PSNR.
PARITY: Dict[Tuple[str, str], Row] = {
    ("fp32", "tensor"): {"max_abs": 2e-5, "max_abs_per_peak_activation": 2 * FP32_ULP},
    ("fp32", "image"): {"max_abs": ONE_LEVEL + 1e-9, "max_known_pixels_changed": 0},
    **_gate_rows({"fp16": 55.0, "int8-dynamic": 40.0, "int8": 38.0}),
    # int16x8 (int16 activations, int8 weights): int8-dynamic's floor, the same 8-bit weights with finer
    # activations; measured 54.7-54.8 dB on the tests' cnum-4 model at 64x96 (int8-dynamic there: 55.3 dB).
    **_gate_rows({"int16x8": 40.0}),
}

# The gate's Core ML rows: hole PSNR floors a few dB under the worst measured case. Measurements: docs/COREML.md.
# w8a8 (int8 activations on top of w8): 41.2-43.5 dB on the tests' cnum-4 model (w8 there: 51 dB); w8's floor.
COREML_PARITY: Dict[Tuple[str, str], Row] = _gate_rows({"fp16": 50.0, "w8": 33.0, "palettized": 25.0, "w8a8": 33.0})

# Core ML reference executor vs PyTorch fp32, per precision: max abs error of the raw output in [-1,1]
# (tensor I/O), max difference in 8-bit levels of the composite (image I/O), and the least 8-bit PSNR
# over the hole. Measured numbers behind each entry: docs/COREML.md.
COREML_EXECUTOR: Dict[str, Row] = {
    "fp16": {"max_abs": 1e-2, "max_abs_u8": 3, "hole_psnr_db": 50.0},
    "w8": {"max_abs": 0.2, "max_abs_u8": 24, "hole_psnr_db": 35.0},
    "palettized": {"max_abs": 0.5, "max_abs_u8": 64, "hole_psnr_db": 25.0},
    # measured on the tests' cnum-4 model at 64x96: max abs 0.070, 42.2 dB (tensor), 41.2 dB (image) with auto
    # ranges; 0.061, 43.5 dB (tensor) with min/max ranges (the default)
    "w8a8": {"max_abs": 0.2, "max_abs_u8": 24, "hole_psnr_db": 36.0},
}

# Host run vs device run of the same artifact, per precision: max abs difference in the output's own
# units ([-1,1] floats, or 8-bit levels for uint8 images) and least PSNR over the whole output. Both
# runs use the same stored weights, so weight quantization cancels out; what is left is arithmetic:
# device kernels (GPU / Neural Engine / NNAPI) round activations to fp16 and accumulate in their own
# order. Core ML computes in fp16 at every precision, so w8 and palettized get the fp16 row; the fp16
# row is ~3x the largest fp16-vs-fp32 error measured at 512x680 (3.3e-3, 1 level; docs/COREML.md).
# TFLite int8 kernels may requantize differently on ARM, hence the wider int8 rows.
DEVICE: Dict[str, Row] = {
    "fp32": {"max_abs": 1e-3, "max_abs_u8": 1, "min_psnr_db": 60.0},
    "fp16": {"max_abs": 1e-2, "max_abs_u8": 3, "min_psnr_db": 45.0},
    "w8": {"max_abs": 1e-2, "max_abs_u8": 3, "min_psnr_db": 45.0},
    "palettized": {"max_abs": 1e-2, "max_abs_u8": 3, "min_psnr_db": 45.0},
    "int8-dynamic": {"max_abs": 6e-2, "max_abs_u8": 8, "min_psnr_db": 35.0},
    "int8": {"max_abs": 0.25, "max_abs_u8": 32, "min_psnr_db": 28.0},
}
