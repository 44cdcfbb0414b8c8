"""Read, inspect and rewrite .tflite flatbuffers (the ``tflite`` schema's object API).

Needs only ``flatbuffers`` and the schema module that LiteRT ships
(``ai_edge_litert.schema_py_generated``; TensorFlow's copy is the fallback), so the
runtime side can inspect files without TensorFlow.

Rewrites (each returns how many places it changed; none changes what the graph computes
beyond the rounding noted):

* :func:`set_io_names` -- name the I/O tensors after the signature keys and order the
  inputs ``image``, ``mask``.
* :func:`integerize` -- int8 files: turn ``DEQUANTIZE -> ELU -> QUANTIZE`` chains into one
  ELU on int8 tensors (bit-identical: LiteRT's int8 ELU is a lookup table of the same
  dequantize/ELU/quantize), and, with ``through`` ops, pull float regions made of
  data-movement ops (resize, concatenation, pads, slices) into int8 at the scale of the
  QUANTIZE that ends them (resizes then round in int8: a small, measured change).
* :func:`uint8_io` -- float files of the ``image`` signature: uint8 inputs cast to float,
  and the float output rounded (half to even) and cast to uint8.
* :func:`inputs_first` -- renumber the tensors so that the inputs are tensors 0, 1, ... in
  input order (LiteRT's Python API reports tensor indices beside the positional order; after
  this both say ``image`` = 0, ``mask`` = 1).
* :func:`add_metadata` -- a JSON metadata entry (Qualcomm-AI-Hub-style facts next to
  the weights).
"""
from __future__ import annotations

import collections
import json
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

try:
    from ai_edge_litert import schema_py_generated as schema
except ImportError:  # pragma: no cover - TensorFlow's copy of the same schema
    from tensorflow.lite.python import schema_py_generated as schema

FILE_IDENTIFIER = b"TFL3"
OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
DTYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
OP = schema.BuiltinOperator
T = schema.TensorType

# Ops that only move or resample data: in int8 they keep one scale in and out.
DATA_MOVEMENT_OPS = (
    "CONCATENATION",
    "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR",
    "MIRROR_PAD",
    "PAD",
    "SLICE",
    "STRIDED_SLICE",
    "RESHAPE",
)


# ---------------------------------------------------------------------------- I/O

def read(data: bytes):
    """A mutable ``ModelT`` of a .tflite file's bytes."""
    return schema.ModelT.InitFromPackedBuf(bytearray(data), 0)


def write(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def op_name(model, op) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    if builtin == OP.CUSTOM:
        name = code.customCode
        return f"CUSTOM:{name.decode() if isinstance(name, bytes) else name}"
    return OP_NAMES.get(builtin, f"OP{builtin}")


def tensor_name(tensor) -> str:
    n = tensor.name
    return n.decode() if isinstance(n, bytes) else (n or "")


def _ids(seq) -> List[int]:
    return [] if seq is None else [int(i) for i in seq]


def _quant(tensor) -> Tuple[Optional[float], Optional[int]]:
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        return None, None
    return float(q.scale[0]), int(q.zeroPoint[0])


def _set_quant(tensor, scale: float, zero_point: int) -> None:
    q = schema.QuantizationParametersT()
    q.scale = [float(scale)]
    q.zeroPoint = [int(zero_point)]
    q.quantizedDimension = 0
    tensor.quantization = q


# ---------------------------------------------------------------------- inventory

def op_counts(model) -> Dict[str, int]:
    counts = collections.Counter(op_name(model, op) for sg in model.subgraphs for op in sg.operators)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def float_ops_between_quantized(model) -> int:
    """Ops that compute in float32 inside a quantized graph (any op with a float activation input
    whose graph also has int8 or int16 activations)."""
    sg = model.subgraphs[0]
    has_int8 = any(t.type in (T.INT8, T.INT16) and not _is_constant(model, t) for t in sg.tensors)
    if not has_int8:
        return 0
    n = 0
    for op in sg.operators:
        name = op_name(model, op)
        if name in ("QUANTIZE", "DEQUANTIZE", "CAST"):
            continue
        ins = [sg.tensors[i] for i in _ids(op.inputs) if i >= 0]
        if any(t.type == T.FLOAT32 and not _is_constant(model, t) for t in ins):
            n += 1
    return n


def _is_constant(model, tensor) -> bool:
    buf = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    return buf is not None and buf.data is not None and len(buf.data) > 0


def inventory(data: bytes) -> Dict[str, object]:
    """Static facts about a .tflite file: op counts and quantization boundaries."""
    model = read(data)
    counts = op_counts(model)
    return {
        "ops": counts,
        "op_total": int(sum(counts.values())),
        "quantize": int(counts.get("QUANTIZE", 0)),
        "dequantize": int(counts.get("DEQUANTIZE", 0)),
        "float_compute_ops_in_int8_graph": float_ops_between_quantized(model),
    }


# --------------------------------------------------------------------- graph index

class _Index:
    """Producer/consumer maps of subgraph 0 (rebuilt after each structural change)."""

    def __init__(self, model):
        self.model = model
        self.sg = model.subgraphs[0]
        self.producer: Dict[int, int] = {}
        self.consumers: Dict[int, List[int]] = collections.defaultdict(list)
        for i, op in enumerate(self.sg.operators):
            for t in _ids(op.outputs):
                self.producer[t] = i
            for t in _ids(op.inputs):
                if t >= 0:
                    self.consumers[t].append(i)
        self.graph_outputs = set(_ids(self.sg.outputs))

    def name(self, op_index: int) -> str:
        return op_name(self.model, self.sg.operators[op_index])

    def only_consumer(self, tensor: int, op_index: int) -> bool:
        return self.consumers.get(tensor, []) == [op_index] and tensor not in self.graph_outputs


def _remove_ops(model, drop: Iterable[int]) -> None:
    drop = set(drop)
    sg = model.subgraphs[0]
    sg.operators = [op for i, op in enumerate(sg.operators) if i not in drop]
    _prune_tensors(model)


def _prune_tensors(model) -> None:
    """Drop tensors nothing refers to any more and renumber the rest."""
    sg = model.subgraphs[0]
    used = set(_ids(sg.inputs)) | set(_ids(sg.outputs))
    for op in sg.operators:
        used |= {t for t in _ids(op.inputs) if t >= 0}
        used |= set(_ids(op.outputs))
        used |= set(_ids(op.intermediates))
    for sig in model.signatureDefs or []:
        used |= {m.tensorIndex for m in (sig.inputs or []) + (sig.outputs or [])}
    keep = sorted(used)
    dropped_buffers = {sg.tensors[i].buffer for i in range(len(sg.tensors)) if i not in used}
    kept_buffers = {sg.tensors[i].buffer for i in keep}
    for b in dropped_buffers - kept_buffers:
        if b:  # buffer 0 is the shared empty buffer
            model.buffers[b].data = None
    _renumber_tensors(model, keep)


def _renumber_tensors(model, order: Sequence[int]) -> None:
    """Keep subgraph 0's tensors listed in ``order``, numbered 0, 1, ... in that order, and
    update every reference to them (subgraph I/O, op inputs/outputs/intermediates, signatures)."""
    sg = model.subgraphs[0]
    remap = {old: new for new, old in enumerate(order)}
    sg.tensors = [sg.tensors[i] for i in order]
    sg.inputs = [remap[t] for t in _ids(sg.inputs)]
    sg.outputs = [remap[t] for t in _ids(sg.outputs)]
    for op in sg.operators:
        op.inputs = [remap[t] if t >= 0 else t for t in _ids(op.inputs)]
        op.outputs = [remap[t] for t in _ids(op.outputs)]
        if op.intermediates is not None:
            op.intermediates = [remap[t] for t in _ids(op.intermediates)]
    for sig in model.signatureDefs or []:
        for m in (sig.inputs or []) + (sig.outputs or []):
            m.tensorIndex = remap[m.tensorIndex]


def _opcode_index(model, builtin: int, version: int = 1) -> int:
    for i, code in enumerate(model.operatorCodes):
        if max(int(code.builtinCode), int(code.deprecatedBuiltinCode)) == builtin and code.version == version:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _new_tensor(model, like, dtype: int, name: str) -> int:
    sg = model.subgraphs[0]
    t = schema.TensorT()
    t.shape = list(_ids(like.shape))
    t.shapeSignature = None
    t.type = dtype
    t.buffer = 0
    t.name = name
    t.quantization = None
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _new_op(model, builtin: int, inputs: Sequence[int], outputs: Sequence[int], options=None, options_type: int = 0):
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(model, builtin)
    op.inputs = list(inputs)
    op.outputs = list(outputs)
    op.builtinOptionsType = options_type
    op.builtinOptions = options
    return op


# ------------------------------------------------------------------------ rewrites

def signature_io(model) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(inputs, outputs) of the first signature as {key: tensor index}."""
    sig = model.signatureDefs[0]
    key = lambda m: m.name.decode() if isinstance(m.name, bytes) else m.name  # noqa: E731
    return ({key(m): m.tensorIndex for m in sig.inputs}, {key(m): m.tensorIndex for m in sig.outputs})


def inputs_first(model) -> int:
    """Renumber the tensors so that subgraph 0's inputs are tensors 0..n-1 in input order; returns
    how many input tensors changed number. Only numbering changes: the graph computes the same."""
    sg = model.subgraphs[0]
    inputs = _ids(sg.inputs)
    rest = [t for t in range(len(sg.tensors)) if t not in set(inputs)]
    moved = sum(t != i for i, t in enumerate(inputs))
    if moved:
        _renumber_tensors(model, inputs + rest)
    return moved


def set_io_names(model, input_order: Sequence[str] = ("image", "mask")) -> int:
    """Name I/O tensors after their signature keys; order subgraph inputs as ``input_order``."""
    sg = model.subgraphs[0]
    ins, outs = signature_io(model)
    for key, t in list(ins.items()) + list(outs.items()):
        sg.tensors[t].name = key
    order = [ins[k] for k in input_order if k in ins] + [t for k, t in ins.items() if k not in input_order]
    sg.inputs = order
    sig = model.signatureDefs[0]
    sig.inputs = sorted(sig.inputs, key=lambda m: order.index(m.tensorIndex))
    return len(ins) + len(outs)


ELEMENTWISE_UNARY = ("QUANTIZE", "DEQUANTIZE", "CAST")


TO_NCHW = (0, 3, 1, 2)
TO_NHWC = (0, 2, 3, 1)
# Ops a channels-first region may hold (besides the transposes around it): what each does to a layout.
LAYOUT_FREE_UNARY = ("ELU", "RELU", "RELU6", "TANH", "LOGISTIC") + ELEMENTWISE_UNARY
LAYOUT_FREE_BINARY = ("ADD", "SUB", "MUL")
LAYOUT_AWARE = ("STRIDED_SLICE", "SLICE", "PAD", "CONCATENATION")


def _const_values(model, tensor: int) -> Optional[np.ndarray]:
    sg = model.subgraphs[0]
    t = sg.tensors[tensor]
    if not _is_constant(model, t) or t.type not in (T.INT32, T.INT64):
        return None
    return np.frombuffer(bytes(model.buffers[t.buffer].data), dtype=np.int32 if t.type == T.INT32 else np.int64)


def _transpose_perm(model, idx: "_Index", op_index: int) -> Optional[Tuple[int, ...]]:
    if idx.name(op_index) != "TRANSPOSE":
        return None
    perm = _const_values(model, _ids(idx.sg.operators[op_index].inputs)[1])
    return None if perm is None else tuple(int(v) for v in perm)


def nhwc_outputs(model) -> int:
    """Drop a TRANSPOSE to NCHW (perm 0,3,1,2) that ends the graph, so outputs stay NHWC.

    onnx2tf keeps most outputs channels-last but sometimes transposes one back to the ONNX
    layout; elementwise ops (QUANTIZE, DEQUANTIZE, CAST) between it and the output are kept,
    with their tensors' shapes permuted back.
    """
    changed = 0
    idx = _Index(model)
    sg = idx.sg
    drop = []
    for out in _ids(sg.outputs):
        chain, t = [], out
        while t in idx.producer and idx.name(idx.producer[t]) in ELEMENTWISE_UNARY:
            chain.append(t)
            t = _ids(sg.operators[idx.producer[t]].inputs)[0]
        p = idx.producer.get(t)
        if p is None or _transpose_perm(model, idx, p) != TO_NCHW:
            continue
        src = _ids(sg.operators[p].inputs)[0]
        if idx.consumers.get(src) != [p]:
            continue
        # the transpose's consumers (or the graph output) read its input instead
        for c in idx.consumers.get(t, []):
            sg.operators[c].inputs = [src if i == t else i for i in _ids(sg.operators[c].inputs)]
        if t == out:
            sg.outputs = [src if i == out else i for i in _ids(sg.outputs)]
            for sig in model.signatureDefs or []:
                for m in sig.outputs or []:
                    if m.tensorIndex == out:
                        m.tensorIndex = src
        for c in chain:
            n, c_, h, w = _ids(sg.tensors[c].shape)
            sg.tensors[c].shape = [n, h, w, c_]
            if sg.tensors[c].shapeSignature is not None:
                sg.tensors[c].shapeSignature = [n, h, w, c_]
        drop.append(p)
        changed += 1
    if drop:
        _remove_ops(model, drop)
    return changed


def _one_channel_to_nhwc(idx: "_Index", op_index: int) -> bool:
    """A RESHAPE of (N, 1, H, W) to (N, H, W, 1): a transpose to NHWC of a one-channel tensor (onnx2tf writes it so)."""
    if idx.name(op_index) != "RESHAPE":
        return False
    op = idx.sg.operators[op_index]
    shape_in = _ids(idx.sg.tensors[_ids(op.inputs)[0]].shape)
    shape_out = _ids(idx.sg.tensors[_ids(op.outputs)[0]].shape)
    return len(shape_in) == 4 and shape_in[1] == 1 and shape_out == [shape_in[0], shape_in[2], shape_in[3], 1]


def _layout_inputs(model, op, name: str) -> Optional[List[int]]:
    """The inputs of a region op that carry its layout (the data, not the parameters); None for a binary op with a
    constant that is not a scalar (broadcasting it would depend on the layout)."""
    if name in LAYOUT_FREE_UNARY + ("STRIDED_SLICE", "SLICE", "PAD"):
        return [_ids(op.inputs)[0]]
    inputs = [i for i in _ids(op.inputs) if i >= 0]
    tensors = model.subgraphs[0].tensors
    constants = [i for i in inputs if _is_constant(model, tensors[i])]
    if name in LAYOUT_FREE_BINARY and any(int(np.prod(_ids(tensors[i].shape))) != 1 for i in constants):
        return None
    return [i for i in inputs if i not in constants]


def _channels_first_region(model, idx: "_Index", entry: int):
    """The channels-first region that TRANSPOSE ``entry`` (to NCHW) opens: (entries, region ops, exits, tensors),
    every tensor in it 4-D and read only by region ops or by TRANSPOSEs back to NHWC (exits); None where
    something reads a region tensor in its NCHW layout (another op, a graph output) or a region op reads a
    tensor from outside."""
    sg = idx.sg
    entries, ops, exits, tensors = {entry}, set(), set(), set()
    work = [_ids(sg.operators[entry].outputs)[0]]
    while work:
        t = work.pop()
        if t in tensors:
            continue
        if t in idx.graph_outputs or len(_ids(sg.tensors[t].shape)) != 4:
            return None
        tensors.add(t)
        for c in idx.consumers.get(t, []):
            if c in ops or c in exits:
                continue
            name = idx.name(c)
            if _transpose_perm(model, idx, c) == TO_NHWC or _one_channel_to_nhwc(idx, c):
                if _ids(sg.operators[c].outputs)[0] in idx.graph_outputs:
                    return None
                exits.add(c)
                continue
            if name not in LAYOUT_FREE_UNARY + LAYOUT_FREE_BINARY + LAYOUT_AWARE:
                return None
            op = sg.operators[c]
            if name == "STRIDED_SLICE":
                o = op.builtinOptions
                if o is not None and (o.ellipsisMask or o.newAxisMask or o.shrinkAxisMask or getattr(o, "offset", False)):
                    return None
            activations = _layout_inputs(model, op, name)
            if activations is None:
                return None
            if name in ("STRIDED_SLICE", "SLICE", "PAD") and any(
                    _const_values(model, i) is None for i in _ids(op.inputs)[1:] if i >= 0):
                return None
            for i in activations:
                if i in tensors or i in work:
                    continue
                p = idx.producer.get(i)
                if p is not None and _transpose_perm(model, idx, p) == TO_NCHW:
                    entries.add(p)
                    work.append(i)
                elif p is not None and p in ops:
                    work.append(i)
                else:
                    return None  # a region op reading a tensor from outside in NCHW layout: leave it
            if name in LAYOUT_FREE_BINARY and len({tuple(_ids(sg.tensors[i].shape)) for i in activations}) != 1:
                return None  # broadcasting: its layout depends on both shapes
            ops.add(c)
            work.extend(_ids(op.outputs))
    # every region op's producer must be inside too (an op added before its other inputs were seen)
    for c in ops:
        op = sg.operators[c]
        name = idx.name(c)
        if any(i not in tensors for i in _layout_inputs(model, op, name)):
            return None
    return entries, ops, exits, tensors


def channels_last(model) -> int:
    """Remove channels-first detours: a TRANSPOSE to NCHW, ops that do not care about the layout or whose
    parameters can be permuted (elementwise ops, STRIDED_SLICE, SLICE, PAD, CONCATENATION), then TRANSPOSEs
    back to NHWC. onnx2tf leaves such regions where it cannot infer a layout (after the sums of an input-grouped
    convolution, :mod:`export.input_groups`: 190 transposes at 512x680, 1.5x the latency). The region's ops run
    on the NHWC tensors instead, with their slice bounds, paddings and concatenation axes permuted; exact (only
    data movement changes). Returns the number of TRANSPOSE ops removed."""
    removed = 0
    while True:
        idx = _Index(model)
        sg = idx.sg
        region = None
        for i in range(len(sg.operators)):
            if _transpose_perm(model, idx, i) == TO_NCHW and len(_ids(sg.tensors[_ids(sg.operators[i].inputs)[0]].shape)) == 4:
                region = _channels_first_region(model, idx, i)
                if region is not None:
                    break
        if region is None:
            return removed
        entries, ops, exits, tensors = region
        rename: Dict[int, int] = {}
        for e in entries:
            rename[_ids(sg.operators[e].outputs)[0]] = _ids(sg.operators[e].inputs)[0]
        for t in tensors - set(rename):
            n, c, h, w = _ids(sg.tensors[t].shape)
            sg.tensors[t].shape = [n, h, w, c]
            if sg.tensors[t].shapeSignature is not None and len(sg.tensors[t].shapeSignature) == 4:
                a, b, d, e_ = _ids(sg.tensors[t].shapeSignature)
                sg.tensors[t].shapeSignature = [a, d, e_, b]
        for x in exits:
            rename[_ids(sg.operators[x].outputs)[0]] = rename.get(_ids(sg.operators[x].inputs)[0],
                                                                   _ids(sg.operators[x].inputs)[0])
        for c in sorted(ops):
            op = sg.operators[c]
            name = idx.name(c)
            inputs = _ids(op.inputs)
            if name in ("STRIDED_SLICE", "SLICE"):
                for k in range(1, len(inputs)):
                    v = _const_values(model, inputs[k])
                    inputs[k] = _const_tensor(model, v[list(TO_NHWC)].astype(np.int32),
                                              f"{tensor_name(sg.tensors[inputs[k]]) or 'slice'}/nhwc")
                o = op.builtinOptions
                if name == "STRIDED_SLICE" and o is not None:
                    o.beginMask = sum(1 << j for j, a in enumerate(TO_NHWC) if o.beginMask >> a & 1)
                    o.endMask = sum(1 << j for j, a in enumerate(TO_NHWC) if o.endMask >> a & 1)
            elif name == "PAD":
                pads = _const_values(model, inputs[1]).reshape(4, 2)
                inputs[1] = _const_tensor(model, pads[list(TO_NHWC)].astype(np.int32),
                                          f"{tensor_name(sg.tensors[inputs[1]]) or 'pad'}/nhwc")
            elif name == "CONCATENATION":
                op.builtinOptions.axis = TO_NCHW[op.builtinOptions.axis % 4]
            op.inputs = [rename.get(i, i) for i in inputs]
        outside = set(range(len(sg.operators))) - ops - entries - exits
        for c in outside:
            op = sg.operators[c]
            op.inputs = [rename.get(i, i) if i >= 0 else i for i in _ids(op.inputs)]
        removed += len(entries) + len(exits)
        model.__dict__.pop("_gmcnn_consts", None)
        _remove_ops(model, entries | exits)


def integerize(model, through: Sequence[str] = ()) -> int:
    """Move float regions that end in a QUANTIZE into int8; returns how many regions moved.

    A region is the float subgraph feeding one QUANTIZE, made only of ``through`` ops
    (data movement, one scale in and out) and bounded by ``DEQUANTIZE -> ELU`` pairs or
    bare DEQUANTIZEs. With ``through=()`` only ``DEQUANTIZE -> ELU -> QUANTIZE`` chains move.
    Every tensor of the region takes the QUANTIZE's scale and zero point; each boundary ELU
    reads the int8 tensor its DEQUANTIZE read; a bare DEQUANTIZE becomes a requantizing
    QUANTIZE (int8 -> int8). Regions whose float tensors are also used elsewhere stay float.
    """
    changed = 0
    while True:
        idx = _Index(model)
        plan = None
        for qi, op in enumerate(idx.sg.operators):
            if idx.name(qi) != "QUANTIZE":
                continue
            src, dst = _ids(op.inputs)[0], _ids(op.outputs)[0]
            if idx.sg.tensors[src].type != T.FLOAT32 or idx.sg.tensors[dst].type != T.INT8:
                continue
            plan = _plan_region(idx, qi, set(through))
            if plan is not None:
                break
        if plan is None:
            return changed
        _apply_region(model, idx, plan)
        changed += 1


def _plan_region(idx: _Index, quantize_op: int, through: set):
    sg = idx.sg
    start = _ids(sg.operators[quantize_op].inputs)[0]
    region_ops, elus, dequants, float_tensors = [], [], [], []
    stack = [(start, quantize_op)]
    seen = set()
    while stack:
        tensor, consumer = stack.pop()
        if tensor in seen:
            return None  # a float tensor read twice inside the region: keep it simple, stay float
        seen.add(tensor)
        if not idx.only_consumer(tensor, consumer) or tensor not in idx.producer:
            return None
        float_tensors.append(tensor)
        p = idx.producer[tensor]
        kind = idx.name(p)
        inputs = [t for t in _ids(sg.operators[p].inputs) if t >= 0]
        if kind == "ELU":
            d = idx.producer.get(inputs[0])
            if d is None or idx.name(d) != "DEQUANTIZE" or not idx.only_consumer(inputs[0], p):
                return None
            if sg.tensors[_ids(sg.operators[d].inputs)[0]].type != T.INT8:
                return None
            elus.append((p, d))
        elif kind == "DEQUANTIZE":
            if sg.tensors[inputs[0]].type != T.INT8:
                return None
            dequants.append(p)
        elif kind in through:
            region_ops.append(p)
            activations = [t for t in inputs if not _is_constant(idx.model, sg.tensors[t])]
            for t in activations:
                if sg.tensors[t].type != T.FLOAT32:
                    return None
                stack.append((t, p))
        else:
            return None
    return {"quantize": quantize_op, "region_ops": region_ops, "elus": elus, "dequants": dequants,
            "float_tensors": float_tensors}


def _apply_region(model, idx: _Index, plan) -> None:
    sg = idx.sg
    q_op = sg.operators[plan["quantize"]]
    q_out = _ids(q_op.outputs)[0]
    scale, zero_point = _quant(sg.tensors[q_out])
    for t in plan["float_tensors"]:
        sg.tensors[t].type = T.INT8
        _set_quant(sg.tensors[t], scale, zero_point)
    drop = {plan["quantize"]}
    for elu, dq in plan["elus"]:
        sg.operators[elu].inputs = [_ids(sg.operators[dq].inputs)[0]]
        drop.add(dq)
    for dq in plan["dequants"]:
        op = sg.operators[dq]
        src = _ids(op.inputs)[0]
        if _quant(sg.tensors[src]) == (scale, zero_point):
            # same scale: consumers read the int8 tensor directly
            out = _ids(op.outputs)[0]
            for c in idx.consumers.get(out, []):
                sg.operators[c].inputs = [src if t == out else t for t in _ids(sg.operators[c].inputs)]
            drop.add(dq)
        else:
            op.opcodeIndex = _opcode_index(model, OP.QUANTIZE)
            op.builtinOptionsType, op.builtinOptions = 0, None
    # the region's last op now writes the QUANTIZE's output tensor
    last = idx.producer[plan["float_tensors"][0]]
    sg.operators[last].outputs = [q_out if t == plan["float_tensors"][0] else t for t in _ids(sg.operators[last].outputs)]
    _remove_ops(model, drop)


def conv_nodes(model) -> List[Tuple[str, int]]:
    """(output tensor name, op index) of every CONV_2D: the name identifies a convolution across
    the fp32, int8-dynamic and calibrated files of one saved_model (the converter's ``denylisted_nodes``)."""
    sg = model.subgraphs[0]
    return [(tensor_name(sg.tensors[_ids(op.outputs)[0]]), i) for i, op in enumerate(sg.operators)
            if op_name(model, op) == "CONV_2D"]


def conv_weights(model, op_index: int) -> np.ndarray:
    """A CONV_2D's filter as float32 (O, H, W, I), dequantized (per output channel) when stored as int8."""
    sg = model.subgraphs[0]
    t = sg.tensors[_ids(sg.operators[op_index].inputs)[1]]
    raw = bytes(model.buffers[t.buffer].data)
    shape = [int(v) for v in _ids(t.shape)]
    if t.type == T.FLOAT32:
        return np.frombuffer(raw, np.float32).reshape(shape)
    if t.type == T.INT8:
        scale = np.asarray(t.quantization.scale, np.float32).reshape(-1, *([1] * (len(shape) - 1)))
        return np.frombuffer(raw, np.int8).reshape(shape).astype(np.float32) * scale
    raise ValueError(f"convolution filter of type {DTYPE_NAMES.get(t.type, t.type)}")


def _walk_back(idx: "_Index", tensor: int):
    """From ``tensor`` back through non-convolution ops: yields ``("conv", tensor)`` for each CONV_2D
    output reached (not walked past) and ``("op", op_index)`` for each other op passed through."""
    model, sg = idx.model, idx.sg
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen or t not in idx.producer:
            continue
        seen.add(t)
        p = idx.producer[t]
        if idx.name(p) == "CONV_2D":
            yield "conv", t
            continue
        yield "op", p
        stack.extend(u for u in _ids(sg.operators[p].inputs) if u >= 0 and not _is_constant(model, sg.tensors[u]))


def conv_producers(model) -> Dict[str, List[str]]:
    """For each CONV_2D (by output name), the CONV_2Ds whose outputs reach its input through
    non-convolution ops only (activations, resizes, concatenations, pads, (de)quantization)."""
    idx = _Index(model)
    sg = idx.sg
    return {name: sorted({tensor_name(sg.tensors[t]) for kind, t in _walk_back(idx, _ids(sg.operators[i].inputs)[0])
                          if kind == "conv"})
            for name, i in conv_nodes(model)}


#: Ops that only move or combine activations: between two float convolutions an int8 file would
#: still round their outputs on their own calibrated ranges unless they are denylisted too.
_PASS_THROUGH_OPS = ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "CONCATENATION", "PAD", "MIRROR_PAD",
                     "STRIDED_SLICE", "SLICE")


def ops_between_convs(model, float_convs: Iterable[str]) -> List[str]:
    """Output names of the resizes, concatenations, pads and slices that lie between convolutions of
    ``float_convs`` only: walking back from each such convolution's input through non-convolution ops,
    every op of :data:`_PASS_THROUGH_OPS` whose own inputs reach convolutions, all of them in
    ``float_convs``. Ops fed by an integer convolution are left out; those fed by the graph's inputs
    alone are :func:`io_path_ops`'."""
    idx = _Index(model)
    sg = idx.sg
    chosen = set(float_convs)
    conv_ops = dict(conv_nodes(model))
    out = set()
    for name in chosen & set(conv_ops):
        for kind, p in _walk_back(idx, _ids(sg.operators[conv_ops[name]].inputs)[0]):
            if kind != "op" or idx.name(p) not in _PASS_THROUGH_OPS:
                continue
            convs = {tensor_name(sg.tensors[t]) for u in _ids(sg.operators[p].inputs)
                     if u >= 0 and not _is_constant(idx.model, sg.tensors[u])
                     for kind2, t in _walk_back(idx, u) if kind2 == "conv"}
            if convs and convs <= chosen:
                out.add(tensor_name(sg.tensors[_ids(sg.operators[p].outputs)[0]]))
    return sorted(out)


def io_path_ops(model, float_convs: Iterable[str]) -> List[str]:
    """Output names of the ops that join the graph's inputs and outputs to convolutions of ``float_convs``
    with no convolution on the way: walking back from such a convolution's input, every op that no
    convolution feeds (the input path: normalisation, the hole, the masked image, their concatenation);
    walking forward from its output, every op that reaches the graph's outputs and no convolution (the
    output tail: the compositing of an ``image`` file).

    Left int8, the input path rounds the network's input on its calibrated grid: the normalised pixel
    ``p / 127.5 - 1`` falls exactly between two int8 steps of the [-1, 1] grid for every p, so the
    rounding direction follows float noise, and a branch kept float for its sensitivity still reads
    that rounded input (at 1024x1360 the shipped model's int8 file with b2, b3 and the merge float:
    42.5 dB with its input path int8, 70 dB with it float)."""
    idx = _Index(model)
    sg = idx.sg
    chosen = set(float_convs)
    conv_ops = {i: name for name, i in conv_nodes(model)}
    # tensors no convolution has touched: the graph's inputs, then every op output computed from them alone
    untouched = set(_ids(sg.inputs))
    for i, op in enumerate(sg.operators):
        if i in conv_ops:
            continue
        live = [t for t in _ids(op.inputs) if t >= 0 and not _is_constant(model, sg.tensors[t])]
        if live and all(t in untouched for t in live):
            untouched.update(_ids(op.outputs))
    # tensors that reach the graph's outputs through non-convolution ops only
    reaching = set(idx.graph_outputs)
    for i in reversed(range(len(sg.operators))):
        if i not in conv_ops and any(t in reaching for t in _ids(sg.operators[i].outputs)):
            reaching.update(t for t in _ids(sg.operators[i].inputs) if t >= 0)
    float_ops = [i for i, name in conv_ops.items() if name in chosen]
    out = set()
    for i in float_ops:
        for kind, p in _walk_back(idx, _ids(sg.operators[i].inputs)[0]):
            if kind == "op" and all(t in untouched for t in _ids(sg.operators[p].outputs)):
                out.add(tensor_name(sg.tensors[_ids(sg.operators[p].outputs)[0]]))
    # the tail, in execution order: ops fed by a float convolution or the tail that reach the outputs
    fed = {t for i in float_ops for t in _ids(sg.operators[i].outputs)}
    tail_inputs = []
    for i, op in enumerate(sg.operators):
        outs = _ids(op.outputs)
        if i not in conv_ops and any(t in fed for t in _ids(op.inputs)) and any(t in reaching for t in outs):
            out.add(tensor_name(sg.tensors[outs[0]]))
            fed.update(outs)
            tail_inputs.extend(_ids(op.inputs))
    # what the tail reads from the inputs (the pixels, the hole) is computed in float too
    for t in tail_inputs:
        if t >= 0 and t in untouched:
            for kind, p in _walk_back(idx, t):
                out.add(tensor_name(sg.tensors[_ids(sg.operators[p].outputs)[0]]))
    return sorted(out)


def conv_macs(model) -> List[Dict[str, object]]:
    """Per CONV_2D: output name, multiply-accumulates of one inference, and the types of its
    input activation, filter and bias (``int8``/``int16`` activations compute in integers; an int8
    filter with a float32 input is a dynamic-range (hybrid) convolution, its bias float32; bias
    ``none`` without one)."""
    sg = model.subgraphs[0]
    rows = []
    for name, i in conv_nodes(model):
        op = sg.operators[i]
        ins = _ids(op.inputs)
        x, w = (sg.tensors[t] for t in ins[:2])
        b = sg.tensors[ins[2]] if len(ins) > 2 and ins[2] >= 0 else None
        o = sg.tensors[_ids(op.outputs)[0]]
        cout, kh, kw, cin = (int(v) for v in _ids(w.shape))
        _, oh, ow, _ = (int(v) for v in _ids(o.shape))
        rows.append({"node": name, "macs": oh * ow * cout * kh * kw * cin,
                     "input": DTYPE_NAMES.get(x.type, str(x.type)), "weights": DTYPE_NAMES.get(w.type, str(w.type)),
                     "bias": "none" if b is None else DTYPE_NAMES.get(b.type, str(b.type))})
    return rows


def _rebuffer(model, tensor, raw: bytes) -> None:
    """Give a constant ``tensor`` of subgraph 0 a new buffer holding ``raw``; its old buffer is emptied when no
    other tensor shares it (a converter may share one buffer between equal constants)."""
    old = tensor.buffer
    buf = schema.BufferT()
    buf.data = np.frombuffer(raw, np.uint8).copy()
    model.buffers.append(buf)
    tensor.buffer = len(model.buffers) - 1
    if old and not any(t.buffer == old for t in model.subgraphs[0].tensors):
        model.buffers[old].data = None


def float32_scalars(model, float_model) -> int:
    """A float16 converter output with its one-value constants float32 again: each DEQUANTIZE of a float16 scalar
    constant gives way to the float32 constant the fp32 conversion of the same saved_model (``float_model``) has in
    its place -- the two list the same ops in one order apart from the DEQUANTIZEs, matched by op and input
    position, and only where the float32 value rounds to the float16 one. The elementwise ops' constants (an
    ``image`` graph's normalisation by 1/127.5, which float16 does not hold, and 127.5, 1, 127, 255) then are the
    fp32 file's, as the contract computes them, and the weights stay float16. The dequantized tensor becomes that
    constant (its name kept). Returns how many were replaced; 0 where the op lists differ."""
    sg, fsg = model.subgraphs[0], float_model.subgraphs[0]
    ops = [op for op in sg.operators if op_name(model, op) != "DEQUANTIZE"]
    if [op_name(model, op) for op in ops] != [op_name(float_model, op) for op in fsg.operators]:
        return 0
    producer = {t: i for i, op in enumerate(sg.operators) for t in _ids(op.outputs)}
    replaced = set()
    for op, fop in zip(ops, fsg.operators):
        for t, ft in zip(_ids(op.inputs), _ids(fop.inputs)):
            i = producer.get(t)
            if i is None or i in replaced or op_name(model, sg.operators[i]) != "DEQUANTIZE":
                continue
            half, single = sg.tensors[_ids(sg.operators[i].inputs)[0]], fsg.tensors[ft]
            if (half.type != T.FLOAT16 or single.type != T.FLOAT32 or not _is_constant(model, half)
                    or not _is_constant(float_model, single)):
                continue
            h = np.frombuffer(bytes(np.asarray(model.buffers[half.buffer].data, np.uint8)), np.float16)
            f = np.frombuffer(bytes(np.asarray(float_model.buffers[single.buffer].data, np.uint8)), np.float32)
            if h.size != 1 or f.size != 1 or np.float16(f[0]) != h[0]:
                continue
            _rebuffer(model, sg.tensors[t], f.tobytes())
            replaced.add(i)
    _remove_ops(model, replaced)
    return len(replaced)


def restore_float_weights(model, float_model, names: Iterable[str]) -> int:
    """Give the named CONV_2Ds of a dynamic-range file back the float32 filters of ``float_model``
    (the fp32 file of the same saved_model): those convolutions then run in float, their inputs
    unquantized. Returns how many changed; an unknown name is a ValueError."""
    wanted = set(names)
    ours = dict(conv_nodes(model))
    theirs = dict(conv_nodes(float_model))
    unknown = sorted((wanted - set(ours)) | (wanted - set(theirs)))
    if unknown:
        raise ValueError(f"no convolution named {unknown[:3]}")
    sg, fsg = model.subgraphs[0], float_model.subgraphs[0]
    changed = 0
    for name in sorted(wanted):
        w = sg.tensors[_ids(sg.operators[ours[name]].inputs)[1]]
        fw = fsg.tensors[_ids(fsg.operators[theirs[name]].inputs)[1]]
        if w.type == T.FLOAT32:
            continue  # too small to have been quantized
        if list(_ids(w.shape)) != list(_ids(fw.shape)) or fw.type != T.FLOAT32:
            raise ValueError(f"{name}: filters differ in shape or type between the two files")
        _rebuffer(model, w, bytes(float_model.buffers[fw.buffer].data))
        w.type = T.FLOAT32
        w.quantization = None
        changed += 1
    _prune_tensors(model)
    return changed


def set_conv_levels(model, levels: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Tuple[List[str], List[str]]:
    """Write other int8 levels into the int8 filters of the named CONV_2Ds, on the file's own grid.

    ``levels``: output tensor name -> (int8 levels (O, H, W, I), the per-output-channel scale (O,) they were
    chosen on). A filter whose stored scales are not those (to 1e-6 relative: a quantizer that widened a scale, or
    another grid) is left as the converter wrote it. A float filter (kept float) is skipped. Returns (the names
    written, the names left for their scales); a filter of another shape is a ValueError."""
    sg = model.subgraphs[0]
    written, mismatched = [], []
    for name, i in conv_nodes(model):
        if name not in levels:
            continue
        w = sg.tensors[_ids(sg.operators[i].inputs)[1]]
        if w.type != T.INT8:
            continue
        new, scale = levels[name]
        shape = [int(v) for v in _ids(w.shape)]
        if list(new.shape) != shape:
            raise ValueError(f"{name}: levels of shape {list(new.shape)} for a filter of shape {shape}")
        stored = np.asarray(w.quantization.scale, np.float64)
        if stored.shape != np.shape(scale) or not np.allclose(stored, np.asarray(scale, np.float64), rtol=1e-6, atol=0):
            mismatched.append(name)
            continue
        _rebuffer(model, w, np.ascontiguousarray(new, np.int8).tobytes())
        written.append(name)
    return written, mismatched


def correct_conv_biases(model, float_filters: Dict[str, np.ndarray], input_means: Dict[str, np.ndarray]) -> int:
    """Bias correction of a dynamic-range file (int8 filters, float32 biases): each named CONV_2D whose filter is
    int8 gets ``bias[o] -= sum over taps and input channels of (dequantized - float filter)[o] * input mean``, the
    mean shift its rounded weights put on its output where its input has the calibration samples' channel means.

    ``float_filters``: output tensor name -> the convolution's float32 filter (O, H, W, I); ``input_means``: the
    same names -> its input's per-channel mean (I,). A convolution with a float32 filter (kept float) or no bias is
    left alone. Returns how many biases changed; a filter of another shape is a ValueError."""
    sg = model.subgraphs[0]
    changed = 0
    for name, i in conv_nodes(model):
        if name not in float_filters or name not in input_means:
            continue
        ids = _ids(sg.operators[i].inputs)
        w = sg.tensors[ids[1]]
        if w.type != T.INT8 or len(ids) < 3 or ids[2] < 0:
            continue
        b = sg.tensors[ids[2]]
        if b.type != T.FLOAT32:
            continue
        error = conv_weights(model, i) - float_filters[name]  # (O, H, W, I)
        mean = np.asarray(input_means[name], np.float64)
        if error.shape[-1] != mean.shape[0]:
            raise ValueError(f"{name}: {mean.shape[0]} input means for a filter of {error.shape[-1]} input channels")
        shift = error.astype(np.float64).sum(axis=(1, 2)) @ mean
        bias = np.frombuffer(bytes(model.buffers[b.buffer].data), np.float32).astype(np.float64)
        if bias.shape != shift.shape:
            raise ValueError(f"{name}: {bias.shape[0]} biases for {shift.shape[0]} output channels")
        _rebuffer(model, b, (bias - shift).astype(np.float32).tobytes())
        changed += 1
    return changed


# The 16x8 quantizer names the int16 tensor of a float one it must keep apart (the graph's last convolution, whose
# float output the graph returns) after it with this suffix; the other convolutions keep their float names.
INT16_SUFFIX = "_int16"


def _existing_opcode(model, builtin: int) -> int:
    """An operator code of ``builtin`` the file already has (the version its converter chose for the types it
    uses), or a new one of version 1."""
    for i, code in enumerate(model.operatorCodes):
        if max(int(code.builtinCode), int(code.deprecatedBuiltinCode)) == builtin:
            return i
    return _opcode_index(model, builtin)


def _copy_constant(model, source, tensor, name: str) -> int:
    """A new constant tensor of subgraph 0 holding a copy of ``tensor`` of model ``source`` (its bytes, shape and
    type; no quantization)."""
    buf = schema.BufferT()
    buf.data = np.frombuffer(bytes(source.buffers[tensor.buffer].data), np.uint8).copy()
    model.buffers.append(buf)
    t = schema.TensorT()
    t.shape = list(_ids(tensor.shape))
    t.type = tensor.type
    t.buffer = len(model.buffers) - 1
    t.name = name
    t.quantization = None
    model.subgraphs[0].tensors.append(t)
    return len(model.subgraphs[0].tensors) - 1


def _rounds_to(float_filter: np.ndarray, int8_tensor, dequantized: np.ndarray) -> bool:
    """Whether ``dequantized`` (an int8 filter per output channel, as float) is ``float_filter`` rounded: within
    half a step of its channel's scale everywhere. The scale, not the channel's largest weight: a quantizer may
    widen a channel's scale so that a large bias fits its integer type (the 16x8 quantizer does, rounding that
    channel's weights to zero)."""
    scale = np.asarray(int8_tensor.quantization.scale, np.float32).reshape(-1, *([1] * (float_filter.ndim - 1)))
    return bool(np.all(np.abs(dequantized - float_filter) <= 0.5 * scale * (1 + 1e-3) + 1e-12))


def float_convs_16x8(model, float_model, names: Iterable[str]) -> int:
    """Make the named CONV_2Ds of a 16x8 file (int16 activations, int8 filters per output channel, int64 biases)
    compute in float32 with the filters and biases of ``float_model`` (the calibrated float model the file was
    quantized from: same graph, same convolution names). The 16x8 quantizer has no list of float nodes
    (``mlir_quantize`` has one, but its int16 path writes conv outputs with a nonzero zero point, which LiteRT's
    16x8 kernels refuse), so this is done on its output. Returns how many changed; an unknown name, or one
    whose filters do not match, is a ValueError.

    For each named convolution (by output tensor name; the quantizer's ``_int16`` name of the last one is
    accepted under its float name):

    * its input: the float tensor the int16 one was quantized from, where a QUANTIZE of a float tensor made it
      (an ELU output: the convolution then reads it unrounded, as in the float model), else a DEQUANTIZE of
      the int16 tensor (a concatenation or resize kept in int16 made it);
    * its output: a float32 tensor with the convolution's float name; the DEQUANTIZEs that read the int16
      output (the ELU after it) read this one instead and go, and a QUANTIZE to the old int16 tensor (its
      scale kept) is added only where an int16 op or the graph output still reads it;
    * the QUANTIZEs and DEQUANTIZEs no op reads any more, and the int8 filters and int64 biases, are removed.

    Two float convolutions in a row thus keep the whole tensor between them (ELU included) in float.
    """
    wanted = set(names)
    theirs = dict(conv_nodes(float_model))
    ours: Dict[str, int] = {}
    for name, i in conv_nodes(model):
        plain = name[: -len(INT16_SUFFIX)] if name.endswith(INT16_SUFFIX) and name not in theirs else name
        ours[plain] = i
    unknown = sorted((wanted - set(ours)) | (wanted - set(theirs)))
    if unknown:
        raise ValueError(f"no convolution named {unknown[:3]}")
    sg, fsg = model.subgraphs[0], float_model.subgraphs[0]
    model.__dict__.pop("_gmcnn_consts", None)
    idx = _Index(model)
    inserted_before: Dict[int, list] = collections.defaultdict(list)
    inserted_after: Dict[int, list] = collections.defaultdict(list)
    dequantized: Dict[int, int] = {}  # int16 input -> its DEQUANTIZE's float tensor, shared by the convs reading it
    maybe_dead: set = set()  # ops whose outputs may have lost their last reader
    changed = 0
    for name in sorted(wanted, key=lambda n: ours[n]):  # graph order: a shared DEQUANTIZE goes before its first reader
        i = ours[name]
        op = sg.operators[i]
        x, w, b = (_ids(op.inputs) + [-1])[:3]
        y = _ids(op.outputs)[0]
        if sg.tensors[x].type == T.FLOAT32:
            continue  # float already
        if sg.tensors[x].type != T.INT16 or sg.tensors[w].type != T.INT8:
            raise ValueError(f"{name}: not a 16x8 convolution ({DTYPE_NAMES.get(sg.tensors[x].type)} input, "
                             f"{DTYPE_NAMES.get(sg.tensors[w].type)} filter)")
        fop = fsg.operators[theirs[name]]
        fw, fb = (fsg.tensors[t] if t >= 0 else None for t in (_ids(fop.inputs) + [-1])[1:3])
        if (fw.type != T.FLOAT32 or list(_ids(fw.shape)) != list(_ids(sg.tensors[w].shape))
                or (fb is None) != (b < 0) or not _rounds_to(conv_weights(float_model, theirs[name]), sg.tensors[w],
                                                             conv_weights(model, i))):
            raise ValueError(f"{name}: filters differ between the 16x8 file and the float model")
        new_w = _copy_constant(model, float_model, fw, tensor_name(fw))
        new_b = _copy_constant(model, float_model, fb, tensor_name(fb)) if fb is not None else -1
        p = idx.producer.get(x)
        if p is not None and idx.name(p) == "QUANTIZE" and sg.tensors[_ids(sg.operators[p].inputs)[0]].type == T.FLOAT32:
            xf = _ids(sg.operators[p].inputs)[0]
            maybe_dead.add(id(sg.operators[p]))
        elif x in dequantized:
            xf = dequantized[x]
        else:
            xf = dequantized[x] = _new_tensor(model, sg.tensors[x], T.FLOAT32, tensor_name(sg.tensors[x]) + "/float")
            deq = _new_op(model, OP.DEQUANTIZE, [x], [xf])
            deq.opcodeIndex = _existing_opcode(model, OP.DEQUANTIZE)
            inserted_before[i].append(deq)
        yf = _new_tensor(model, sg.tensors[y], T.FLOAT32, name)
        still_int16 = y in idx.graph_outputs
        for c in idx.consumers.get(y, []):
            z = _ids(sg.operators[c].outputs)[0]
            if idx.name(c) == "DEQUANTIZE" and z not in idx.graph_outputs:
                for r in idx.consumers.get(z, []):
                    sg.operators[r].inputs = [yf if t == z else t for t in _ids(sg.operators[r].inputs)]
                maybe_dead.add(id(sg.operators[c]))
            else:
                still_int16 = True
        if still_int16:
            q = _new_op(model, OP.QUANTIZE, [yf], [y])
            q.opcodeIndex = _existing_opcode(model, OP.QUANTIZE)
            inserted_after[i].append(q)
        op.inputs = [xf, new_w, new_b]
        op.outputs = [yf]
        op.opcodeIndex = _opcode_index(model, OP.CONV_2D, 1)  # the float kernel's version
        if op.builtinOptions is not None and hasattr(op.builtinOptions, "quantizedBiasType"):
            op.builtinOptions.quantizedBiasType = T.FLOAT32  # the option's default: no quantized bias
        changed += 1
    _splice(sg, inserted_before, inserted_after)
    while True:  # the (de)quantizations left without a reader, and what that leaves unread in turn
        idx = _Index(model)
        dead = [k for k, op in enumerate(sg.operators) if id(op) in maybe_dead
                and not any(idx.consumers.get(t) or t in idx.graph_outputs for t in _ids(op.outputs))]
        if not dead:
            break
        sg.operators = [op for k, op in enumerate(sg.operators) if k not in set(dead)]
    _prune_tensors(model)
    return changed


def float_resizes_16x8(model) -> int:
    """Run every int16 RESIZE_BILINEAR of a 16x8 file in float32: DEQUANTIZE its input, resize, QUANTIZE back
    to the same int16 tensor (its scale unchanged). Returns how many changed.

    Why: LiteRT's int16 bilinear resize loses far more than int16's grid does. In the shipped model's 16x8
    file at 512x680 the one that scales ``b1``'s output to the merge's size turns a tensor 67.4 dB from the
    float model's into one 23.9 dB from it, and the file fails its gate at 32.63 dB for it alone
    (docs/TOLERANCES.md, "int16x8 at 512x680"). Nearest-neighbour resizes copy values and stay int16."""
    sg = model.subgraphs[0]
    inserted_before: Dict[int, list] = collections.defaultdict(list)
    inserted_after: Dict[int, list] = collections.defaultdict(list)
    changed = 0
    for i, op in enumerate(sg.operators):
        if op_name(model, op) != "RESIZE_BILINEAR":
            continue
        ins = _ids(op.inputs)
        x, y = ins[0], _ids(op.outputs)[0]
        if sg.tensors[x].type != T.INT16:
            continue
        if sg.tensors[y].type != T.INT16:
            raise ValueError(f"{tensor_name(sg.tensors[y])}: an int16 resize with a {DTYPE_NAMES.get(sg.tensors[y].type)} output")
        xf = _new_tensor(model, sg.tensors[x], T.FLOAT32, tensor_name(sg.tensors[x]) + "/float")
        yf = _new_tensor(model, sg.tensors[y], T.FLOAT32, tensor_name(sg.tensors[y]) + "/float")
        deq = _new_op(model, OP.DEQUANTIZE, [x], [xf])
        deq.opcodeIndex = _existing_opcode(model, OP.DEQUANTIZE)
        q = _new_op(model, OP.QUANTIZE, [yf], [y])
        q.opcodeIndex = _existing_opcode(model, OP.QUANTIZE)
        inserted_before[i].append(deq)
        inserted_after[i].append(q)
        op.inputs = [xf] + ins[1:]
        op.outputs = [yf]
        op.opcodeIndex = _opcode_index(model, OP.RESIZE_BILINEAR, 1)  # the float kernel's version
        changed += 1
    _splice(sg, inserted_before, inserted_after)
    return changed


def _splice(sg, before: Dict[int, list], after: Dict[int, list]) -> None:
    """Put the new ops ``before[i]`` / ``after[i]`` around subgraph ``sg``'s op ``i``, for every ``i``."""
    sg.operators = [new for i, op in enumerate(sg.operators) for new in before.get(i, []) + [op] + after.get(i, [])]


# XNNPACK's delegate takes CONCATENATION with at most this many inputs (measured: 5 in, 7 out).
XNNPACK_CONCAT_FAN_IN = 5


def _const_tensor(model, values: np.ndarray, name: str) -> int:
    """An int32 constant tensor; equal values share one tensor (the rewrites need many small ones)."""
    sg = model.subgraphs[0]
    cache = model.__dict__.setdefault("_gmcnn_consts", {})
    key = (values.dtype.str, values.shape, values.tobytes())
    if key in cache:
        return cache[key]
    buf = schema.BufferT()
    buf.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), dtype=np.uint8).copy()
    model.buffers.append(buf)
    t = schema.TensorT()
    t.shape = list(values.shape)
    t.type = {np.dtype(np.int32): T.INT32}[values.dtype]
    t.buffer = len(model.buffers) - 1
    t.name = name
    sg.tensors.append(t)
    cache[key] = len(sg.tensors) - 1
    return cache[key]


def _activation_like(model, like: int, shape: Sequence[int], name: str) -> int:
    sg = model.subgraphs[0]
    src = sg.tensors[like]
    t = _new_tensor(model, src, src.type, name)
    sg.tensors[t].shape = list(shape)
    if src.quantization is not None and src.quantization.scale is not None:
        scale, zero = _quant(src)
        _set_quant(sg.tensors[t], scale, zero)
    return t


def _concat(model, inputs: List[int], axis: int, shapes: Dict[int, List[int]], ops: list, name: str,
            out: Optional[int] = None) -> int:
    shape = list(shapes[inputs[0]])
    shape[axis] = sum(shapes[t][axis] for t in inputs)
    target = out if out is not None else _activation_like(model, inputs[0], shape, name)
    shapes[target] = shape
    options = schema.ConcatenationOptionsT()
    options.axis = axis
    options.fusedActivationFunction = 0
    ops.append(_new_op(model, OP.CONCATENATION, inputs, [target], options, schema.BuiltinOptions.ConcatenationOptions))
    return target


def _concat_tree(model, pieces: List[int], axis: int, shapes: Dict[int, List[int]], ops: list, name: str) -> int:
    """One tensor of ``pieces`` joined along ``axis`` by concatenations of at most XNNPACK_CONCAT_FAN_IN inputs."""
    level = 0
    while len(pieces) > 1:
        groups = [pieces[i : i + XNNPACK_CONCAT_FAN_IN] for i in range(0, len(pieces), XNNPACK_CONCAT_FAN_IN)]
        pieces = [g[0] if len(g) == 1 else _concat(model, g, axis, shapes, ops, f"{name}/cat{level}_{j}")
                  for j, g in enumerate(groups)]
        level += 1
    return pieces[0]


def mirror_pad_to_slices(model) -> int:
    """Rewrite each reflection MIRROR_PAD (NHWC, pads on H and W) as SLICE + CONCATENATION ops.

    XNNPACK has no MIRROR_PAD kernel, so each one splits the delegate's graph and runs in
    the reference kernel. Padding by p along an axis is: the p one-pixel slices mirrored
    about the edge (edge excluded), the input, and the p slices mirrored about the far
    edge, concatenated; the width is padded first, then the height of the result, which
    fills corners as 2-D reflection does. Slices and concatenations only copy values, so
    the result is exact in every precision (the parity gate checks it); pad blocks are
    joined in trees of at most 5 inputs, the most XNNPACK's concatenation takes.
    """
    sg = model.subgraphs[0]
    new_ops: list = []
    changed = 0
    for op in list(sg.operators):
        if op_name(model, op) != "MIRROR_PAD" or op.builtinOptions is None or op.builtinOptions.mode != 0:
            new_ops.append(op)
            continue
        src, pads_t = _ids(op.inputs)[:2]
        out = _ids(op.outputs)[0]
        pads = _const_values(model, pads_t)
        shape = list(_ids(sg.tensors[src].shape))
        if pads is None or len(shape) != 4 or len(pads) != 8:
            new_ops.append(op)
            continue
        pads = pads.reshape(4, 2)
        if pads[0].any() or pads[3].any() or pads[1, 0] != pads[1, 1] or pads[2, 0] != pads[2, 1]:
            new_ops.append(op)
            continue
        shapes: Dict[int, List[int]] = {src: shape}
        x = src
        base = tensor_name(sg.tensors[out]) or f"mirror_pad_{changed}"
        for axis, p in ((2, int(pads[2, 0])), (1, int(pads[1, 0]))):
            if p == 0:
                continue
            n = shapes[x][axis]
            if p >= n:
                raise ValueError(f"reflection pad {p} needs a side larger than {p}, got {n}")
            blocks = []
            for side, indices in (("before", range(p, 0, -1)), ("after", range(n - 2, n - 2 - p, -1))):
                pieces = []
                for i in indices:
                    begin = [0, 0, 0, 0]
                    begin[axis] = i
                    size = list(shapes[x])
                    size[axis] = 1
                    b = _const_tensor(model, np.array(begin, np.int32), f"{base}/{side}{i}_begin")
                    s = _const_tensor(model, np.array(size, np.int32), f"{base}/{side}{i}_size")
                    piece = _activation_like(model, x, size, f"{base}/{side}{i}")
                    shapes[piece] = size
                    new_ops.append(_new_op(model, OP.SLICE, [x, b, s], [piece], schema.SliceOptionsT(),
                                           schema.BuiltinOptions.SliceOptions))
                    pieces.append(piece)
                blocks.append(_concat_tree(model, pieces, axis, shapes, new_ops, f"{base}/{side}{axis}"))
            last_axis = axis == 1 or int(pads[1, 0]) == 0
            x = _concat(model, [blocks[0], x, blocks[1]], axis, shapes, new_ops, f"{base}/padded{axis}",
                        out=out if last_axis else None)
        changed += 1
    return _replace_ops(model, new_ops, changed)


def _replace_ops(model, new_ops: list, changed: int) -> int:
    """Install a rewrite's operator list; when it changed anything, drop the constant cache and the
    tensors no op uses any more. Returns ``changed``."""
    model.subgraphs[0].operators = new_ops
    if changed:
        model.__dict__.pop("_gmcnn_consts", None)
        _prune_tensors(model)
    return changed


def nearest_2x_to_depth_to_space(model) -> int:
    """Rewrite 2x nearest-neighbour upsampling (RESIZE_NEAREST_NEIGHBOR, NHWC) as CONCATENATION + DEPTH_TO_SPACE.

    XNNPACK has no kernel for it. Duplicating pixels is exact with ops it takes:
    ``concat([x, x, x, x], channels)`` gives (1, h, w, 4c) whose four channel blocks are the
    2x2 output block of each pixel, and DEPTH_TO_SPACE(2) lays them out as (1, 2h, 2w, c).
    Applies when the output is exactly twice the input on both sides and ``align_corners``
    is off (then source pixel = floor(i / 2) with or without half-pixel centres).
    """
    sg = model.subgraphs[0]
    new_ops: list = []
    changed = 0
    for op in list(sg.operators):
        opts = op.builtinOptions
        if op_name(model, op) != "RESIZE_NEAREST_NEIGHBOR" or opts is None or opts.alignCorners:
            new_ops.append(op)
            continue
        src = _ids(op.inputs)[0]
        out = _ids(op.outputs)[0]
        n, h, w, c = _ids(sg.tensors[src].shape)
        if list(_ids(sg.tensors[out].shape)) != [n, 2 * h, 2 * w, c] or n != 1:
            new_ops.append(op)
            continue
        base = tensor_name(sg.tensors[out]) or f"nearest_{changed}"
        shapes = {src: [n, h, w, c]}
        blocks = _concat(model, [src] * 4, 3, shapes, new_ops, f"{base}/four_copies")
        options = schema.DepthToSpaceOptionsT()
        options.blockSize = 2
        new_ops.append(_new_op(model, OP.DEPTH_TO_SPACE, [blocks], [out], options,
                               schema.BuiltinOptions.DepthToSpaceOptions))
        changed += 1
    return _replace_ops(model, new_ops, changed)


def _reshape(model, src: int, shape: List[int], ops: list, name: str, out: Optional[int] = None) -> int:
    target = out if out is not None else _activation_like(model, src, shape, name)
    new_shape = _const_tensor(model, np.array(shape, np.int32), f"{name}/shape")
    options = schema.ReshapeOptionsT()
    options.newShape = list(shape)
    ops.append(_new_op(model, OP.RESHAPE, [src, new_shape], [target], options, schema.BuiltinOptions.ReshapeOptions))
    return target


def uint8_io(model) -> int:
    """Float ``image`` files: uint8 inputs (cast to float) and a uint8 output (round half to even, cast)."""
    sg = model.subgraphs[0]
    ins, outs = signature_io(model)
    head = []
    for key, t in _float_tensors(sg, ins):
        as_float = _new_tensor(model, sg.tensors[t], T.FLOAT32, f"{key}_as_float")
        for op in sg.operators:
            op.inputs = [as_float if i == t else i for i in _ids(op.inputs)]
        sg.tensors[t].type = T.UINT8
        head.append(_cast(model, t, as_float, T.UINT8, T.FLOAT32))
    sg.operators = head + list(sg.operators)
    tail = []
    for key, t in _float_tensors(sg, outs):
        unrounded = _new_tensor(model, sg.tensors[t], T.FLOAT32, f"{key}_unrounded")
        rounded = _new_tensor(model, sg.tensors[t], T.FLOAT32, f"{key}_rounded")
        for op in sg.operators:
            op.outputs = [unrounded if i == t else i for i in _ids(op.outputs)]
        sg.tensors[t].type = T.UINT8
        tail += [_new_op(model, OP.ROUND, [unrounded], [rounded]), _cast(model, rounded, t, T.FLOAT32, T.UINT8)]
    sg.operators = list(sg.operators) + tail
    return len(head) + len(tail) // 2


def _float_tensors(sg, named: Dict[str, int]) -> List[Tuple[str, int]]:
    """The float32 ones of (name, tensor) pairs."""
    return [(key, t) for key, t in named.items() if sg.tensors[t].type == T.FLOAT32]


def _cast(model, src: int, dst: int, from_type: int, to_type: int):
    """A CAST op from tensor ``src`` to ``dst``."""
    options = schema.CastOptionsT()
    options.inDataType, options.outDataType = from_type, to_type
    return _new_op(model, OP.CAST, [src], [dst], options, schema.BuiltinOptions.CastOptions)


def add_metadata(model, name: str, payload: dict) -> None:
    """Attach ``payload`` as JSON under ``name`` in the file's metadata table (replacing an old one)."""
    data = json.dumps(payload, sort_keys=True).encode()
    buf = schema.BufferT()
    buf.data = np.frombuffer(data, dtype=np.uint8).copy()
    model.buffers.append(buf)
    entries = [m for m in (model.metadata or []) if (m.name.decode() if isinstance(m.name, bytes) else m.name) != name]
    meta = schema.MetadataT()
    meta.name = name
    meta.buffer = len(model.buffers) - 1
    model.metadata = entries + [meta]


def read_metadata(data: bytes, name: str) -> Optional[dict]:
    model = read(data)
    for m in model.metadata or []:
        key = m.name.decode() if isinstance(m.name, bytes) else m.name
        if key == name:
            return json.loads(bytes(model.buffers[m.buffer].data).decode())
    return None


# ------------------------------------------------------------------ one network inside another

def _op_key(model, op) -> tuple:
    """What an op computes apart from its inputs: type, options, arity."""
    options = op.builtinOptions
    fields = ()
    if options is not None:
        fields = tuple(sorted((k, np.asarray(v).tolist() if isinstance(v, (np.ndarray, list)) else v)
                              for k, v in vars(options).items()))
    custom = bytes(op.customOptions) if op.customOptions is not None else b""
    return op_name(model, op), op.builtinOptionsType, repr(fields), custom, len(_ids(op.inputs)), len(_ids(op.outputs))


def _constant_key(model, tensor) -> tuple:
    data = model.buffers[tensor.buffer].data
    return tensor.type, tuple(_ids(tensor.shape)), bytes(np.asarray(data, np.uint8))


def _quantization_key(tensor) -> tuple:
    """A tensor's quantization parameters as a comparable value (() where it has none)."""
    q = tensor.quantization
    if q is None:
        return ()
    as_tuple = lambda v: () if v is None else tuple(np.asarray(v).tolist())  # noqa: E731
    return as_tuple(q.scale), as_tuple(q.zeroPoint), int(q.quantizedDimension or 0), as_tuple(q.min), as_tuple(q.max)


def embedding(inner, outer, quantization: bool = False) -> Optional[Dict[int, int]]:
    """Where the network of ``inner`` sits inside ``outer``: {inner tensor: outer tensor} for every
    non-constant tensor of ``inner`` (its inputs included), or None when ``outer`` does not compute
    ``inner``'s outputs from some of its tensors with the same ops.

    Matched backwards from each output of ``inner``: two tensors correspond when their producers have
    the same type, options and arity, their constant inputs the same contents and their other inputs
    correspond in order; an input of ``inner`` corresponds to whichever ``outer`` tensor of its shape
    stands in that place (in the ``image`` graph: the normalised image and the binarised hole, made by
    ``outer``'s own ops). Each ``inner`` tensor gets one ``outer`` tensor, and no two the same one.

    ``quantization``: corresponding tensors, constants included, must also have the same quantization parameters
    (scales, zero points, axis, recorded ranges), so that ``outer`` computes ``inner``'s values bit for bit from the
    same inputs; without it only the network's structure and constant bytes are matched (what calibration needs).
    """
    sgs = {"i": inner.subgraphs[0], "o": outer.subgraphs[0]}
    models = {"i": inner, "o": outer}
    producer = {side: {t: (k, op) for op in sg.operators for k, t in enumerate(_ids(op.outputs))}
                for side, sg in sgs.items()}
    constant_keys: Dict[tuple, tuple] = {}

    def constant(side, t):
        tensor = sgs[side].tensors[t]
        if not _is_constant(models[side], tensor):
            return None
        if (side, t) not in constant_keys:
            constant_keys[side, t] = _constant_key(models[side], tensor)
        return constant_keys[side, t]

    inner_inputs = set(_ids(sgs["i"].inputs))

    def match(a: int, b: int, mapping: Dict[int, int]) -> bool:
        stack = [(a, b)]
        while stack:
            a, b = stack.pop()
            if (a < 0) != (b < 0):
                return False
            if a < 0:
                continue
            ta, tb = sgs["i"].tensors[a], sgs["o"].tensors[b]
            if quantization and _quantization_key(ta) != _quantization_key(tb):
                return False
            ca, cb = constant("i", a), constant("o", b)
            if ca is not None or cb is not None:
                if ca != cb:
                    return False
                continue
            if ta.type != tb.type or _ids(ta.shape) != _ids(tb.shape):
                return False
            if a in mapping:
                if mapping[a] != b:
                    return False
                continue
            mapping[a] = b
            if a in inner_inputs:
                continue
            if a not in producer["i"] or b not in producer["o"]:
                return False
            (ka, opa), (kb, opb) = producer["i"][a], producer["o"][b]
            if ka != kb or _op_key(inner, opa) != _op_key(outer, opb):
                return False
            stack.extend(zip(_ids(opa.inputs), _ids(opb.inputs)))
        return True

    mapping: Dict[int, int] = {}
    for a in _ids(sgs["i"].outputs):
        for b in sorted(producer["o"]):
            trial = dict(mapping)
            if match(a, b, trial):
                mapping = trial
                break
        else:
            return None
    needed = set(_ids(sgs["i"].outputs))  # every non-constant tensor the outputs depend on must have its place
    for op in reversed(sgs["i"].operators):
        if needed & set(_ids(op.outputs)):
            needed |= {t for t in _ids(op.inputs) if t >= 0}
    needed = {t for t in needed if not _is_constant(inner, sgs["i"].tensors[t])}
    if len(set(mapping.values())) != len(mapping) or set(mapping) != needed:
        return None
    return mapping


def around_embedding(inner, outer, where: Dict[int, int]) -> Tuple[Set[int], Dict[int, int], List[int]]:
    """For ``where = embedding(inner, outer)``: (the ``outer`` tensors the embedded network makes, the index of the
    op producing each ``outer`` tensor, the ``outer`` ops outside the network -- its own -- in graph order)."""
    sg = outer.subgraphs[0]
    inner_inputs = set(_ids(inner.subgraphs[0].inputs))
    network = {b for a, b in where.items() if a not in inner_inputs}
    producer = {t: i for i, op in enumerate(sg.operators) for t in _ids(op.outputs)}
    network_ops = {producer[t] for t in network}
    return network, producer, [i for i in range(len(sg.operators)) if i not in network_ops]


def cut(data: bytes, ops: Sequence[int], inputs: Sequence[int]) -> bytes:
    """The model of ``data`` made of subgraph 0's ops ``ops`` (indices, in graph order) alone, with ``inputs``
    as its graph inputs (tensors the kept ops read that others made) and no outputs yet; tensors keep their
    numbers, the constants no kept op reads are dropped, signatures go."""
    return write(cut_model(read(data), ops, inputs))


def cut_model(model, ops: Sequence[int], inputs: Sequence[int]):
    """:func:`cut` of a ``ModelT`` already read: a new ``ModelT`` that shares with ``model`` (left as it is) the
    tensor, op and buffer objects it keeps unchanged, so that a caller cutting one model many times (a grouped
    calibration: a cut per group) reads the file once instead of once per cut. Whoever changes the cut model may
    append to its lists (new tensors, ops, buffers, op codes) but must not change a shared object in place."""
    import copy

    cut_ = copy.copy(model)
    cut_.__dict__.pop("_gmcnn_consts", None)  # _const_tensor's cache names tensors of ``model``'s lists
    cut_.operatorCodes = None if model.operatorCodes is None else list(model.operatorCodes)
    cut_.buffers = None if model.buffers is None else list(model.buffers)
    sg = copy.copy(model.subgraphs[0])
    cut_.subgraphs = [sg] + list(model.subgraphs[1:])
    keep = set(ops)
    sg.operators = [op for i, op in enumerate(sg.operators) if i in keep]
    sg.tensors = None if sg.tensors is None else list(sg.tensors)
    sg.inputs = list(inputs)
    sg.outputs = []
    read_by_kept = {t for op in sg.operators for t in _ids(op.inputs) if t >= 0}
    # a buffer may back several tensors (the converter shares equal constants): it stays if any kept op reads one
    kept_buffers = {sg.tensors[t].buffer for t in read_by_kept}
    for i, tensor in enumerate(sg.tensors or []):
        if (i not in read_by_kept and tensor.buffer and tensor.buffer not in kept_buffers
                and _is_constant(cut_, tensor)):
            dropped = copy.copy(cut_.buffers[tensor.buffer])
            dropped.data = None
            cut_.buffers[tensor.buffer] = dropped
    cut_.signatureDefs = []
    return cut_
