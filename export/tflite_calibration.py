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
XNNPACK, multi-threaded, after inserting a REDUCE_MIN and a REDUCE_MAX right after each
tensor's producer (:func:`range_probe`). A reduction reads its tensor before any later op
can overwrite it, so the in-place problem cannot occur; only the scalars leave the graph,
so memory stays near inference's and one pass over the samples measures everything.
The TFLite converter then quantizes from these ranges as usual (``mlir_quantize``).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List

import numpy as np

from . import tflite_graph as g

def range_probe(model_bytes: bytes, tensors: List[int]) -> tuple:
    """The model with a REDUCE_MIN and a REDUCE_MAX over each of ``tensors`` placed right after the
    op that makes it; the scalars are the graph's outputs. Returns (bytes, {tensor: (min_out, max_out)}).

    Only the scalars leave the graph, so the interpreter still frees each tensor after its
    last use: one pass over the samples, at little more memory than inference.
    """
    model = g.read(model_bytes)
    sg = model.subgraphs[0]
    axes = g._const_tensor(model, np.arange(4, dtype=np.int32), "range_probe/axes")
    after: Dict[int, List[int]] = {}
    producer = {t: i for i, op in enumerate(sg.operators) for t in g._ids(op.outputs)}
    for t in tensors:
        after.setdefault(producer.get(t, -1), []).append(t)
    probes: Dict[int, tuple] = {}
    new_ops = []

    def probe(t):
        outs = []
        for op, label in ((g.OP.REDUCE_MIN, "min"), (g.OP.REDUCE_MAX, "max")):
            out = g._new_tensor(model, sg.tensors[t], g.T.FLOAT32, f"range_probe/{label}{t}")
            sg.tensors[out].shape = []
            options = g.schema.ReducerOptionsT()
            options.keepDims = False
            new_ops.append(g._new_op(model, op, [t, axes], [out], options, g.schema.BuiltinOptions.ReducerOptions))
            outs.append(out)
        probes[t] = tuple(outs)

    for t in after.get(-1, []):  # graph inputs
        probe(t)
    for i, op in enumerate(list(sg.operators)):
        new_ops.append(op)
        for t in after.get(i, []):
            probe(t)
    sg.operators = new_ops
    sg.outputs = [o for pair in probes.values() for o in pair]
    model.signatureDefs = []
    return g.write(model), probes


def measure_ranges(model_bytes: bytes, tensors: List[int], samples: Iterable[Dict[str, np.ndarray]],
                   threads: int = 2) -> Dict[int, tuple]:
    """min/max of ``tensors`` over ``samples`` (dicts keyed by signature input name), one pass."""
    from ai_edge_litert.interpreter import Interpreter

    model = g.read(model_bytes)
    sg = model.subgraphs[0]
    if model.signatureDefs:
        inputs = dict(g.signature_io(model)[0])
    else:
        inputs = {g.tensor_name(sg.tensors[t]): t for t in g._ids(sg.inputs)}
    probed, probes = range_probe(model_bytes, tensors)
    it = Interpreter(model_content=probed, num_threads=threads)
    it.allocate_tensors()
    ranges: Dict[int, list] = {}
    for sample in samples:
        if not isinstance(sample, dict):  # a list in input order
            sample = dict(zip(list(inputs), sample))
        for key, value in sample.items():
            it.set_tensor(inputs[key], np.asarray(value, dtype=np.float32))
        it.invoke()
        for t, (lo_t, hi_t) in probes.items():
            lo, hi = float(it.get_tensor(lo_t)), float(it.get_tensor(hi_t))
            if t in ranges:
                ranges[t] = [min(ranges[t][0], lo), max(ranges[t][1], hi)]
            else:
                ranges[t] = [lo, hi]
    return {t: tuple(r) for t, r in ranges.items()}


def activation_tensors(model) -> List[int]:
    sg = model.subgraphs[0]
    return [i for i, t in enumerate(sg.tensors) if t.type == g.T.FLOAT32 and not g._is_constant(model, t)]


def calibrate_ranges(model_bytes: bytes, dataset: Callable[[], Iterable], threads: int = 2) -> tuple:
    """The float model with measured ``min``/``max`` on every float activation; returns (bytes, report)."""
    import time

    t0 = time.time()
    model = g.read(model_bytes)
    sg = model.subgraphs[0]
    samples = list(dataset())
    tensors = activation_tensors(model)
    ranges = measure_ranges(model_bytes, tensors, samples, threads)
    for t, (lo, hi) in ranges.items():
        q = sg.tensors[t].quantization or g.schema.QuantizationParametersT()
        q.min, q.max = [float(lo)], [float(hi)]
        q.scale, q.zeroPoint = None, None
        sg.tensors[t].quantization = q
    report = {"tensors": len(ranges), "samples": len(samples), "threads": threads,
              "seconds": round(time.time() - t0, 2)}
    return g.write(model), report
