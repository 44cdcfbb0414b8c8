"""The parity gate's limits (no TensorFlow needed): the fp32 limit follows the reference's peak activation."""
from __future__ import annotations

import numpy as np
import torch

from export.parity import FP32_ULP, judge, max_abs_limit, reference_outputs, reference_outputs_and_peak, tolerance_for
from runtime_py.memory import reuse_freed_memory


def test_fp32_limit_grows_with_the_peak_activation_and_names_it():
    tol = tolerance_for("fp32", "tensor")
    assert max_abs_limit(tol, None) == 2e-5 and max_abs_limit(tol, 10.0) == 2e-5
    # the shipped model at 1024x1360: max abs 7.05e-4 with convolutions reaching 1.1e4
    metrics = {"max_abs": 7.05e-4, "details": {"reference_peak_activation": 11133.0}}
    ok, why = judge(metrics, tol)
    assert ok, why
    assert max_abs_limit(tol, 11133.0) == 2 * FP32_ULP * 11133.0
    # the same error from a network whose values stay near 200 is a real difference
    metrics["details"]["reference_peak_activation"] = 200.0
    ok, why = judge(metrics, tol)
    assert not ok and "peak activation 200" in why, why
    # precisions judged by PSNR ignore the peak
    assert max_abs_limit(tolerance_for("int8", "tensor"), 1e6) is None


def test_a_hole_psnr_just_short_of_its_limit_reads_short():
    """A shortfall that two decimals would hide ("38.00 dB < 38.00 dB (short by 0.00 dB)") is printed with the
    three the gate keeps; a plain one with two."""
    tol = {"min_hole_psnr_db": 38.0}
    assert judge({"max_abs": 0.1, "hole_psnr_db": 37.996}, tol) == (
        False, "hole PSNR 37.996 dB < 38.000 dB (short by 0.004 dB)")
    assert judge({"max_abs": 0.1, "hole_psnr_db": 36.5}, tol) == (
        False, "hole PSNR 36.50 dB < 38.00 dB (short by 1.50 dB)")
    assert judge({"max_abs": 0.1, "hole_psnr_db": 38.0}, tol) == (True, "")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 3, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.a.weight.fill_(5.0)

    def forward(self, image, mask):
        return torch.tanh(self.b(self.a(torch.cat([image, mask], 1))))


class _Samples:
    def __init__(self, n=2, h=8, w=10):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        self.masks = np.zeros((n, h, w, 1), np.float32)
        self.masks[:, 2:5, 3:7] = 1

    def tensor_image(self):
        return (self.images.astype(np.float32) / 127.5 - 1.0) * (1 - self.masks)

    def tensor_mask(self):
        return self.masks

    def __len__(self):
        return len(self.images)


def test_peak_is_the_largest_convolution_output_and_outputs_are_unchanged():
    net, samples = _Net().eval(), _Samples()
    outputs, peak = reference_outputs_and_peak(net, samples)
    np.testing.assert_array_equal(outputs, reference_outputs(net, samples))
    with reuse_freed_memory():  # as the export computes them: the same bytes
        reused, reused_peak = reference_outputs_and_peak(net, samples)
    np.testing.assert_array_equal(reused, outputs)
    assert reused_peak == peak
    x = torch.cat([torch.from_numpy(samples.tensor_image()).permute(0, 3, 1, 2),
                   torch.from_numpy(samples.tensor_mask()).permute(0, 3, 1, 2)], 1)
    with torch.no_grad():
        first = net.a(x)
        expected = max(float(first.abs().max()), float(net.b(first).abs().max()))
    assert np.isclose(peak, expected, rtol=1e-6) and peak > 1.0  # batch 1 there, 2 here: float rounding
    assert not net.a._forward_hooks and not net.b._forward_hooks  # hooks removed


def test_image_artifact_that_changes_known_pixels_fails_the_gate():
    """The image signature composites inside the graph; a file that alters known pixels must fail even when
    its hole pixels are perfect, and the reason names how many changed."""
    from export.parity import compare, composite_pixels

    samples = _Samples()
    rng = np.random.default_rng(1)
    reference = rng.uniform(-1, 1, (*samples.images.shape[:3], 3)).astype(np.float32)
    perfect = composite_pixels(reference, samples)
    tol = tolerance_for("fp32", "image")

    metrics = compare(reference, perfect, samples, "image")
    assert metrics["details"]["known_pixels_changed"] == 0 and metrics["hole_psnr_db"] == 100.0
    assert judge(metrics, tol) == (True, "")

    tampered = perfect.copy()
    tampered[0, 0, 0] ^= 1  # three known pixels, one level each: within max_abs, hole untouched
    tampered[1, 7, 9, 2] ^= 1
    tampered[1, 6, 0, 1] ^= 1
    metrics = compare(reference, tampered, samples, "image")
    assert metrics["details"]["known_pixels_changed"] == 3 and metrics["hole_psnr_db"] == 100.0
    assert metrics["max_abs"] <= tol["max_abs"]
    assert judge(metrics, tol) == (False, "3 known pixels changed (allowed 0)")
