"""export.onnx2tf_validation: which graphs need onnx2tf's validation run (issue 17). The export's side (the run
skipped, the same files) is in tests/test_export_tflite.py."""
from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from export.onnx2tf_validation import READING_OPS, ambiguity  # noqa: E402


def _graph(nodes, inputs, output, initializers=()):
    """A model of ``nodes`` with float inputs ``{name: shape}`` and ``output`` (name, shape); shapes of the
    values between them left to shape inference."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])], initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(name, shape):
    import numpy as np

    return helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(int(np.prod(shape)), np.float32))


def _conv(channels, rows, cols):
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")
    return _graph([node], {"x": [1, channels, rows, cols]}, ("y", [1, 4, rows, cols]),
                  [_weight("w", [4, channels, 3, 3])])


def _binary(op, a, b):
    node = helper.make_node(op, ["a", "b"], ["y"], name="op")
    return _graph([node], {"a": a, "b": b}, ("y", None))


def _conv_sum(channels, rows, cols, second="conv", chained=False):
    """Two 3x3 convolutions of ``x`` (1, 4, rows, cols) into ``channels`` channels each, added (as the input
    channel groups' summed parts are); ``second="input"`` adds the first convolution to a graph input instead;
    ``chained``: two more convolutions of that sum, added again."""
    def conv(source, weight, out):
        return helper.make_node("Conv", [source, weight], [out], pads=[1, 1, 1, 1], name=out)

    nodes, inputs, weights = [conv("x", "w0", "c0")], {"x": [1, 4, rows, cols]}, [_weight("w0", [channels, 4, 3, 3])]
    if second == "conv":
        nodes.append(conv("x", "w1", "c1"))
        weights.append(_weight("w1", [channels, 4, 3, 3]))
    else:
        inputs["c1"] = [1, channels, rows, cols]
    nodes.append(helper.make_node("Add", ["c0", "c1"], ["s0"], name="sum0"))
    if chained:
        nodes += [conv("s0", "w2", "c2"), conv("s0", "w3", "c3"), helper.make_node("Add", ["c2", "c3"], ["s1"])]
        weights += [_weight("w2", [channels, channels, 3, 3]), _weight("w3", [channels, channels, 3, 3])]
    return _graph(nodes, inputs, ("s1" if chained else "s0", [1, channels, rows, cols]), weights)


def _concat(*shapes):
    names = [f"x{i}" for i in range(len(shapes))]
    node = helper.make_node("Concat", names, ["y"], axis=1, name="cat")
    return _graph([node], dict(zip(names, shapes)), ("y", None))


@pytest.mark.parametrize("model, needed", [
    (_conv(8, 16, 24), False),
    (_conv(16, 16, 16), True),  # channels = rows = columns: onnx2tf checks the layout against the run
    (_binary("Mul", [1, 3, 64, 96], [1, 1, 64, 96]), False),
    (_binary("Sub", [1, 3, 64, 64], [1, 3, 64, 64]), True),  # a repeated dimension
    (_binary("Add", [1, 3, 3, 96], [1, 3, 3, 96]), True),
    (_concat([1, 3, 64, 96], [1, 1, 64, 96]), False),
    (_concat([1, 8, 8, 8], [1, 1, 8, 8]), True),  # two inputs, one of them all alike after the batch
    (_concat([1, 4, 64, 96], [1, 4, 64, 96], [1, 4, 64, 96]), True),  # all inputs alike
    (_graph([helper.make_node("Elu", ["x"], ["y"])], {"x": [1, 4, 4, 4]}, ("y", [1, 4, 4, 4])), False),
    (_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm")], {"x": [1, 4, 8, 16]}, ("y", [1, 4, 8, 16])),
     True),  # a reading op without a rule of its own: always
    (_binary("Mul", ["n", 3, 64, 96], [1, 1, 64, 96]), True),  # an unknown shape
    # a sum of convolutions repeating a dimension: channels-last it has another shape (no correction) ...
    (_conv_sum(8, 8, 12), False),
    (_conv_sum(8, 16, 8), False),
    (_conv_sum(8, 8, 8), True),  # ... except where channels = rows = columns
    (_conv_sum(8, 8, 12, second="input"), True),  # a graph input's layout is not known to be channels-last
], ids=["conv", "conv-cube", "mul", "sub-square", "add-3x3", "concat", "concat-cube", "concat-alike", "elu",
        "softmax", "symbolic", "conv-sum", "conv-sum-cols", "conv-sum-cube", "conv-input-sum"])
def test_an_op_needs_the_run_only_where_its_onnx2tf_handler_could_read_it(model, needed):
    reason = ambiguity(model)
    assert (reason is not None) == needed, reason
    if needed:
        assert any(node.op_type in reason for node in model.graph.node if node.op_type in READING_OPS)


def test_gmcnn_needs_no_validation_run_where_rows_and_columns_differ():
    """Both signatures of the tf variant at 64x96 need none; at 64x64 the mask's 1 - mask (rows = columns) names
    the first op that does."""
    from export.onnx_export import export_onnx
    from export.wrappers import wrap
    from helpers import lively_generator

    gen = lively_generator("tf", 4, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        for io in ("tensor", "image"):
            assert ambiguity(onnx.load(str(export_onnx(wrap(gen, io), io, (64, 96), Path(tmp) / "a.onnx")))) is None
            square = ambiguity(onnx.load(str(export_onnx(wrap(gen, io), io, (64, 64), Path(tmp) / "b.onnx"))))
            assert square is not None and "[1, 1, 64, 64]" in square, square


def test_reading_ops_are_the_handlers_of_the_pinned_onnx2tf_that_read_the_run():
    """READING_OPS is what the installed onnx2tf's op handlers are: those whose source names the run's values,
    its validation-data helper or its accuracy correction (which reads them). A new onnx2tf that adds a reader
    fails here before an export could skip a run that handler needs."""
    spec = importlib.util.find_spec("onnx2tf")
    if spec is None:
        pytest.skip("onnx2tf is not installed (the export extra)")
    ops = Path(spec.submodule_search_locations[0]) / "ops"
    reads = re.compile(r"onnx_tensor_infos_for_validation|acquisition_of_validation_data|"
                       r"correction_process_for_accuracy_errors")
    found = {p.stem for p in ops.glob("*.py") if reads.search(p.read_text())}
    assert found == set(READING_OPS)


_CONVERT = """
import sys
import numpy as np, tensorflow as tf
from export.tflite_worker import run_onnx2tf
onnx_path, folder, mode = sys.argv[1:4]
np.save(folder + "/x.npy", np.random.default_rng(0).uniform(-1, 1, (1, 8, 12, 4)).astype(np.float32))
run_onnx2tf(onnx_path, f"{folder}/{mode}", {"x": folder + "/x.npy"}, threads=1, validation=mode)
open(f"{folder}/{mode}.tflite", "wb").write(tf.lite.TFLiteConverter.from_saved_model(f"{folder}/{mode}").convert())
"""


def _without_names(data: bytes) -> bytes:
    """A TFLite file's bytes with every tensor's name cleared (ops, shapes, types, quantization, constants kept)."""
    from export import tflite_graph

    model = tflite_graph.read(data)
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.name = ""
    return tflite_graph.write(model)


def test_summed_convolutions_convert_into_the_same_graph_with_and_without_the_run(tmp_path):
    """The rule's claim for the summed convolutions it lets through (outputs 1 x 8 x 8 x 12, a dimension
    repeated; two sums in a row): onnx2tf makes the same TFLite graph with its validation run and without it --
    the same ops, shapes, quantization and constants. Its tensor names may differ: with the run, onnx2tf's
    correction builds a throwaway TensorFlow op per such sum, which moves the numbering of the names after it
    (as in the input channel groups' candidate at 512x680, docs/EXPORT.md). One child process per conversion:
    TensorFlow stays out of the test process, and a second conversion in one process numbers its names on."""
    import os
    import subprocess
    import sys

    import numpy as np

    if importlib.util.find_spec("onnx2tf") is None:
        pytest.skip("onnx2tf is not installed (the export extra)")
    model = _conv_sum(8, 8, 12, chained=True)
    for init in model.graph.initializer:  # nonzero weights, so a wrong layout would change values
        init.CopyFrom(helper.make_tensor(init.name, TensorProto.FLOAT, list(init.dims), np.random.default_rng(
            len(init.name)).normal(size=int(np.prod(init.dims))).astype(np.float32)))
    assert ambiguity(model) is None
    onnx.save(model, str(tmp_path / "sum.onnx"))
    root = Path(__file__).resolve().parents[1]
    logs = {}
    for mode in ("always", "auto"):
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(tmp_path / "sum.onnx"), str(tmp_path), mode],
                              cwd=root, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(root)})
        assert done.returncode == 0, done.stderr[-3000:]
        logs[mode] = done.stdout
    assert "validation run on 1 thread(s)" in logs["always"] and "validation run skipped" in logs["auto"]
    made = {mode: (tmp_path / f"{mode}.tflite").read_bytes() for mode in ("always", "auto")}
    assert _without_names(made["always"]) == _without_names(made["auto"])
