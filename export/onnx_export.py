"""PyTorch -> ONNX at a fixed shape, then onnxsim.

Measured constraints (see docs/EXPORT.md): the TorchScript exporter (``dynamo=False``)
at opset 17, because onnx2tf drops bilinear ``align_corners`` at opset 18; and onnxsim
before onnx2tf, which otherwise fails on the reflection pads. Tensor names: inputs
``image`` and ``mask``, output ``output``; layout NCHW (see :mod:`export.wrappers`).

The tracer runs the module once to record its graph, and nothing of that run's values reaches the file: the
graph, the weights and every shape are the same whatever the convolutions return. So by default the convolutions
do not compute while it records (:func:`convolutions_not_computed`); at 1024x1360 they were 16.9 of the 23.6 s an
export took (docs/EXPORT.md, "Export wall time"). A test compares the files made both ways, byte for byte.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Tuple

from runtime_py.contract import INPUT_NAMES, OUTPUT_NAMES

OPSET = 17


def _uncomputed_convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                            *flags):
    """``aten::_convolution``'s output as the tracer sees it -- a tensor of the right shape and type -- without its
    values (uninitialised memory). Direct convolutions only; the exported modules have no other kind."""
    import torch

    if transposed:
        raise NotImplementedError("a transposed convolution: trace it with convolutions computed")
    size = [int(input.shape[0]), int(weight.shape[0])]
    for i in range(2):  # int(): under the tracer a size is a traced value, which must not become an argument here
        span = int(dilation[i]) * (int(weight.shape[2 + i]) - 1) + 1
        size.append((int(input.shape[2 + i]) + 2 * int(padding[i]) - span) // int(stride[i]) + 1)
    return torch.empty(size, dtype=input.dtype)


@contextlib.contextmanager
def convolutions_not_computed():
    """Inside, every CPU ``aten::_convolution`` returns its output's shape without computing it, in the whole
    process: for a trace, which records the op (the tracer sits above the kernel) and keeps no value. On leaving,
    PyTorch's own kernel serves again."""
    import torch

    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
            library.impl("_convolution", _uncomputed_convolution, "CPU")
        yield
    finally:
        library._destroy()


def export_onnx(module, io: str, shape: Tuple[int, int], path: Path, simplify: bool = True,
                compute_convolutions: bool = False) -> Path:
    """Trace ``module`` (an :mod:`export.wrappers` module) at ``shape`` and write a simplified ONNX file.
    ``compute_convolutions``: let the trace run the convolutions (the same file, slower; for the test that says so)."""
    import onnx
    import torch

    from .wrappers import example_inputs

    path = Path(path)
    raw = path.with_name(path.stem + ".raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices, expected here
        with torch.no_grad(), (contextlib.nullcontext() if compute_convolutions else convolutions_not_computed()):
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
