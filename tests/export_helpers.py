"""Shared helpers of the export tests (tiny generators whose outputs carry signal)."""
from __future__ import annotations

import math


def lively_generator(variant: str = "tf", cnum: int = 4, seed: int = 0):
    """A random generator whose output varies across the image.

    The reference initialisation (N(0, 0.02)) shrinks activations layer by layer until the
    output is ~0 everywhere, which would make every precision look perfect. Weights with
    std 1/sqrt(fan_in) and small random biases keep the output spread (std ~0.15-0.2 in
    [-1, 1], unsaturated), so quantization error shows up in the parity metrics.
    """
    import torch

    from models.gmcnn import build_generator

    gen = build_generator(variant, cnum, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
    return gen.eval()
