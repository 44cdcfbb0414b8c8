"""int8 calibration: activation ranges measured with XNNPACK, replacing TFLite's calibrator.

TFLite's calibrator (``tensorflow.lite.python.optimize.calibrator``) has two problems here:

* it records wrong ranges for tensors that an op overwrites in place: it logs each op's
  inputs *after* the op ran, so an elementwise op working in place reports its output range
  as its input's. In GMCNN this hits the constant multiplies and adds after the last
  convolution of the ``image`` signature: the generator's [-1, 1] output was recorded as
  [-57, 26] (the range of ``x * 127.5``), leaving three int8 levels for the prediction --
  20 dB hole PSNR instead of 40;
* it runs the float model single-threaded on the built-in kernels: 12 samples of the
  345-GMAC cnum-32 model at 512x680 took over 20 minutes on this shared machine.

:func:`calibrate_ranges` produces the same thing the calibrator does -- the float model
with ``min``/``max`` on every float activation tensor -- by running the model with
XNNPACK, multi-threaded, with the tensors to measure made graph outputs (graph outputs are
never overwritten, so the in-place problem cannot occur). Tensors are measured in groups
whose total size stays under a memory budget, one pass over the samples per group.
The TFLite converter then quantizes from these ranges as usual (``mlir_quantize``).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List

import numpy as np

from . import tflite_graph as g

def measure_ranges(model_bytes: bytes, tensors: List[int], samples: Iterable[Dict[str, np.ndarray]],
                   threads: int = 2) -> Dict[int, tuple]:
    """min/max of ``tensors`` over ``samples`` (dicts keyed by signature input name)."""
    from ai_edge_litert.interpreter import Interpreter

    model = g.read(model_bytes)
    sg = model.subgraphs[0]
    extra = [t for t in tensors if t not in set(g._ids(sg.outputs))]
    sg.outputs = list(g._ids(sg.outputs)) + extra
    it = Interpreter(model_content=g.write(model), num_threads=threads)
    it.allocate_tensors()
    inputs = {}
    if model.signatureDefs:
        ins, _ = g.signature_io(model)
        inputs = {k: t for k, t in ins.items()}
    else:
        inputs = {g.tensor_name(sg.tensors[t]): t for t in g._ids(sg.inputs)}
    ranges: Dict[int, list] = {}
    for sample in samples:
        if not isinstance(sample, dict):  # a list in input order
            sample = dict(zip(list(inputs), sample))
        for key, value in sample.items():
            it.set_tensor(inputs[key], np.asarray(value, dtype=np.float32))
        it.invoke()
        for t in tensors:
            v = it.get_tensor(t)
            lo, hi = float(v.min()), float(v.max())
            if t in ranges:
                ranges[t] = [min(ranges[t][0], lo), max(ranges[t][1], hi)]
            else:
                ranges[t] = [lo, hi]
    return {t: tuple(r) for t, r in ranges.items()}


def activation_tensors(model) -> List[int]:
    sg = model.subgraphs[0]
    return [i for i, t in enumerate(sg.tensors) if t.type == g.T.FLOAT32 and not g._is_constant(model, t)]


def calibrate_ranges(model_bytes: bytes, dataset: Callable[[], Iterable], threads: int = 2,
                     budget_bytes: int = 768 << 20) -> tuple:
    """The float model with measured ``min``/``max`` on every float activation; returns (bytes, report)."""
    import time

    t0 = time.time()
    model = g.read(model_bytes)
    sg = model.subgraphs[0]
    samples = list(dataset())
    tensors = activation_tensors(model)
    groups, group, size = [], [], 0
    for t in tensors:
        nbytes = 4 * int(np.prod([max(1, d) for d in g._ids(sg.tensors[t].shape)]))
        if group and size + nbytes > budget_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(t)
        size += nbytes
    if group:
        groups.append(group)
    ranges: Dict[int, tuple] = {}
    for group in groups:
        ranges.update(measure_ranges(model_bytes, group, samples, threads))
    for t, (lo, hi) in ranges.items():
        q = sg.tensors[t].quantization or g.schema.QuantizationParametersT()
        q.min, q.max = [float(lo)], [float(hi)]
        q.scale, q.zeroPoint = None, None
        sg.tensors[t].quantization = q
    report = {"tensors": len(ranges), "samples": len(samples), "passes": len(groups), "threads": threads,
              "seconds": round(time.time() - t0, 2)}
    return g.write(model), report
