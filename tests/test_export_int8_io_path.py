"""The int8 fallback's float convolutions take their input path and output tail out of int8
(:func:`export.tflite_graph.io_path_ops`), on a tiny ``image`` file.

Left int8, the input path rounds the network's input on its calibrated grid (the normalised pixel
``p / 127.5 - 1`` lies exactly between two steps of the int8 [-1, 1] grid), so a branch kept float
for its sensitivity still reads a rounded input; the ``image`` file's compositing rounds the
prediction once more. With every convolution float, the int8 file must then compute what the fp32
file computes.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import lively_generator

SHAPE = (64, 88)


@pytest.fixture(scope="module")
def image_export(tmp_path_factory):
    from export.api import export_artifacts

    out = tmp_path_factory.mktemp("int8_io_path")
    gen = lively_generator("tf", 4, seed=3)
    export_artifacts(gen, out, shapes=[SHAPE], formats=["tflite"], precisions=["fp32", "int8"], ios=["image"],
                     threads=2, keep_work=True, progress=False, calibration_masks_per_photo=1,
                     quant_fallback=False, tolerances={"int8": {"min_hole_psnr_db": 0.0}})
    work = out / ".work" / f"tflite_{SHAPE[0]}x{SHAPE[1]}_image"
    return {"out": out, "gen": gen, "work": work}


def _samples():
    from export.samples import Samples

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, *SHAPE, 3), dtype=np.uint8)
    masks = np.zeros((2, *SHAPE, 1), np.uint8)
    masks[0, 16:40, 20:60] = 255
    masks[1, 8:56, 30:50] = 255
    return Samples(images, masks, ["a", "b"])


def test_io_path_ops_are_the_ops_between_the_graph_boundary_and_float_convolutions(image_export):
    from export import tflite_graph as g

    model = g.read((image_export["work"] / "calibrated_int8.tflite").read_bytes())
    sg = model.subgraphs[0]
    convs = [name for name, _ in g.conv_nodes(model)]
    kinds = {g.tensor_name(sg.tensors[g._ids(op.outputs)[0]]): g.op_name(model, op) for op in sg.operators}
    producers = g.conv_producers(model)
    first = [c for c in convs if not producers[c]]  # the convolutions that read the network's input
    graph_out = g._ids(sg.outputs)[0]
    last_op = next(op for op in sg.operators if graph_out in g._ids(op.outputs))
    assert first and g.op_name(model, last_op) != "CONV_2D"  # the image file composites after the last one
    middle = [c for c in convs if producers[c] and c != convs[-1]]
    assert g.io_path_ops(model, middle) == []

    inputs = set(g.io_path_ops(model, first[:1]))
    # the normalisation, the hole, the masked image and their concatenation; no convolution, no tail
    assert {"CONCATENATION", "SUB", "MUL"} <= {kinds[n] for n in inputs}
    assert not any(kinds[n] == "CONV_2D" for n in inputs)
    assert g.tensor_name(sg.tensors[graph_out]) not in inputs

    last = [name for name, i in g.conv_nodes(model) if any(t in set(g._ids(o.inputs)) for o in sg.operators
                                                          for t in g._ids(sg.operators[i].outputs)
                                                          if graph_out in g._ids(o.outputs)) or name == convs[-1]]
    tail = set(g.io_path_ops(model, last))
    assert g.tensor_name(sg.tensors[graph_out]) in tail  # the compositing down to the output
    # what the compositing reads from the inputs (the hole) comes with it
    assert any(kinds[n] in ("MINIMUM", "MAXIMUM", "RELU") for n in tail)


def test_int8_file_with_every_convolution_float_computes_the_fp32_file(image_export, tmp_path):
    """Every convolution float through ``float_nodes`` (the fallback's own list): the output matches
    the fp32 file's to one level in the hole and exactly outside it; without the input path and
    tail it does not."""
    from export import tflite
    from export import tflite_graph as g
    from export.tflite_worker import quantize_calibrated

    work, gen = image_export["work"], image_export["gen"]
    import torch

    names = [n for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    nodes = tflite.float_nodes(gen, work, "int8", names)
    calibrated = (work / "calibrated_int8.tflite").read_bytes()
    io_ops = set(g.io_path_ops(g.read(calibrated), [n for n in nodes]))
    assert io_ops and io_ops <= set(nodes)

    samples = _samples()
    hole = samples.masks[..., 0] >= 128
    fp32, _ = tflite.run(next(image_export["out"].glob("*_image_fp32.tflite")), "image", samples)
    fp32 = fp32.astype(np.int32)

    def run(float_nodes):
        path = tmp_path / f"int8_{len(float_nodes)}.tflite"
        raw = quantize_calibrated(calibrated, "int8", "image", float_nodes)
        path.write_bytes(tflite.postprocess(raw, "int8", "image")[0])
        out, _ = tflite.run(path, "image", samples)
        return out.astype(np.int32) - fp32

    with_path = run(nodes)
    assert np.abs(with_path[~hole]).max() == 0
    assert np.abs(with_path[hole]).max() <= 1
    without = run([n for n in nodes if n not in io_ops])
    assert np.sqrt((without[hole] ** 2).mean()) > 4 * max(np.sqrt((with_path[hole] ** 2).mean()), 0.05)
