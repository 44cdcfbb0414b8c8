"""Issue 17: the ONNX export traces its module without computing the convolutions (export.onnx_export's
convolutions_not_computed), and writes the same file, byte for byte, as a trace that computes them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import lively_generator

SHAPE = (64, 96)
TORCH_SHAPE = (200, 204)  # the torch variant's reflection pads need at least 196 rows and columns


def _both_ways(module, io, shape, tmp_path):
    from export.onnx_export import export_onnx

    computed = export_onnx(module, io, shape, tmp_path / "computed.onnx", compute_convolutions=True).read_bytes()
    traced_only = export_onnx(module, io, shape, tmp_path / "traced_only.onnx").read_bytes()
    return computed, traced_only


@pytest.mark.parametrize("variant", ["tf", "torch"])
@pytest.mark.parametrize("io", ["tensor", "image"])
def test_the_onnx_file_is_the_same_whether_the_trace_computes_the_convolutions_or_not(variant, io, tmp_path):
    from export.wrappers import wrap

    shape = SHAPE if variant == "tf" else TORCH_SHAPE
    computed, traced_only = _both_ways(wrap(lively_generator(variant, 4, seed=0), io), io, shape, tmp_path)
    assert len(computed) > 10_000 and computed == traced_only


def test_the_same_for_the_input_grouped_generator_and_the_shipped_model(tmp_path):
    """The fallback's input-grouped generator (sums over channel slices) and the shipped model itself (its real
    weights, a shape of other parities than the tiny model's)."""
    from export.api import _resolve_checkpoint
    from export.input_groups import channel_ranges, grouped_generator, plan_groups
    from export.wrappers import wrap

    gen = lively_generator()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, *SHAPE, 3), dtype=np.uint8)
    masks = (rng.random((2, *SHAPE)) > 0.7).astype(np.uint8) * 255
    grouped = grouped_generator(gen, plan_groups(gen, channel_ranges(gen, images, masks), 4, min_elements=0))
    computed, traced_only = _both_ways(wrap(grouped, "tensor"), "tensor", SHAPE, tmp_path)
    assert computed == traced_only
    shipped, _ = _resolve_checkpoint(None)
    computed, traced_only = _both_ways(wrap(shipped, "image"), "image", (132, 172), tmp_path)
    assert len(computed) > 40_000_000 and computed == traced_only


@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 0, 3, 2),
                                                               (1, 3, 1, 4)])
def test_an_uncomputed_convolution_has_the_computed_ones_shape_and_the_kernel_comes_back(stride, padding, dilation,
                                                                                        groups):
    from export.onnx_export import convolutions_not_computed

    x = torch.rand(1, 4, 23, 30)
    weight = torch.rand(8, 4 // groups, 5, 3)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    expected = torch.nn.functional.conv2d(x, weight, **conv)
    with convolutions_not_computed():
        inside = torch.nn.functional.conv2d(x, weight, **conv)
    assert inside.shape == expected.shape and inside.dtype == expected.dtype
    # PyTorch's own kernel once the block is left, also after an error inside it
    with pytest.raises(ZeroDivisionError), convolutions_not_computed():
        1 / 0
    assert torch.equal(torch.nn.functional.conv2d(x, weight, **conv), expected)


def test_the_export_does_not_compute_the_convolutions_unless_asked(tmp_path):
    """What the first convolution returned during each trace: its computed values only with compute_convolutions."""
    from export.onnx_export import export_onnx
    from export.wrappers import wrap

    gen = lively_generator()
    first = next(m for m in gen.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    first.register_forward_hook(lambda module, inputs, output: seen.append(output.detach().numpy().copy()))
    export_onnx(wrap(gen, "tensor"), "tensor", SHAPE, tmp_path / "a.onnx", compute_convolutions=True)
    export_onnx(wrap(gen, "tensor"), "tensor", SHAPE, tmp_path / "b.onnx", compute_convolutions=True)
    export_onnx(wrap(gen, "tensor"), "tensor", SHAPE, tmp_path / "c.onnx")
    assert len(seen) == 3 and np.array_equal(seen[0], seen[1]) and np.isfinite(seen[0]).all()
    assert seen[2].shape == seen[0].shape and not np.array_equal(seen[2], seen[0])
