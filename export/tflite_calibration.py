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

Each probe also returns a strided grid of the tensor's values (every s-th row and column, all
channels; a RESHAPE and a SLICE, both run by XNNPACK), from which a random subsample per
sample is kept. From those statistics :mod:`export.quant_ranges` chooses each tensor's range
(min/max, or with ``auto`` whichever of min/max, headroom, percentile and MSE quantizes
held-out calibration samples best); the
chosen range is what the converter gets as the tensor's ``min``/``max``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.engines.tflite_engine import TFLiteEngine

from . import tflite_graph as g
from .quant_ranges import TensorStats, choose_ranges

# Values kept per tensor and sample for the range choice: the probe's grid holds at most
# GRID_VALUES (its stride grows until it does), of which SAMPLE_VALUES are drawn at random.
GRID_VALUES = 1 << 18
SAMPLE_VALUES = 1 << 15

#: Calibration's passes run with XNNPACK's transient indirection buffers (issue 17): through LiteRT's C API
#: (``TFLiteEngine(transient_indirection=True)``, runtime_py/engines/litert_capi.py), which runs a probed model or
#: a group's cut model as it runs a file -- every probe, kept value and grid is an output of that graph, read by
#: tensor name -- so the statistics are the interpreter's, without the convolutions' indirection buffers kept for
#: the pass's whole life (docs/EXPORT.md "Calibration with transient indirection buffers"). The grouping estimate
#: (:func:`pass_estimate`) follows this switch.
TRANSIENT_INDIRECTION = True

def _grid_stride(shape) -> int:
    """Stride of the value grid of an NHWC tensor: the least s with (H/s)(W/s)C <= GRID_VALUES."""
    _, h, w, c = shape
    s = 1
    while (h // s) * (w // s) * c > GRID_VALUES and min(h, w) // (s + 1) >= 1:
        s += 1
    return s


def _probes_after(model, tensors) -> Dict[int, List[int]]:
    """``tensors`` by the index of the op that makes each (-1: graph inputs), in ``tensors``' order: where
    :func:`range_probe` puts their probes, and (in graph order) the order a pass reads them in."""
    producer = {t: i for i, op in enumerate(model.subgraphs[0].operators) for t in g._ids(op.outputs)}
    after: Dict[int, List[int]] = {}
    for t in tensors:
        after.setdefault(producer.get(t, -1), []).append(t)
    return after


def _grid_size(shape) -> int:
    """Values of the grid :func:`range_probe` takes of a tensor of ``shape`` (0: none, not a (1,H,W,C) tensor)."""
    shape = [int(v) for v in shape]
    if len(shape) != 4 or shape[0] != 1:
        return 0
    s = _grid_stride(shape)
    return (shape[1] // s) * (shape[2] // s) * shape[3]


def range_probe(model_bytes: bytes, tensors: List[int], grid: bool = False, keep: Sequence[int] = (),
                means: Sequence[int] = ()) -> tuple:
    """The model with a REDUCE_MIN and a REDUCE_MAX over each of ``tensors`` placed right after the
    op that makes it; the scalars are the graph's outputs. Returns (bytes, {tensor: (min_out, max_out,
    grid_out)}); ``grid_out`` is None unless ``grid``.

    With ``grid``, each 4-D (1,H,W,C) tensor also gives every s-th row and column (all channels,
    starting at s//2; :func:`_grid_stride`): a SLICE to whole multiples of s where needed, a
    RESHAPE to (H/s, s, W/s, s*C) and a SLICE of one row and column of each s x s block.
    Only these small outputs leave the graph, so the interpreter still frees each tensor after
    its last use: one pass over the samples, at little more memory than inference. ``keep``: tensors
    (made by ops) that leave the graph whole as well; ``means``: tensors that also give their per-channel means
    (:func:`probe_model`). Each probe is (min, max, grid, mean), None where not taken.
    """
    probed, probes = probe_model(g.read(model_bytes), tensors, grid=grid, keep=keep, means=means)
    return g.write(probed), probes


def probe_model(model, tensors: List[int], grid: bool = False, keep: Sequence[int] = (),
                means: Sequence[int] = ()) -> tuple:
    """:func:`range_probe` of a ``ModelT``, changed in place (new tensors, buffers and ops appended; subgraph 0's
    op and output lists replaced, signatures dropped): returns (the model, the probes: tensor -> (min, max, grid,
    mean, channel min, channel max) outputs, each of the last four None where not taken).

    ``means``: (1,H,W,C) tensors among ``tensors`` that also get a MEAN, a REDUCE_MIN and a REDUCE_MAX over rows and
    columns, (1,C) outputs each (their min and max then reduce those): each convolution input's per-channel means,
    which the int8-dynamic bias correction needs, and per-channel ranges, which its input channel groups need
    (:func:`conv_input_tensors`; :mod:`export.input_groups`), measured in this pass instead of PyTorch forwards of
    their own."""
    sg = model.subgraphs[0]
    axes = g._const_tensor(model, np.arange(4, dtype=np.int32), "range_probe/axes")
    plane = g._const_tensor(model, np.array([1, 2], dtype=np.int32), "range_probe/plane") if means else None
    both = g._const_tensor(model, np.array([0, 1], dtype=np.int32), "range_probe/both") if means else None
    means = set(means)
    after = _probes_after(model, tensors)
    probes: Dict[int, tuple] = {}
    new_ops = []

    def sliced(src, begin, size, name):
        out = g._new_tensor(model, sg.tensors[src], g.T.FLOAT32, name)
        sg.tensors[out].shape = list(size)
        b = g._const_tensor(model, np.array(begin, np.int32), f"{name}/begin")
        z = g._const_tensor(model, np.array(size, np.int32), f"{name}/size")
        new_ops.append(g._new_op(model, g.OP.SLICE, [src, b, z], [out], g.schema.SliceOptionsT(),
                                 g.schema.BuiltinOptions.SliceOptions))
        return out

    def value_grid(t):
        shape = [int(v) for v in g._ids(sg.tensors[t].shape)]
        if len(shape) != 4 or shape[0] != 1:
            return None
        _, h, w, c = shape
        s = _grid_stride(shape)
        src = t
        if h % s or w % s or s == 1:  # crop to whole blocks (s == 1: a copy, so no later op can touch it)
            src = sliced(t, [0, 0, 0, 0], [1, h - h % s, w - w % s, c], f"range_probe/crop{t}")
        blocks = [(h // s), s, (w // s), s * c]
        if s == 1:
            return src
        reshaped = g._reshape(model, src, blocks, new_ops, f"range_probe/blocks{t}")
        return sliced(reshaped, [0, s // 2, 0, (s // 2) * c], [h // s, 1, w // s, c], f"range_probe/grid{t}")

    def reduced(t, op, axes_tensor, shape, label):
        out = g._new_tensor(model, sg.tensors[t], g.T.FLOAT32, f"range_probe/{label}{t}")
        sg.tensors[out].shape = shape
        options = g.schema.ReducerOptionsT()
        options.keepDims = False
        new_ops.append(g._new_op(model, op, [t, axes_tensor], [out], options, g.schema.BuiltinOptions.ReducerOptions))
        return out

    def probe(t):
        shape = [int(v) for v in g._ids(sg.tensors[t].shape)]
        if t in means and len(shape) == 4 and shape[0] == 1:
            # the channels' extremes first, the tensor's from them: a reduction over C values, not the tensor again
            channel_lo = reduced(t, g.OP.REDUCE_MIN, plane, [1, shape[3]], "channel_min")
            channel_hi = reduced(t, g.OP.REDUCE_MAX, plane, [1, shape[3]], "channel_max")
            lo = reduced(channel_lo, g.OP.REDUCE_MIN, both, [], "min")
            hi = reduced(channel_hi, g.OP.REDUCE_MAX, both, [], "max")
            per_channel = (reduced(t, g.OP.MEAN, plane, [1, shape[3]], "mean"), channel_lo, channel_hi)
        else:
            lo, hi = reduced(t, g.OP.REDUCE_MIN, axes, [], "min"), reduced(t, g.OP.REDUCE_MAX, axes, [], "max")
            per_channel = (None, None, None)
        probes[t] = (lo, hi, value_grid(t) if grid else None, *per_channel)

    for t in after.get(-1, []):  # graph inputs
        probe(t)
    for i, op in enumerate(list(sg.operators)):
        new_ops.append(op)
        for t in after.get(i, []):
            probe(t)
    sg.operators = new_ops
    sg.outputs = [o for outs in probes.values() for o in outs if o is not None] + list(keep)
    model.signatureDefs = []
    return model, probes


def _add_sample(stats: TensorStats, probe: tuple, out: Dict[str, np.ndarray], name: Dict[int, str],
                values: np.ndarray) -> None:
    """One sample's probe outputs (``out``, by tensor name; ``name``: probe output tensor -> its name) added to a
    tensor's statistics, with ``values`` the subsample of its value grid drawn for this sample."""
    lo_t, hi_t, _, mean_t, channel_lo_t, channel_hi_t = probe

    def read(t):
        return None if t is None else out[name[t]]

    stats.add(float(out[name[lo_t]]), float(out[name[hi_t]]), values.copy(), read(mean_t), read(channel_lo_t),
              read(channel_hi_t))


def _feeds(model, probed, samples):
    """Each sample as the probed model's feed: {input tensor name: float32 array}. ``samples`` are dicts
    keyed by ``model``'s signature input names, or lists in its input order."""
    sg = model.subgraphs[0]
    if model.signatureDefs:
        inputs = dict(g.signature_io(model)[0])
    else:
        inputs = {g.tensor_name(sg.tensors[t]): t for t in g._ids(sg.inputs)}
    probed_sg = probed.subgraphs[0]
    names = {key: g.tensor_name(probed_sg.tensors[t]) for key, t in inputs.items()}  # the probe keeps tensor numbers
    for sample in samples:
        if not isinstance(sample, dict):  # a list in input order
            sample = dict(zip(list(inputs), sample))
        yield {names[k]: np.asarray(v, dtype=np.float32) for k, v in sample.items()}


def measure_statistics(model_bytes: bytes, tensors: List[int], samples: Iterable[Dict[str, np.ndarray]],
                       threads: int = 2, grid: bool = True, keep: Sequence[int] = (),
                       on_sample: Optional[Callable[[int, Dict[int, np.ndarray]], None]] = None,
                       memory_bytes: Optional[int] = None, folder: Optional[str] = None,
                       progress: Optional[Callable[[str], None]] = None, report: Optional[dict] = None,
                       means: Sequence[int] = ()) -> Dict[int, TensorStats]:
    """Per tensor, over ``samples`` (dicts keyed by signature input name, or lists in input order),
    in one pass: each sample's exact min and max and (``grid``) up to SAMPLE_VALUES of its values.
    ``keep``: graph inputs and tensors made by ops whose whole values ``on_sample(index, {tensor: values})``
    receives for each sample (in parts, one call per group, when the pass is grouped). ``means``: tensors whose
    per-channel means and extremes each sample adds too (``TensorStats.channel_means``, ``channel_lows``,
    ``channel_highs``; :func:`probe_model`).

    The probed model runs in the runtime's TFLite engine (XNNPACK, ``threads`` threads, transient indirection buffers
    per :data:`TRANSIENT_INDIRECTION`; the bytes
    without a manifest entry, every probe an output of the graph, read by tensor name).

    ``memory_bytes`` (issue 17: the memory budget): what a pass may add to this process's anonymous memory.
    When the estimate of one pass over the whole graph (:func:`pass_estimate`) exceeds it, the graph's ops are
    measured in groups (:func:`calibration_groups`, the fewest that fit; :func:`_measure_in_groups`), each a
    pass over the samples of a model of those ops alone, the values one group hands the next kept in
    memory-mapped files under ``folder``; the statistics are the same as one pass's. ``progress`` gets a line
    per group; ``report["groups"]`` receives the plan and each group's measured seconds and anonymous peak."""
    model = g.read(model_bytes)
    if memory_bytes is not None:
        groups = calibration_groups(model, tensors, memory_bytes)
        if report is not None:
            report["groups"] = {"count": len(groups), "memory_bytes": int(memory_bytes),
                                "whole_graph_estimate_bytes": pass_estimate(model, range(len(model.subgraphs[0].operators))),
                                "passes": [{"ops": [grp.ops[0], grp.ops[-1]], "tensors": len(grp.tensors),
                                            "estimated_bytes": grp.estimate} for grp in groups]}
        if len(groups) > 1:
            return _measure_in_groups(model_bytes, model, tensors, groups, list(samples), threads, grid, keep, on_sample,
                                      folder, progress, report, means)
    graph_inputs = set(g._ids(model.subgraphs[0].inputs))
    probed_bytes, probes = range_probe(model_bytes, tensors, grid=grid, keep=[t for t in keep if t not in graph_inputs],
                                       means=means)
    probed = g.read(probed_bytes)
    probed_sg = probed.subgraphs[0]
    name = {t: g.tensor_name(probed_sg.tensors[t]) for outs in probes.values() for t in outs if t is not None}
    if len(set(name.values())) != len(name):
        raise ValueError("range_probe: two probe outputs share a tensor name")
    stats: Dict[int, TensorStats] = {t: TensorStats() for t in probes}
    rng = np.random.default_rng(0)
    with TFLiteEngine(model_content=probed_bytes, threads=threads, xnnpack=True,
                      transient_indirection=TRANSIENT_INDIRECTION) as engine:
        for index, feed in enumerate(_feeds(model, probed, samples)):
            out = engine.infer(feed)
            if on_sample is not None:
                on_sample(index, {t: feed[g.tensor_name(probed_sg.tensors[t])] if t in graph_inputs
                                  else out[g.tensor_name(probed_sg.tensors[t])] for t in keep})
            for t, probe in probes.items():
                values = np.zeros(0, np.float32)
                if probe[2] is not None:
                    values = out[name[probe[2]]].ravel()
                    if values.size > SAMPLE_VALUES:
                        values = values[rng.integers(0, values.size, SAMPLE_VALUES)]
                _add_sample(stats[t], probe, out, name, values)
    return stats


# ------------------------------------------------------------------ calibration in groups (the memory budget)

# What one pass of the probed model costs in anonymous memory, by what XNNPACK allocates (issue 17; measured with
# LiteRT 2.1.0's XNNPACK, docs/EXPORT.md "Calibration within the memory budget"):
# * each convolution with a kernel larger than 1x1 keeps an indirection buffer of one pointer per output pixel and
#   kernel tap, for the interpreter's whole life (one 7x7 convolution 8->8 at 1024x1360: 521 MiB after
#   allocate_tensors, exactly pixels x 49 x 8 B); a bilinear resize one of 4 pointers and 2 weights per pixel;
#   GMCNN at 512x680: 627 MiB of them;
# * the values the ops make, of which XNNPACK's workspace holds a share at once (its planner reuses memory between
#   values whose lives do not overlap): fitted to the default model at 512x680, whose whole probed pass added
#   1,503 MiB anonymous to the process (627 + 27 MiB of the buffers above, 0.40 of its 2,141 MiB of values),
#   rounded up; and never less than one op's inputs and output (a group of a few wide ops: the tail after the
#   branches' concatenation measured +728 MiB at 512x680 where the share alone said 404 in all);
# * the group's inputs and kept outputs (fed and read back whole), and the model bytes (flatbuffer copies).
# With TRANSIENT_INDIRECTION (the passes now) no convolution keeps its buffer; XNNPACK builds the running one's in
# its workspace, so the estimate counts the group's largest instead of their sum, the rest unchanged. Measured, one
# pass of one sample (anonymous added; docs/EXPORT.md "Calibration with transient indirection buffers"): 512x680
# whole graph 1,454 -> 960 MiB (estimate 1,631 -> 1,133), ops 0-56 929 -> 799 (901 -> 715), 57-90 878 -> 525
# (725 -> 527), 91-95 631 -> 582 (632 -> 608); 1024x1360 whole -> 3,571 (6,523 -> 4,534), 0-61 -> 3,360 (3,965
# -> 3,177), 62-90 -> 1,938 (2,664 -> 1,920), 91-95 -> 2,346 (2,529 -> 2,433): within 10 % where under, as before.
POINTER_BYTES = 8
VALUE_SHARE = 0.45


@dataclass
class Group:
    """Consecutive ops (indices in graph order) measured in one pass of their own: ``inputs`` (graph inputs, or
    values an earlier group made, in feed order), ``keep`` (values it makes that later groups read), ``tensors``
    (what it measures) and its estimated anonymous bytes."""

    ops: List[int]
    inputs: List[int]
    keep: List[int]
    tensors: List[int]
    estimate: int


def _tensor_bytes(sg, t: int) -> int:
    return 4 * math.prod(g._ids(sg.tensors[t].shape))  # math's, not numpy's: the plan search calls it 0.5 M times


def _indirection_bytes(model, op) -> int:
    """A convolution's indirection buffer: output pixels x kernel taps pointers (none for 1x1; 0 for other ops)."""
    sg = model.subgraphs[0]
    outs = g._ids(op.outputs)
    if not outs or g.op_name(model, op) not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return 0
    shape = [int(v) for v in g._ids(sg.tensors[outs[0]].shape)]
    pixels = shape[1] * shape[2] if len(shape) == 4 else 0
    w = [int(v) for v in g._ids(sg.tensors[g._ids(op.inputs)[1]].shape)]
    taps = w[1] * w[2]
    return pixels * taps * POINTER_BYTES if taps > 1 else 0


def _persistent_bytes(model, op, transient: Optional[bool] = None) -> int:
    """What XNNPACK keeps for ``op`` while the interpreter lives: a convolution's indirection buffer
    (:func:`_indirection_bytes`), a bilinear resize's (4 pointers and 2 float weights per pixel).
    ``transient`` (default :data:`TRANSIENT_INDIRECTION`): XNNPACK builds a convolution's buffer per run instead,
    so none is kept for it (the resize's is still counted: too small to tell in the measurements)."""
    if transient is None:
        transient = TRANSIENT_INDIRECTION
    sg = model.subgraphs[0]
    name = g.op_name(model, op)
    outs = g._ids(op.outputs)
    if not outs:
        return 0
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return 0 if transient else _indirection_bytes(model, op)
    if name == "RESIZE_BILINEAR":
        shape = [int(v) for v in g._ids(sg.tensors[outs[0]].shape)]
        pixels = shape[1] * shape[2] if len(shape) == 4 else 0
        return pixels * (4 * POINTER_BYTES + 2 * 4)
    return 0


def pass_estimate(model, ops, transient: Optional[bool] = None) -> int:
    """Estimated anonymous bytes of one probed pass over ``ops`` (indices in graph order) as a model of their own:
    XNNPACK's persistent buffers, VALUE_SHARE of the values they make, their inputs and kept outputs; with
    ``transient`` (default :data:`TRANSIENT_INDIRECTION`) no convolution's buffer is kept, the largest one is
    built per run instead."""
    return _group(model, list(ops), _readers(model), transient=transient).estimate


def _readers(model) -> Dict[int, int]:
    """tensor -> the last op reading it (graph outputs: past the last op)."""
    sg = model.subgraphs[0]
    last = {t: i for i, op in enumerate(sg.operators) for t in g._ids(op.inputs) if t >= 0}
    for t in g._ids(sg.outputs):
        last[t] = len(sg.operators)
    return last


@dataclass
class _Tables:
    """What :func:`_group` reads of a model, read once: the plan search estimates every run of ops (4,656 runs of the
    default model's 96 ops), and reading the flatbuffer's index arrays again for each took most of its time."""

    inputs: List[List[int]]  # per op, its non-constant inputs
    outputs: List[List[int]]  # per op
    persistent: List[int]  # per op, :func:`_persistent_bytes`
    indirection: List[int]  # per op, :func:`_indirection_bytes`
    nbytes: Dict[int, int]  # per tensor read or made by an op, :func:`_tensor_bytes`


def _tables(model, transient: bool) -> _Tables:
    sg = model.subgraphs[0]
    inputs, outputs, nbytes = [], [], {}
    for op in sg.operators:
        ins = [t for t in g._ids(op.inputs) if t >= 0 and not g._is_constant(model, sg.tensors[t])]
        outs = g._ids(op.outputs)
        inputs.append(ins)
        outputs.append(outs)
        for t in ins + outs:
            nbytes[t] = _tensor_bytes(sg, t)
    return _Tables(inputs, outputs, [_persistent_bytes(model, op, transient) for op in sg.operators],
                   [_indirection_bytes(model, op) for op in sg.operators], nbytes)


def _group(model, ops: List[int], last_reader: Dict[int, int], tensors: Sequence[int] = (),
           transient: Optional[bool] = None, tables: Optional[_Tables] = None) -> Group:
    if transient is None:
        transient = TRANSIENT_INDIRECTION
    tab = tables if tables is not None else _tables(model, transient)
    made, inputs = [], []
    seen = set()  # made or inputs
    for i in ops:
        for t in tab.inputs[i]:
            if t not in seen:
                inputs.append(t)
                seen.add(t)
        made.extend(tab.outputs[i])
        seen.update(tab.outputs[i])
    end = ops[-1] if ops else -1
    keep = [t for t in made if last_reader.get(t, -1) > end]
    chosen = set(tensors)
    probed = [t for t in made if t in chosen]
    persistent = sum(tab.persistent[i] for i in ops)
    if transient:  # the buffer of the convolution running, in XNNPACK's workspace: at most the group's largest
        persistent += max((tab.indirection[i] for i in ops), default=0)
    size = tab.nbytes
    values = sum(size[t] for t in made)
    # a few large ops alone (the tail's concatenation) hold more than the share: at least one op's inputs and output
    # (those of them not counted with the boundary below)
    boundary_tensors = set(inputs) | set(keep)
    widest = max((sum(size[t] for t in tab.inputs[i] + tab.outputs[i] if t not in boundary_tensors) for i in ops),
                 default=0)
    # inputs once (the interpreter's copy), kept outputs twice (the interpreter's and the one read out)
    boundary = sum(size[t] for t in inputs) + 2 * sum(size[t] for t in keep)
    return Group(list(ops), inputs, keep, probed, int(persistent + max(VALUE_SHARE * values, widest) + boundary))


def calibration_groups(model, tensors: Sequence[int], memory_bytes: int) -> List[Group]:
    """The fewest runs of consecutive ops whose passes each fit ``memory_bytes`` (:func:`pass_estimate`; an op
    that does not fit alone is a group of its own), and among those plans the one that hands the least from group
    to group (the values later groups read, :attr:`Group.keep`), then whose largest group is estimated smallest
    (the estimate's error is the budget's margin): one group when the whole graph fits. Graph inputs among
    ``tensors`` are measured by the first group that reads them.

    The plan is searched over every run of ops (dynamic programming), not grown group by group as far as each will
    go: a run's estimate is not monotone in its length (a run that ends before a wide concatenation hands it on
    whole, one that takes it and what reads it hands on little), and the handed values are written to disk and
    read back once per sample. Default model v2 at 1024x1360 in the export: the greedy plan was ops 0-70, 71-91
    (handing 1.1 GiB per sample to) 92-95, 290 s of calibration; this plan is 0-57 and 58-95, handing 128 MiB, 179 s
    (docs/EXPORT.md, "The plan searched, not grown")."""
    sg = model.subgraphs[0]
    n = len(sg.operators)
    last_reader = _readers(model)
    tables = _tables(model, TRANSIENT_INDIRECTION)
    whole = _group(model, list(range(n)), last_reader, tensors, tables=tables)
    if whole.estimate <= memory_bytes or n < 2:
        groups = [whole]
    else:
        # best[j]: (groups, bytes handed on, largest estimate) of the best plan for ops 0..j-1, the start of its last
        # group, that group
        best: List[Optional[Tuple[Tuple[int, int, int], int, Group]]] = [None] * (n + 1)
        best[0] = ((0, 0, 0), -1, None)
        for start in range(n):
            if best[start] is None:
                continue
            (count, handed, largest), _, _ = best[start]
            for end in range(start, n):
                grp = _group(model, list(range(start, end + 1)), last_reader, tensors, tables=tables)
                if grp.estimate > memory_bytes and end > start:
                    continue
                cost = (count + 1, handed + sum(tables.nbytes[t] for t in grp.keep), max(largest, grp.estimate))
                if best[end + 1] is None or cost < best[end + 1][0]:
                    best[end + 1] = (cost, start, grp)
        groups, end = [], n
        while end > 0:
            _, start, grp = best[end]
            groups.insert(0, grp)
            end = start
    graph_inputs = [t for t in g._ids(sg.inputs) if t in set(tensors)]
    for t in graph_inputs:
        first = next((grp for grp in groups if t in grp.inputs), groups[0])
        if t not in first.inputs:
            first.inputs.append(t)
        first.tensors.insert(0, t)
    return groups


def _measure_in_groups(model_bytes: bytes, model, tensors: List[int], groups: List[Group], samples: list, threads: int,
                       grid: bool,
                       keep: Sequence[int], on_sample, folder: Optional[str], progress, report: Optional[dict],
                       means: Sequence[int] = ()) -> Dict[int, TensorStats]:
    """:func:`measure_statistics` group by group: each group's ops alone (:func:`export.tflite_graph.cut`) with
    their probes, a pass over every sample; the values later groups read go to memory-mapped ``.npy`` files
    (page cache, not anonymous memory) in a temporary folder under ``folder``. Each tensor's statistics are
    those of one pass over the whole graph: the same ops on the same values (XNNPACK's kernels, ``threads``
    threads), added sample by sample, and each value subsample drawn from the random generator state the one
    pass would have reached at that tensor and sample."""
    import gc
    import shutil
    import tempfile
    import time

    from runtime_py.engines.base import role_of
    from runtime_py.memory import AnonPeak, anon_rss_bytes, give_back

    sg = model.subgraphs[0]
    graph_inputs = g._ids(sg.inputs)
    keep = list(keep)
    key_tensor = (dict(g.signature_io(model)[0]) if model.signatureDefs
                  else {g.tensor_name(sg.tensors[t]): t for t in graph_inputs})

    def fed(sample) -> Dict[int, np.ndarray]:  # as _feeds reads a sample: a list is in the signature's input order
        if not isinstance(sample, dict):
            sample = dict(zip(list(key_tensor), sample))
        return {key_tensor[k]: np.asarray(v, dtype=np.float32) for k, v in sample.items()}

    # the generator states of the one pass: it draws, sample by sample, in its probes' order, for each tensor
    # whose value grid exceeds SAMPLE_VALUES
    measured = {t for grp in groups for t in grp.tensors}
    order = [t for _, ts in sorted(_probes_after(model, [t for t in tensors if t in measured]).items()) for t in ts]
    sizes = {t: _grid_size(g._ids(sg.tensors[t].shape)) if grid else 0 for t in order}
    rng = np.random.default_rng(0)
    states: Dict[Tuple[int, int], dict] = {}
    for index in range(len(samples)):
        for t in order:
            if sizes[t] > SAMPLE_VALUES:
                states[index, t] = rng.bit_generator.state
                rng.integers(0, sizes[t], SAMPLE_VALUES)

    stats: Dict[int, TensorStats] = {t: TensorStats() for t in order}
    image = next(t for i, t in enumerate(graph_inputs) if role_of(g.tensor_name(sg.tensors[t]), i) == "image")
    shape = tuple(int(v) for v in g._ids(sg.tensors[image].shape)[1:3])
    passes = report["groups"]["passes"] if report is not None and "groups" in report else None
    work = tempfile.mkdtemp(prefix="calibration-groups-", dir=folder)
    stored: Dict[int, np.ndarray] = {}
    # give_back's collection after each group need only look at what the groups made (the one cycle it finds per
    # group, 9 objects, is made there): in the TFLite worker, TensorFlow and onnx2tf imported, a full collection
    # took 0.27 s a group, 26 s of 32 for the cnum-4 test graph's 96 one-op groups. The objects alive before are
    # exempt until the groups are done (gc.freeze), then collected as usual. Not where someone froze them already.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        for number, grp in enumerate(groups, 1):
            t0 = time.time()
            if progress is not None:
                progress(f"calibration group {number}/{len(groups)}: ops {grp.ops[0]}-{grp.ops[-1]}, "
                         f"{len(grp.tensors)} tensors, estimated {grp.estimate / (1 << 20):.0f} MiB")
            peak, at_start = AnonPeak(), anon_rss_bytes()
            made = {o for i in grp.ops for o in g._ids(sg.operators[i].outputs)}
            wanted = grp.keep + [t for t in keep if t in made and t not in grp.keep]
            # the graph's image input comes first, read or not: the engine takes the image's role and shape from it
            inputs = [image] + [t for t in grp.inputs if t != image]
            # the group's model from the one read of the file (a cut per group re-read and re-wrote it all: on the
            # cnum-4 test graph 0.35 s of each group's 0.4 s)
            probed, probes = probe_model(g.cut_model(model, grp.ops, inputs), grp.tensors, grid=grid, keep=wanted,
                                         means=[t for t in grp.tensors if t in means])
            probed_bytes, probed_sg = g.write(probed), probed.subgraphs[0]
            name = {t: g.tensor_name(probed_sg.tensors[t]) for t in inputs + wanted}
            name.update({o: g.tensor_name(probed_sg.tensors[o]) for outs in probes.values() for o in outs
                         if o is not None})
            if len(set(name.values())) != len(name):
                raise ValueError("calibration groups: two inputs or outputs of a group share a tensor name")
            with TFLiteEngine(model_content=probed_bytes, shape=shape, threads=threads, xnnpack=True,
                              transient_indirection=TRANSIENT_INDIRECTION) as engine:
                for index, sample in enumerate(samples):
                    given = fed(sample)
                    feed = {name[t]: (given[t] if t in given else np.asarray(stored[t][index])) for t in inputs}
                    out = engine.infer(feed)
                    for t in grp.keep:
                        if t not in stored:
                            path = f"{work}/value_{t}.npy"
                            stored[t] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                                  shape=(len(samples),) + tuple(out[name[t]].shape))
                        stored[t][index] = out[name[t]]
                    if on_sample is not None:
                        mine = {t: given[t] for t in keep if t in graph_inputs and number == 1}
                        mine.update({t: out[name[t]] for t in keep if t in wanted})
                        if mine:
                            on_sample(index, mine)
                    for t, probe in probes.items():
                        values = np.zeros(0, np.float32)
                        if probe[2] is not None:
                            values = out[name[probe[2]]].ravel()
                            if values.size > SAMPLE_VALUES:
                                draw = np.random.default_rng()
                                draw.bit_generator.state = states[index, t]
                                values = values[draw.integers(0, values.size, SAMPLE_VALUES)]
                        _add_sample(stats[t], probe, out, name, values)
                    del out, given, feed  # before the next sample's: the kept outputs are whole tensors
            for t in [t for t in stored if all(t not in later.inputs for later in groups[number:])]:
                del stored[t]  # no later group reads it
            give_back()  # what this group's interpreter freed, before the next one's
            if passes is not None:
                passes[number - 1].update(t_start=t0, seconds=round(time.time() - t0, 2), anon_at_start_bytes=int(at_start),
                                          peak_rss_bytes=int(peak.resident_peak()), peak_anon_bytes=int(peak.peak()))
            peak.close()
    finally:
        if freeze:
            gc.unfreeze()
        stored.clear()
        shutil.rmtree(work, ignore_errors=True)
    return stats


def measure_ranges(model_bytes: bytes, tensors: List[int], samples: Iterable[Dict[str, np.ndarray]],
                   threads: int = 2) -> Dict[int, tuple]:
    """min/max of ``tensors`` over ``samples`` (dicts keyed by signature input name), one pass."""
    stats = measure_statistics(model_bytes, tensors, samples, threads, grid=False)
    return {t: (s.lo, s.hi) for t, s in stats.items()}


def activation_consumers(model, tensors: Iterable[int]) -> Dict[int, str]:
    """Tensors whose every consumer is the same elementwise activation (ELU): tensor -> its op name.
    Their quantization error is judged after that activation (:func:`export.quant_ranges.choose_range`)."""
    from .quant_ranges import ACTIVATIONS

    sg = model.subgraphs[0]
    consumers: Dict[int, set] = {}
    for op in sg.operators:
        for t in g._ids(op.inputs):
            consumers.setdefault(t, set()).add(g.op_name(model, op))
    outputs = set(g._ids(sg.outputs))
    return {t: next(iter(consumers[t])) for t in tensors
            if t not in outputs and len(consumers.get(t, ())) == 1 and next(iter(consumers[t])) in ACTIVATIONS}


def activation_outputs(model, tensors: Iterable[int]) -> Dict[int, str]:
    """Tensors an elementwise activation (ELU) produces: tensor -> its op name. Their ranges keep the
    activation's floor on the grid (:func:`export.quant_ranges.floor_on_grid`)."""
    from .quant_ranges import FLOORS

    sg = model.subgraphs[0]
    made = {t: g.op_name(model, op) for op in sg.operators for t in g._ids(op.outputs)}
    return {t: made[t] for t in tensors if made.get(t) in FLOORS}


def conv_input_tensors(model) -> Dict[str, int]:
    """Each CONV_2D (its output tensor's name) -> the tensor it reads: in these graphs the activation before the
    convolution's own padding (SAME padding and dilation are the op's, no PAD op between), as PyTorch's
    convolution receives it."""
    sg = model.subgraphs[0]
    return {name: g._ids(sg.operators[i].inputs)[0] for name, i in g.conv_nodes(model)}


def channel_means(stats: Dict[int, TensorStats], inputs: Dict[str, int], samples: int) -> Optional[Dict[str, np.ndarray]]:
    """Per convolution (``inputs``: its output name -> the tensor it reads), its input's per-channel mean over the
    samples (float64 (C,)): the average of each sample's mean, as :func:`export.activations.conv_input_means`
    takes it. None unless every convolution's input has a mean for each of the ``samples``."""
    if any(t not in stats or len(stats[t].channel_means) != samples for t in inputs.values()):
        return None
    return {name: np.mean(np.stack(stats[t].channel_means), axis=0) for name, t in inputs.items()}


def channel_extremes(stats: Dict[int, TensorStats], inputs: Dict[str, int],
                     samples: int) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Per convolution (``inputs``: its output name -> the tensor it reads), its input's per-channel (least,
    largest) value over the samples' pixels (float64 (C,) each), as :func:`export.input_groups.channel_ranges`
    takes them. None unless every convolution's input has them for each of the ``samples``."""
    if any(t not in stats or len(stats[t].channel_lows) != samples or len(stats[t].channel_highs) != samples
           for t in inputs.values()):
        return None
    return {name: (np.min(np.stack(stats[t].channel_lows), axis=0), np.max(np.stack(stats[t].channel_highs), axis=0))
            for name, t in inputs.items()}


def activation_tensors(model) -> List[int]:
    sg = model.subgraphs[0]
    return [i for i, t in enumerate(sg.tensors) if t.type == g.T.FLOAT32 and not g._is_constant(model, t)]


# The statistics of the last calibration: int8 and int16x8 files of one saved_model calibrate the
# same float model on the same samples, so the second reuses the first's pass (only the range choice
# differs). Each entry: (statistics, the report's "shared" record of how they were shared, or None, and its
# "groups" record of how the pass was grouped, or None).
_STATISTICS: Dict[str, Tuple[Dict[int, TensorStats], Optional[dict], Optional[dict]]] = {}


def _statistics_key(model_bytes: bytes, samples, grid: bool) -> str:
    import hashlib

    h = hashlib.sha256(model_bytes)
    for sample in samples:
        values = sample.values() if isinstance(sample, dict) else sample
        for v in values:
            h.update(np.ascontiguousarray(v).tobytes())
    h.update(b"grid" if grid else b"")
    return h.hexdigest()


# Within the measured calibration inputs of two signatures, the largest difference allowed between the tensor
# signature's input and the value the other graph computes in its place: the image graph normalises as
# x * (1/127.5) - 1, as the tensor samples hold it (runtime_py.contract.normalize; measured difference 0, and at
# most 1.2e-7, one float32 step near 1, when the samples held x / 127.5 - 1); a different photo or mask differs
# by at least one pixel level, 1/127.5.
SHARED_INPUT_TOLERANCE = 1e-5


@dataclass
class Shareable:
    """One calibration pass kept for another graph of the same network (the ``image`` signature wraps the
    ``tensor`` signature's network in its own I/O ops): the float model measured, its statistics, and the
    values of its graph inputs and outputs per sample (``.npy`` files, read memory-mapped)."""

    source: str
    model: bytes
    stats: Dict[int, TensorStats]
    grid: bool
    values: Dict[int, str]

    def value(self, tensor: int, index: int) -> np.ndarray:
        return np.load(self.values[tensor], mmap_mode="r")[index]


_SHAREABLE: List[Shareable] = []  # the last pass kept for sharing


def forget_statistics() -> None:
    """Drop every pass kept between calls (a worker converting another export's plan measures and shares its
    own, as a fresh one does)."""
    _STATISTICS.clear()
    _SHAREABLE.clear()


def _measure_to_share(model_bytes: bytes, tensors, samples, threads: int, grid: bool, keep_folder: str,
                      source: str, **grouping) -> Dict[int, TensorStats]:
    """:func:`measure_statistics` (``grouping``: its memory arguments), keeping the pass for
    :func:`_shared_statistics` (its graph inputs' and outputs' values per sample written to ``keep_folder``)."""
    import os

    sg = g.read(model_bytes).subgraphs[0]
    keep = g._ids(sg.inputs) + g._ids(sg.outputs)
    paths = {t: os.path.join(keep_folder, f"shared_calibration_{t}.npy") for t in keep}
    files: Dict[int, np.ndarray] = {}

    def write(index, values):
        for t, v in values.items():
            if t not in files:
                files[t] = np.lib.format.open_memmap(paths[t], mode="w+", dtype=np.float32,
                                                     shape=(len(samples),) + tuple(np.shape(v)))
            files[t][index] = v

    stats = measure_statistics(model_bytes, tensors, samples, threads, grid=grid, keep=keep, on_sample=write,
                               **grouping)
    for f in files.values():
        f.flush()
    files.clear()
    _SHAREABLE[:] = [Shareable(source, model_bytes, stats, grid, paths)]
    return stats


def _shared_statistics(model_bytes: bytes, tensors: List[int], samples, threads: int, grid: bool,
                       means: Sequence[int] = ()):
    """The statistics of ``model_bytes``'s ``tensors`` taken from the kept pass (:class:`Shareable`) where
    this graph computes that pass's network, and measured here only for its own ops (fed the kept network
    outputs: a model of those ops alone); returns (stats, report) or (None, reason) when it does not apply:
    another network, other samples, or own ops reading more of the network than its outputs."""
    if not _SHAREABLE:
        return None, "nothing kept"
    kept = _SHAREABLE[0]
    if grid and not kept.grid:
        return None, "the kept pass has no value samples"
    inner, model = g.read(kept.model), g.read(model_bytes)
    where = g.embedding(inner, model)
    if where is None:
        return None, "another network"
    sg = model.subgraphs[0]
    inner_inputs = g._ids(inner.subgraphs[0].inputs)
    network, producer, own_ops = g.around_embedding(inner, model, where)  # network: tensors the shared network makes
    inputs = g._ids(sg.inputs)
    fed = sorted({t for i in own_ops for t in g._ids(sg.operators[i].inputs) if t in network})
    of = {b: a for a, b in where.items()}
    own = [t for t in tensors if t not in network]
    if (any(of[t] not in kept.values for t in fed)
            or any(t not in inputs and producer.get(t) not in own_ops for t in own)
            or any(len(s.mins) != len(samples) for s in kept.stats.values())):
        return None, "the graph's own ops read more of the network than its outputs"
    standing_in = {where[a]: a for a in inner_inputs}  # this graph's tensors in the network inputs' places
    key_tensor = (dict(g.signature_io(model)[0]) if model.signatureDefs
                  else {g.tensor_name(sg.tensors[t]): t for t in inputs})

    def own_samples():
        for index, sample in enumerate(samples):
            by_tensor = ({key_tensor[k]: v for k, v in sample.items()} if isinstance(sample, dict)
                         else dict(zip(inputs, sample)))
            yield [by_tensor[t] for t in inputs] + [kept.value(of[t], index) for t in fed]

    worst = [0.0]

    def compare(index, values):
        for t, v in values.items():
            want = kept.value(standing_in[t], index)
            worst[0] = max(worst[0], float(np.max(np.abs(np.asarray(v, np.float32).reshape(want.shape) - want))))

    own_stats = measure_statistics(g.cut(model_bytes, own_ops, inputs + fed), own, own_samples(), threads,
                                   grid=grid, keep=sorted(standing_in), on_sample=compare,
                                   means=[t for t in own if t in means])
    if worst[0] > SHARED_INPUT_TOLERANCE:
        return None, f"other samples (network inputs differ by {worst[0]:.3g})"
    stats = {t: kept.stats[of[t]] for t in tensors if t in network}
    stats.update(own_stats)
    return stats, {"statistics_shared_from": kept.source, "tensors_shared": len(network & set(tensors)),
                   "tensors_measured": len(own), "ops_measured": len(own_ops),
                   "network_input_difference": worst[0]}


def calibrate_ranges(model_bytes: bytes, dataset: Callable[[], Iterable], threads: int = 2, bits: int = 8,
                     symmetric: bool = False, method: str = "minmax", share: Optional[dict] = None,
                     memory_bytes: Optional[int] = None, folder: Optional[str] = None,
                     progress: Optional[Callable[[str], None]] = None,
                     input_means: Optional[Dict[str, np.ndarray]] = None,
                     input_ranges: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None) -> tuple:
    """The float model with a chosen ``min``/``max`` on every float activation; returns (bytes, report).

    ``bits``/``symmetric``: the activation grid the ranges are chosen for (8/False: int8; 16/True:
    the int16 activations of 16x8 files). ``method``: ``auto`` (per tensor, the best of
    :data:`export.quant_ranges.METHODS` on held-out samples) or one method for every tensor.
    ``report["tensors"]`` maps each tensor's name to its method, chosen range, observed min/max
    and held-out errors; ``report["methods"]`` counts the tensors per method.

    ``share`` (issue 17: one pass per shape for both I/O signatures): ``{"keep": folder, "source": file}``
    keeps this pass for another graph of the same network; ``{"reuse": True}`` takes the kept pass's
    statistics for the tensors this graph's copy of that network makes and measures only its own ops
    (``report["shared"]`` says from which file, or why not).

    ``memory_bytes``, ``folder``, ``progress`` (issue 17): the pass over the samples in groups when one pass would
    not fit ``memory_bytes`` (:func:`measure_statistics`); ``report["groups"]`` records the plan.

    ``input_means`` (issue 17: work done once): a dict that receives each convolution's input channel means over
    the samples (:func:`channel_means`, keyed by the convolution's output name), measured in the same pass (a MEAN
    per convolution input, 1.6 % of an inference at 512x680): the int8-dynamic file's bias correction takes them
    instead of a PyTorch forward per calibration sample (``export.tflite.correct_biases``). Left empty when a
    pass reused from before lacks them. ``input_ranges``: likewise each convolution input's per-channel (least,
    largest) values (:func:`channel_extremes`), which the int8-dynamic fallback's input channel groups take
    instead of a PyTorch forward per sample (``export.tflite.calibration_input_ranges``).
    """
    import collections
    import time

    t0 = time.time()
    model = g.read(model_bytes)
    sg = model.subgraphs[0]
    samples = list(dataset())
    tensors = activation_tensors(model)
    conv_inputs = conv_input_tensors(model)
    with_means = sorted(set(conv_inputs.values()) & set(tensors))
    grid = method != "minmax"
    key = _statistics_key(model_bytes, samples, grid)
    reused = key in _STATISTICS
    shared = None
    grouping: dict = {}
    if not reused:
        stats = None
        if share and share.get("reuse"):
            stats, shared = _shared_statistics(model_bytes, tensors, samples, threads, grid, with_means)
            if stats is None:
                shared = {"statistics_shared_from": None, "why_not": shared}
        measure = dict(memory_bytes=memory_bytes, folder=folder, progress=progress, report=grouping, means=with_means)
        if stats is None and share and share.get("keep"):
            stats = _measure_to_share(model_bytes, tensors, samples, threads, grid, share["keep"], share["source"],
                                      **measure)
        if stats is None:
            stats = measure_statistics(model_bytes, tensors, samples, threads, grid=grid, **measure)
        _STATISTICS.clear()
        _STATISTICS[key] = (stats, shared, grouping.get("groups"))
    stats, shared, groups = _STATISTICS[key]
    if input_means is not None:
        input_means.clear()
        input_means.update(channel_means(stats, conv_inputs, len(samples)) or {})
    if input_ranges is not None:
        input_ranges.clear()
        input_ranges.update(channel_extremes(stats, conv_inputs, len(samples)) or {})
    t1 = time.time()
    chosen = choose_ranges(stats, bits, symmetric, method, through=activation_consumers(model, tensors),
                           produced_by=activation_outputs(model, tensors))
    per_tensor: Dict[str, dict] = {}
    for t, choice in chosen.items():
        lo, hi = choice["range"]
        q = sg.tensors[t].quantization or g.schema.QuantizationParametersT()
        q.min, q.max = [float(lo)], [float(hi)]
        q.scale, q.zeroPoint = None, None
        sg.tensors[t].quantization = q
        per_tensor[g.tensor_name(sg.tensors[t]) or f"tensor{t}"] = choice
    report = {"tensors": per_tensor, "methods": dict(collections.Counter(c["method"] for c in chosen.values())),
              "activation_bits": bits, "symmetric": symmetric, "method": method, "samples": len(samples),
              "statistics_reused": reused, **({"shared": shared} if shared else {}),
              **({"groups": groups} if groups else {}),
              "threads": threads, "seconds": round(time.time() - t0, 2), "choice_seconds": round(time.time() - t1, 2)}
    return g.write(model), report
