"""GMCNN generators (Wang et al., NeurIPS 2018), both reference variants.

Two networks share the three-branch design but differ in details that matter
numerically, so each is written out from its own reference layer list:

* ``tf``    -- the TensorFlow generator behind the official Places2 512x680,
  CelebA-HQ and Paris StreetView checkpoints. Input channels
  ``[image*(1-mask), ones, mask]``; TF ``SAME`` zero padding (asymmetric for
  stride 2); three branches with 7x7 / 5x5 / 3x3 kernels.
* ``torch`` -- the PyTorch generator of the CelebA-HQ 256 checkpoint. Input
  channels ``[image*(1-mask), mask]``; reflection padding; its own layer list.

Tensors inside the networks are NCHW float32. The image given to
:class:`GMCNNGenerator` is RGB in [-1, 1]; the mask is 1 for hole pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime_py.contract import MASK_POLARITY_FLOAT, NORMALIZATION

VARIANTS = ("tf", "torch")


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of a reference layer list (stride/dilation as in the reference)."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    activation: bool = True


@dataclass
class GeneratorMeta:
    """What a checkpoint says about the network it holds.

    ``channel_order`` is the colour order the weights were trained on: ``rgb`` for the
    project's own models and the PyTorch reference, ``bgr`` for the official
    TensorFlow checkpoints (their pipeline reads images with OpenCV). The generator
    always takes and returns RGB and flips internally when this says ``bgr``.
    """

    variant: str
    cnum: int
    channel_order: str = "rgb"
    train_size: Tuple[int, int] = (256, 256)
    normalization: str = NORMALIZATION
    mask_polarity: str = MASK_POLARITY_FLOAT
    source: str = ""
    source_sha256: str = ""
    description: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_size"] = list(self.train_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorMeta":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "train_size" in known:
            known["train_size"] = tuple(int(v) for v in known["train_size"])
        return cls(**known)


def min_side(variant: str) -> int:
    """Smallest image side (pixels) the variant accepts.

    The ``torch`` variant reflection-pads by 48 at quarter resolution, and a
    reflection pad must be smaller than the padded side, so quarter sides need
    at least 49 px: 196 px at full resolution (192 fails inside PyTorch).
    The ``tf`` variant zero-pads and works down to 8 px (2 px at quarter resolution).
    """
    return 196 if variant == "torch" else 8


def check_shape(variant: str, height: int, width: int) -> None:
    """Raise ValueError unless (height, width) is usable by ``variant``."""
    if height % 4 or width % 4:
        raise ValueError(f"shape {height}x{width} is not a multiple of 4 (the network downsamples twice)")
    if min(height, width) < min_side(variant):
        raise ValueError(
            f"shape {height}x{width} is too small for the {variant!r} variant: sides must be at least {min_side(variant)} px"
        )


# ----------------------------------------------------------------------------- tf variant

def tf_layer_specs(cnum: int, in_channels: int = 5) -> Dict[str, List[ConvSpec]]:
    """Reference TF layer list, keyed by branch; names are the TF layer names.

    Upsampling steps are not listed: branch 1 resizes bilinearly to full size after
    conv12; branch 2 upsamples 2x (nearest) before conv13 and bilinearly to full size
    after conv14; branch 3 upsamples 2x (nearest) before conv13 and conv15.
    """
    c = cnum

    def encoder(prefix: str, k_first: int, k: int) -> List[ConvSpec]:
        layers = [
            ConvSpec(f"{prefix}conv1", in_channels, c, k_first),
            ConvSpec(f"{prefix}conv2_downsample", c, 2 * c, k, stride=2),
            ConvSpec(f"{prefix}conv3", 2 * c, 2 * c, k),
            ConvSpec(f"{prefix}conv4_downsample", 2 * c, 4 * c, k, stride=2),
            ConvSpec(f"{prefix}conv5", 4 * c, 4 * c, k),
            ConvSpec(f"{prefix}conv6", 4 * c, 4 * c, k),
        ]
        rates = [2, 4, 8, 16] + ([32] if cnum > 32 else [])
        for i, rate in enumerate(rates):
            layers.append(ConvSpec(f"{prefix}conv{7 + i}_atrous", 4 * c, 4 * c, k, dilation=rate))
        layers += [ConvSpec(f"{prefix}conv11", 4 * c, 4 * c, k), ConvSpec(f"{prefix}conv12", 4 * c, 4 * c, k)]
        return layers

    b1 = encoder("b1", 7, 7)
    b2 = encoder("b2", 5, 5) + [
        ConvSpec("b2conv13_upsample_conv", 4 * c, 2 * c, 3),
        ConvSpec("b2conv14", 2 * c, 2 * c, 5),
    ]
    b3 = encoder("b3", 5, 3) + [
        ConvSpec("b3conv13_upsample_conv", 4 * c, 2 * c, 3),
        ConvSpec("b3conv14", 2 * c, 2 * c, 3),
        ConvSpec("b3conv15_upsample_conv", 2 * c, c, 3),
        ConvSpec("b3conv16", c, c // 2, 3),
    ]
    merge = [
        ConvSpec("mergeconv17", 4 * c + 2 * c + c // 2, c // 2, 3),
        ConvSpec("mergeconv18", c // 2, 3, 3, activation=False),
    ]
    return {"b1": b1, "b2": b2, "b3": b3, "merge": merge}


def tf_variable_scope(layer_name: str) -> str:
    """TF variable path (under ``inpaint_net/``) of a layer: the upsample convs sit in an extra scope."""
    if layer_name.endswith("_upsample_conv"):
        return f"{layer_name[: -len('_conv')]}/{layer_name}"
    return layer_name


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
    """TF ``SAME`` padding (before, after) along one axis; TF puts the odd pixel after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class TFSameConv(nn.Conv2d):
    """Conv2d with TF ``SAME`` zero padding.

    Symmetric padding goes into the convolution itself (one op after export);
    only stride-2 layers, whose padding is asymmetric, get an explicit pad.
    """

    def __init__(self, spec: ConvSpec):
        super().__init__(spec.in_channels, spec.out_channels, spec.kernel, stride=spec.stride, dilation=spec.dilation)
        self.spec = spec
        if spec.stride == 1:
            self.padding = ((spec.kernel - 1) * spec.dilation // 2,) * 2

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """The layer before its activation: TF ``SAME`` padding and the convolution, (N, C_out, H', W') float32,
        linear in the bias (export.activations.layer_snr_each shifts it by a bias change)."""
        if self.spec.stride != 1:
            top, bottom = tf_same_padding(x.shape[-2], self.spec.kernel, self.spec.stride, self.spec.dilation)
            left, right = tf_same_padding(x.shape[-1], self.spec.kernel, self.spec.stride, self.spec.dilation)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)

    def activation(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's activation of :meth:`preactivation`'s output: ELU, or none for a layer without one."""
        return F.elu(y) if self.spec.activation else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.preactivation(x))


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """2x nearest upsampling (pixel duplication).

    TF's ``resize_nearest_neighbor(align_corners=True)`` from n to 2n samples source
    ``round(i*(n-1)/(2n-1))``, which is ``i // 2`` for every i (the fractional part
    stays below 0.5 by at least 1/(4n)), so it is exactly pixel duplication; the
    faithfulness test checks this against TensorFlow itself.
    """
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def resize_bilinear_ac(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (TF1 ``resize_bilinear`` semantics)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class GMCNNTFNet(nn.Module):
    """The reference TF generator. Input (N,5,H,W) ``[x*(1-m), 1, m]``; output (N,3,H,W) in [-1,1].

    Parameters are named after the TF layers (``b1conv1.weight`` ...) so TF
    checkpoints map by name.
    """

    def __init__(self, cnum: int = 32):
        super().__init__()
        self.cnum = cnum
        self.specs = tf_layer_specs(cnum)
        self.layers = nn.ModuleDict({s.name: TFSameConv(s) for branch in self.specs.values() for s in branch})

    def _run(self, names: List[str], x: torch.Tensor) -> torch.Tensor:
        for n in names:
            x = self.layers[n](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        names = {b: [s.name for s in specs] for b, specs in self.specs.items()}
        enc = len(names["b1"])

        x1 = resize_bilinear_ac(self._run(names["b1"], x), (h, w))

        x2 = self._run(names["b2"][:enc], x)
        x2 = self._run(names["b2"][enc:], upsample_nearest_2x(x2))
        x2 = resize_bilinear_ac(x2, (h, w))

        x3 = self._run(names["b3"][:enc], x)
        x3 = self._run(names["b3"][enc : enc + 2], upsample_nearest_2x(x3))
        x3 = self._run(names["b3"][enc + 2 :], upsample_nearest_2x(x3))

        merged = torch.cat([x1, x2, x3], dim=1)
        # the branches' full-size outputs (208 channels of 1,024 x 1,360 at cnum 32: 1.1 GiB) would otherwise stay
        # alive beside their concatenation through the merge: a third of a forward's peak memory (docs/EXPORT.md)
        del x1, x2, x3
        y = self._run(names["merge"], merged)
        return torch.clamp(y, -1.0, 1.0)


# -------------------------------------------------------------------------- torch variant

class Upsample(nn.Module):
    """Parameter-free upsampling entry of the reference PyTorch layer lists."""

    def __init__(self, scale: int, mode: str):
        super().__init__()
        self.scale = scale
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=float(self.scale), mode="nearest")
        size = (x.shape[-2] * self.scale, x.shape[-1] * self.scale)
        return resize_bilinear_ac(x, size)


def _torch_branch(in_ch: int, c: int, k: int, tail: List[Tuple[str, int, int, int]]) -> Tuple[list, list]:
    """Encoder shared by the three reference branches plus ``tail`` entries.

    ``tail`` items are ("conv", cin, cout, k) or ("up_nearest"/"up_bilinear", scale, 0, 0).
    Returns (modules, pads) where pads[i] is the reflection pad before entry i
    (0 for upsampling entries, which are also not followed by ELU).
    """
    pad = (k - 1) // 2
    convs = [
        (in_ch, c, 1, 1), (c, 2 * c, 2, 1), (2 * c, 2 * c, 1, 1), (2 * c, 4 * c, 2, 1),
        (4 * c, 4 * c, 1, 1), (4 * c, 4 * c, 1, 1),
        (4 * c, 4 * c, 1, 2), (4 * c, 4 * c, 1, 4), (4 * c, 4 * c, 1, 8), (4 * c, 4 * c, 1, 16),
        (4 * c, 4 * c, 1, 1), (4 * c, 4 * c, 1, 1),
    ]
    modules, pads = [], []
    for cin, cout, stride, dil in convs:
        modules.append(nn.Conv2d(cin, cout, k, stride=stride, dilation=dil))
        pads.append(pad * dil)
    for kind, a, b, kk in tail:
        if kind == "conv":
            modules.append(nn.Conv2d(a, b, kk))
            pads.append((kk - 1) // 2)
        else:
            modules.append(Upsample(a, "nearest" if kind == "up_nearest" else "bilinear"))
            pads.append(0)
    return modules, pads


def reflection_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x


class GMCNNTorchNet(nn.Module):
    """The reference PyTorch generator. Input (N,4,H,W) ``[x*(1-m), m]``; output (N,3,H,W) in [-1,1].

    Module names follow the reference (``EB1.0.weight`` ... ``decoding_layers.1.bias``),
    upsampling entries included, so ``.pth`` state dicts load unchanged.
    """

    def __init__(self, cnum: int = 32, in_channels: int = 4, out_channels: int = 3):
        super().__init__()
        c = cnum
        self.cnum = cnum
        eb1, self.eb1_pads = _torch_branch(in_channels, c, 7, [("up_bilinear", 4, 0, 0)])
        eb2, self.eb2_pads = _torch_branch(
            in_channels, c, 5,
            [("up_nearest", 2, 0, 0), ("conv", 4 * c, 2 * c, 5), ("conv", 2 * c, 2 * c, 5), ("up_bilinear", 2, 0, 0)],
        )
        eb3, self.eb3_pads = _torch_branch(
            in_channels, c, 3,
            [("up_nearest", 2, 0, 0), ("conv", 4 * c, 2 * c, 3), ("conv", 2 * c, 2 * c, 3),
             ("up_nearest", 2, 0, 0), ("conv", 2 * c, c, 3), ("conv", c, c, 3)],
        )
        self.EB1, self.EB2, self.EB3 = nn.ModuleList(eb1), nn.ModuleList(eb2), nn.ModuleList(eb3)
        self.decoding_layers = nn.ModuleList([nn.Conv2d(7 * c, c // 2, 3), nn.Conv2d(c // 2, out_channels, 3)])

    @staticmethod
    def _branch(layers: nn.ModuleList, pads: List[int], x: torch.Tensor) -> torch.Tensor:
        for layer, pad in zip(layers, pads):
            x = layer(reflection_pad(x, pad))
            if pad:
                x = F.elu(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self._branch(self.EB1, self.eb1_pads, x)
        x2 = self._branch(self.EB2, self.eb2_pads, x)
        x3 = self._branch(self.EB3, self.eb3_pads, x)
        y = torch.cat([x1, x2, x3], dim=1)
        del x1, x2, x3  # as in GMCNNTFNet.forward: not alive beside their concatenation
        y = F.elu(self.decoding_layers[0](reflection_pad(y, 1)))
        y = self.decoding_layers[1](reflection_pad(y, 1))
        return torch.clamp(y, -1.0, 1.0)


# ------------------------------------------------------------------------------ wrapper

class GMCNNGenerator(nn.Module):
    """A GMCNN generator with the project's uniform interface.

    ``forward(image, mask)``:
      * ``image``: (N,3,H,W) float32, RGB, values in [-1, 1];
      * ``mask``:  (N,1,H,W) float32 in {0, 1}, 1 = hole;
      * returns the raw generator output (N,3,H,W) float32, RGB, in [-1, 1]
        (not composited: known pixels are the network's reconstruction).

    H and W must be multiples of 4 (and at least 196 for the ``torch`` variant); see :func:`check_shape`.
    The variant's own input channels are built here, and BGR-trained weights
    get their channels flipped on the way in and out.
    """

    def __init__(self, meta: GeneratorMeta):
        super().__init__()
        if meta.variant not in VARIANTS:
            raise ValueError(f"unknown GMCNN variant {meta.variant!r}; expected one of {VARIANTS}")
        if meta.cnum < 2 or meta.cnum % 2:
            raise ValueError(f"cnum must be an even number >= 2, got {meta.cnum}")
        self.meta = meta
        self.net = GMCNNTFNet(meta.cnum) if meta.variant == "tf" else GMCNNTorchNet(meta.cnum)

    @property
    def variant(self) -> str:
        return self.meta.variant

    @property
    def cnum(self) -> int:
        return self.meta.cnum

    def network_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The variant's own input tensor: (N,5,H,W) for ``tf``, (N,4,H,W) for ``torch``."""
        if self.meta.channel_order == "bgr":
            image = image.flip(1)
        masked = image * (1.0 - mask)
        if self.meta.variant == "tf":
            return torch.cat([masked, torch.ones_like(mask), mask], dim=1)
        return torch.cat([masked, mask], dim=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.net(self.network_input(image, mask))
        return y.flip(1) if self.meta.channel_order == "bgr" else y


def build_generator(variant: str = "tf", cnum: int = 32, seed: Optional[int] = None, **meta_kwargs) -> GMCNNGenerator:
    """A freshly initialised generator in eval mode, initialised as its reference does.

    ``tf``: Glorot-uniform kernels (the ``tf.layers.conv2d`` default the reference
    relies on); ``torch``: N(0, 0.02) weights (the reference ``init_weights``).
    Biases are zero in both. The same ``seed`` gives the same weights.
    """
    gen = GMCNNGenerator(GeneratorMeta(variant=variant, cnum=cnum, **meta_kwargs))
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, nn.Conv2d):
                if variant == "tf":
                    nn.init.xavier_uniform_(m.weight, generator=g)
                else:
                    m.weight.normal_(0.0, 0.02, generator=g)
                m.bias.zero_()
    return gen.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_layers(gen: GMCNNGenerator, height: int, width: int) -> List[dict]:
    """Every convolution of one forward pass at (height, width), in execution order: ``name`` (the
    module's), ``kernel`` (KH, KW), ``in_channels``, ``out_channels``, ``groups``, ``stride``, ``dilation``,
    ``out_hw`` (rows, cols of its output) and ``macs``. Shapes are propagated on the ``meta`` device, so
    nothing is computed."""
    layers: List[dict] = []

    def hook(mod, _inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        layers.append({"name": names[mod], "kernel": tuple(mod.kernel_size), "in_channels": mod.in_channels,
                       "out_channels": mod.out_channels, "groups": mod.groups, "stride": tuple(mod.stride),
                       "dilation": tuple(mod.dilation), "out_hw": (int(out.shape[2]), int(out.shape[3])),
                       "macs": int(out.shape[1] * out.shape[2] * out.shape[3] * (mod.in_channels // mod.groups) * k)})

    with torch.device("meta"):
        meta_gen = GMCNNGenerator(gen.meta)
    names = {m: n for n, m in meta_gen.named_modules()}
    handles = [m.register_forward_hook(hook) for m in meta_gen.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            meta_gen(torch.zeros(1, 3, height, width, device="meta"), torch.zeros(1, 1, height, width, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return layers


def conv_branches(gen: GMCNNGenerator) -> Dict[str, List[str]]:
    """The generator's convolutions by branch, module names (as ``named_modules`` gives them) in execution
    order: ``b1``, ``b2``, ``b3``, the three columns from the input (7x7, 5x5, 3x3 kernels) whose outputs are
    concatenated, and ``merge``, the two convolutions after the concatenation. Same keys for both variants."""
    net = gen.net
    if isinstance(net, GMCNNTFNet):
        return {b: [f"net.layers.{s.name}" for s in specs] for b, specs in net.specs.items()}
    columns = {"b1": "EB1", "b2": "EB2", "b3": "EB3", "merge": "decoding_layers"}
    return {b: [f"net.{attr}.{i}" for i, m in enumerate(getattr(net, attr)) if isinstance(m, nn.Conv2d)]
            for b, attr in columns.items()}


def count_macs(gen: GMCNNGenerator, height: int, width: int) -> int:
    """Multiply-accumulates of one forward pass at (height, width), convolutions only (meta device)."""
    return sum(layer["macs"] for layer in conv_layers(gen, height, width))
