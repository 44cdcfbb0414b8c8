"""Whether onnx2tf's validation run can change a conversion (issue 17: the export's wall time).

Before it converts, onnx2tf runs the whole ONNX graph once in ONNX Runtime and keeps every intermediate
value (its "dummy inference", on a test image or the inputs the worker gives it). Most of its op handlers
never read those values; a few read them only where the shapes leave a layout ambiguous (a convolution
whose input has channels = rows = columns, a concatenation of equal shapes, an elementwise op whose output
repeats a dimension and whose channels-last result could have the ONNX shape), to pick the transposition whose
result matches ONNX Runtime's. Where no op of the graph is such a case the run cannot change the converted
graph: it is work (an inference of the whole model, and most of onnx2tf's time on this project's 2-core
machine: docs/EXPORT.md) whose result goes unread. (An elementwise op that repeats a dimension still builds a
throwaway TensorFlow op when the run's values exist, which moves the numbering of later tensor names: the same
ops, shapes and constants under other names.)

:func:`ambiguity` reads the graph (no TensorFlow, no ONNX Runtime) and names the first op whose onnx2tf
handler could read the run's values, or returns ``None``. The rules are the pinned onnx2tf's (1.29.24):
:data:`READING_OPS` lists the handlers that read the values at all (tests/test_export_tflite.py checks the
list against onnx2tf's source), and for the four of them GMCNN's graphs contain the conditions under
which they do. Any other reading op, or an unknown shape, counts as ambiguous: the run then stays.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

#: op types whose handler in the pinned onnx2tf reads the validation run's values (or its test image) under
#: some condition: ``onnx_tensor_infos_for_validation``, ``acquisition_of_validation_data`` or
#: ``correction_process_for_accuracy_errors`` in its source
READING_OPS = frozenset({
    "Add", "BatchNormalization", "Concat", "Conv", "ConvInteger", "DepthToSpace", "Div", "Einsum", "Expand",
    "Flatten", "GatherElements", "GridSample", "GroupNorm", "InstanceNormalization", "LayerNormalization",
    "MatMul", "Mod", "Mul", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Reshape", "Softmax", "Sub", "Tile",
})
#: the elementwise ops whose handler corrects its inputs' layout against the run's values only where the
#: output's shape repeats a dimension greater than 1 and the shape onnx2tf's TensorFlow op gives equals the ONNX one
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})


def _shapes(model) -> Dict[str, Optional[List[int]]]:
    """Each value's static shape (graph inputs and outputs, intermediate values, initializers); ``None`` for a
    value whose shape has a symbolic or unknown dimension."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    out: Dict[str, Optional[List[int]]] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = info.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        out[info.name] = None if None in static or not info.type.tensor_type.HasField("shape") else static
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _all_same(shape: List[int]) -> bool:
    """onnx2tf's ambiguity of a layout: every dimension after the batch the same (rank 3 and up)."""
    return len(shape) >= 3 and len(set(shape[1:])) == 1


def _repeats(shape: List[int]) -> bool:
    return any(size > 1 and count > 1 for size, count in Counter(shape).items())


def _channels_last_differs(node, shapes, producers) -> bool:
    """Whether onnx2tf's TensorFlow output of the elementwise ``node`` certainly has a shape other than the ONNX
    output's: every input is a rank-4 convolution output of the output's shape (onnx2tf keeps a convolution's
    output channels-last, so their sum has shape N, H, W, C) and N, H, W, C is not N, C, H, W (it is where
    channels = rows = columns). Its correction then compares nothing against the run (the shapes differ), and
    without the run its shape check of the same inputs passes (equal element counts): the same graph either way.
    The input channel groups' summed convolution parts (``export.input_groups``) are such additions."""
    out = shapes.get(node.output[0])
    if out is None or len(out) != 4:
        return False
    for name in node.input:
        producer = producers.get(name)
        if producer is None or producer.op_type != "Conv" or shapes.get(name) != out:
            return False
    n, c, h, w = out
    return [n, h, w, c] != out


def ambiguity(model) -> Optional[str]:
    """``None`` where no op of ``model`` (an ``onnx.ModelProto`` with static shapes) is one whose onnx2tf handler
    could read the validation run's values; else why not, naming the first such op."""
    shapes = _shapes(model)
    producers = {name: node for node in model.graph.node for name in node.output}
    for node in model.graph.node:
        op = node.op_type
        if op not in READING_OPS:
            continue
        what = f"{op} {node.name or node.output[0]!r}"
        ins = [shapes.get(name) for name in node.input if name]
        out = shapes.get(node.output[0])
        if op == "Conv":
            if ins[0] is None or _all_same(ins[0]):
                return f"{what}: input shape {ins[0]} (channels, rows and columns alike, or unknown)"
        elif op == "Concat":
            if any(s is None for s in ins):
                return f"{what}: an input's shape is unknown"
            if len(ins) == 2 and any(_all_same(s) for s in ins):
                return f"{what}: input shapes {ins} (an input's dimensions after the batch all alike)"
            if len(ins) > 1 and all(s == ins[0] for s in ins):
                return f"{what}: input shapes {ins} (all alike)"
        elif op in ELEMENTWISE:
            if out is None or (_repeats(out) and not _channels_last_differs(node, shapes, producers)):
                return f"{what}: output shape {out} (a dimension repeated, or unknown)"
        else:
            return f"{what}: onnx2tf's {op} handler reads the run's values"
    return None
