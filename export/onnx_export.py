"""PyTorch -> ONNX at a fixed shape, then onnxsim.

Measured constraints (see docs/EXPORT.md): the TorchScript exporter (``dynamo=False``)
at opset 17, because onnx2tf drops bilinear ``align_corners`` at opset 18; and onnxsim
before onnx2tf, which otherwise fails on the reflection pads. Tensor names: inputs
``image`` and ``mask``, output ``output``; layout NCHW (see :mod:`export.wrappers`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Tuple

OPSET = 17
INPUT_NAMES = ("image", "mask")
OUTPUT_NAMES = ("output",)


def example_inputs(io: str, shape: Tuple[int, int]):
    """Dummy (image, mask) NCHW float32 tensors (values do not matter for tracing; both signatures trace float)."""
    import torch

    rows, cols = shape
    return (torch.zeros((1, 3, rows, cols)), torch.zeros((1, 1, rows, cols)))


def export_onnx(module, io: str, shape: Tuple[int, int], path: Path, simplify: bool = True) -> Path:
    """Trace ``module`` (an :mod:`export.wrappers` module) at ``shape`` and write a simplified ONNX file."""
    import onnx
    import torch

    path = Path(path)
    raw = path.with_name(path.stem + ".raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices, expected here
        with torch.no_grad():
            torch.onnx.export(
                module,
                example_inputs(io, shape),
                str(raw),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
    model = onnx.load(str(raw))
    if simplify:
        import onnxsim

        model, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified model")
    onnx.save(model, str(path))
    raw.unlink(missing_ok=True)
    return path
