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
], ids=["conv", "conv-cube", "mul", "sub-square", "add-3x3", "concat", "concat-cube", "concat-alike", "elu",
        "softmax", "symbolic"])
def test_an_op_needs_the_run_only_where_its_onnx2tf_handler_could_read_it(model, needed):
    reason = ambiguity(model)
    assert (reason is not None) == needed, reason
    if needed:
        assert model.graph.node[0].op_type in reason


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
