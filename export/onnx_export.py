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

from runtime_py.contract import INPUT_NAMES, OUTPUT_NAMES

OPSET = 17


def export_onnx(module, io: str, shape: Tuple[int, int], path: Path, simplify: bool = True) -> Path:
    """Trace ``module`` (an :mod:`export.wrappers` module) at ``shape`` and write a simplified ONNX file."""
    import onnx
    import torch

    from .wrappers import example_inputs

    path = Path(path)
    raw = path.with_name(path.stem + ".raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices, expected here
        with torch.no_grad():
            torch.onnx.export(
                module,
                example_inputs(shape, io),
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
