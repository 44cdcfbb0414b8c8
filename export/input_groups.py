"""Input channel groups for dynamic-range (``int8-dynamic``) convolutions.

A dynamic-range convolution rounds its whole input to one int8 grid at run time, spanning the tensor's own
min..max. Where a few input channels reach far beyond the rest (the shipped model's activations reach 1e4),
that grid is coarse for every other channel. Splitting the convolution by input channels gives each part its
own input tensor and so its own run-time grid: ``conv(x, W) = sum_g conv(x[g], W[:, g])``, the same MACs,
exact in float. Channels are grouped by the range calibration measured on them (:func:`choose_groups`), and
the producer's output channels are permuted so that every group is one contiguous slice (a STRIDED_SLICE,
which XNNPACK runs, rather than a GATHER, which it does not).

Only the ``tf`` variant's graph is rewritten (:class:`GroupedTFNet`): its convolutions form chains inside
each branch, joined only by the merge's concatenation, so each producer has exactly one consumer to permute
for. The rewritten generator is what the converter sees; the parity gate still compares with the original.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# TFLite's dynamic-range quantizer leaves a filter with fewer elements than this float: grouping its input
# changes nothing (the converter's kWeightsMinNumElementsDefault).
MIN_QUANTIZED_ELEMENTS = 1024


# Where :func:`channel_ranges` measures (the manifest's ``fallback.input_groups.ranges_measured_by``); the export
# takes the int8 calibration pass's instead where it ran (export.tflite.calibration_input_ranges).
RANGES_FROM_PYTORCH = "a PyTorch float forward per calibration sample"


def channel_ranges(generator, images: np.ndarray, masks: np.ndarray) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per convolution (module name), each input channel's (min, max) over the samples' pixels: two float64
    (C_in,) arrays, one float forward per sample (images (N,H,W,3) uint8 RGB, masks (N,H,W[,1]) nonzero = hole).
    The input before the convolution's own padding, as the network feeds it."""
    from .activations import forward_each_sample

    lows: Dict[str, np.ndarray] = {}
    highs: Dict[str, np.ndarray] = {}

    def after_conv(name, module, inputs, output):
        x = inputs[0]
        lo = x.amin(dim=(0, 2, 3)).double().numpy()
        hi = x.amax(dim=(0, 2, 3)).double().numpy()
        lows[name] = np.minimum(lows[name], lo) if name in lows else lo
        highs[name] = np.maximum(highs[name], hi) if name in highs else hi

    forward_each_sample(generator, images, masks, after_conv, reuse_memory=True)
    return {name: (lows[name], highs[name]) for name in lows}


def choose_groups(low: np.ndarray, high: np.ndarray, groups: int) -> List[np.ndarray]:
    """Split channels (ranges ``low``..``high``, (C,) each) into at most ``groups`` groups, each one run-time
    int8 grid spanning its channels' lowest low to highest high: channels sorted by their largest magnitude, cut
    where the summed squared step over all channels is least (a group of n channels spanning s costs n s^2: every
    channel in it gets the step s / 255). Returns int64 index arrays, narrowest group first, each ascending;
    every channel in exactly one; fewer groups where more would not lower the cost."""
    low = np.asarray(low, np.float64)
    high = np.asarray(high, np.float64)
    order = np.argsort(np.maximum(np.abs(low), np.abs(high)), kind="stable")
    lo, hi = low[order], high[order]
    count = len(order)
    groups = max(1, min(int(groups), count))
    # span[i, j]: the grid span of the sorted channels i..j-1
    span = np.zeros((count + 1, count + 1))
    for j in range(1, count + 1):
        span[:j, j] = np.maximum.accumulate(hi[:j][::-1])[::-1] - np.minimum.accumulate(lo[:j][::-1])[::-1]
    # cost[g][j]: the least cost of the j first sorted channels in g groups
    cost = np.full((groups + 1, count + 1), np.inf)
    cut = np.zeros((groups + 1, count + 1), np.int64)
    cost[0, 0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, count + 1):
            starts = np.arange(g - 1, j)
            total = cost[g - 1, starts] + (j - starts) * span[starts, j] ** 2
            best = int(np.argmin(total))
            cost[g, j], cut[g, j] = total[best], starts[best]
    g = int(np.argmin(cost[1:, count])) + 1
    bounds = []
    end = count
    for level in range(g, 0, -1):
        start = int(cut[level, end])
        bounds.append((start, end))
        end = start
    return [np.sort(order[a:b]) for a, b in reversed(bounds) if b > a]


def grid_gain(low: np.ndarray, high: np.ndarray, groups: Sequence[np.ndarray]) -> float:
    """How much ``groups`` (:func:`choose_groups`) lower the summed squared step of a convolution's run-time input
    grids against one grid for all channels (1: not at all)."""
    low = np.asarray(low, np.float64)
    high = np.asarray(high, np.float64)
    one = len(low) * float(high.max() - low.min()) ** 2
    split = sum(len(g) * float(high[g].max() - low[g].min()) ** 2 for g in groups)
    return one / split if split > 0 else 1.0


def plan_groups(generator, ranges: Dict[str, Tuple[np.ndarray, np.ndarray]], groups: int,
                layers: Optional[int] = None, order: Optional[Sequence[str]] = None,
                min_elements: int = MIN_QUANTIZED_ELEMENTS) -> Dict[str, List[List[int]]]:
    """Per convolution of a ``tf``-variant ``generator`` (module names as ``named_modules`` gives them), its
    input channel groups (:func:`choose_groups` on ``ranges``, :func:`channel_ranges`), for the first ``layers``
    convolutions (all when None) in ``order`` (the fallback's sensitivity ranking), or else those whose grids the
    groups narrow most (:func:`grid_gain`), among those the dynamic-range quantizer quantizes (``min_elements``)
    and whose input a producer inside the network makes (not the branches' first layers: their input is the
    image, mask and ones, one grid already fits) and that more than one group would change. The merge's first
    convolution is grouped within each of the three branch outputs it concatenates. Returned in the network's
    order. ValueError for another variant."""
    net = _tf_net(generator)
    planned: Dict[str, Tuple[float, List[List[int]]]] = {}
    for name, producers in _producers(net).items():
        conv = net.layers[name]
        if not producers or conv.weight.numel() < min_elements:
            continue
        low, high = ranges[_module_name(name)]
        parts: List[np.ndarray] = []
        offset = 0
        for _producer, channels in producers:
            for group in choose_groups(low[offset:offset + channels], high[offset:offset + channels], groups):
                parts.append(group + offset)
            offset += channels
        if len(parts) > 1:
            planned[_module_name(name)] = (grid_gain(low, high, parts), [[int(c) for c in g] for g in parts])
    if order is not None:
        chosen = [name for name in order if name in planned][:layers]
    else:
        chosen = sorted(planned, key=lambda n: -planned[n][0])[:layers]
    return {name: planned[name][1] for name in planned if name in chosen}


def grouped_generator(generator, plan: Dict[str, List[List[int]]]):
    """A copy of ``generator`` (``tf`` variant) whose convolutions named in ``plan`` (:func:`plan_groups`) run as
    one convolution per input channel group on contiguous slices of a permuted input, their producers' output
    channels permuted to match. The same function in float but for the order of the sums (tests/
    test_export_input_groups.py bounds the difference). ValueError for another variant or a plan that does not fit."""
    _, grouped_net = _classes()
    net = grouped_net(_tf_net(generator), {_layer_name(k): v for k, v in plan.items()})
    grouped = copy.deepcopy(generator).eval()
    grouped.net = net.eval()
    return grouped


def part_names(grouped, layers: Sequence[str]) -> List[str]:
    """The convolutions (module names) of a :func:`grouped_generator` copy that compute the original generator's
    convolutions ``layers`` (module names): one per input channel group, ``<layer>.parts.<i>``. ValueError for a
    name the copy has no layer of."""
    modules = dict(grouped.named_modules())
    out: List[str] = []
    for layer in layers:
        parts = modules.get(f"{layer}.parts")
        if parts is None:
            raise ValueError(f"no convolution named {layer}")
        out += [f"{layer}.parts.{i}" for i in range(len(parts))]
    return out


def _tf_net(generator):
    from models.gmcnn import GMCNNTFNet

    net = getattr(generator, "net", None)
    if not isinstance(net, GMCNNTFNet):
        raise ValueError("input channel groups need the tf variant's graph; this generator is "
                         f"{getattr(getattr(generator, 'meta', None), 'variant', type(net).__name__)!r}")
    return net


def _module_name(layer: str) -> str:
    return f"net.layers.{layer}"


def _layer_name(module: str) -> str:
    prefix = "net.layers."
    if not module.startswith(prefix):
        raise ValueError(f"{module} is not a layer of the tf variant's graph")
    return module[len(prefix):]


def _producers(net) -> Dict[str, List[Tuple[str, int]]]:
    """Per layer, the layers whose outputs make its input, in channel order, with their channel counts (empty:
    the network's input)."""
    out: Dict[str, List[Tuple[str, int]]] = {}
    for branch, specs in net.specs.items():
        if branch == "merge":
            continue
        previous: Optional[str] = None
        for spec in specs:
            out[spec.name] = [(previous, net.layers[previous].out_channels)] if previous else []
            previous = spec.name
    merge = [s.name for s in net.specs["merge"]]
    ends = [net.specs[b][-1].name for b in ("b1", "b2", "b3")]
    out[merge[0]] = [(end, net.layers[end].out_channels) for end in ends]
    for before, name in zip(merge, merge[1:]):
        out[name] = [(before, net.layers[before].out_channels)]
    return out


_CLASSES: list = []


def _classes():
    """(GroupedLayer, GroupedTFNet), defined on first use: they subclass torch modules, which this module
    imports lazily like the rest of export."""
    if _CLASSES:
        return _CLASSES

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from models.gmcnn import GMCNNTFNet, tf_same_padding

    class GroupedLayer(nn.Module):
        """One TF-variant layer as a sum of convolutions over contiguous input slices, then its ELU.
        ``weight`` (O, I, k, k) and ``bias`` (O,) already permuted (outputs and inputs); ``bounds``: the slices'
        (start, end) in the permuted input."""

        def __init__(self, layer, weight, bias, bounds: Sequence[Tuple[int, int]]):
            super().__init__()
            self.spec = layer.spec
            self.bounds = [tuple(b) for b in bounds]
            self.parts = nn.ModuleList()
            for i, (a, b) in enumerate(self.bounds):
                part = nn.Conv2d(b - a, weight.shape[0], layer.kernel_size, stride=layer.stride,
                                 dilation=layer.dilation, padding=layer.padding, bias=(i == 0))
                with torch.no_grad():
                    part.weight.copy_(weight[:, a:b])
                    if i == 0:
                        part.bias.copy_(bias)
                self.parts.append(part)

        def forward(self, x):
            if self.spec.stride != 1:
                top, bottom = tf_same_padding(x.shape[-2], self.spec.kernel, self.spec.stride, self.spec.dilation)
                left, right = tf_same_padding(x.shape[-1], self.spec.kernel, self.spec.stride, self.spec.dilation)
                x = F.pad(x, (left, right, top, bottom))
            y = None
            for (a, b), part in zip(self.bounds, self.parts):
                z = part(x[:, a:b] if (a, b) != (0, x.shape[1]) else x)
                y = z if y is None else y + z
            return F.elu(y) if self.spec.activation else y

    class GroupedTFNet(GMCNNTFNet):
        """:class:`models.gmcnn.GMCNNTFNet` with its layers rebuilt by :func:`grouped_generator`'s plan: the
        same forward (input (N,5,H,W), output (N,3,H,W) in [-1,1]), every layer a :class:`GroupedLayer`."""

        def __init__(self, net, plan: Dict[str, List[List[int]]]):
            super().__init__(net.cnum)
            producers = _producers(net)
            in_order: Dict[str, List[int]] = {}
            for name, layer in net.layers.items():
                channels = layer.in_channels
                order = [c for group in plan.get(name, [list(range(channels))]) for c in group]
                if sorted(order) != list(range(channels)):
                    raise ValueError(f"the groups of {name} are not a partition of its {channels} input channels")
                if name in plan and not producers[name]:
                    raise ValueError(f"{name} reads the network's input, whose channels cannot be permuted")
                in_order[name] = order
            # each producer's output order is its consumer's input order, restricted to its own channels
            out_order: Dict[str, List[int]] = {name: list(range(layer.out_channels)) for name, layer in net.layers.items()}
            for name, sources in producers.items():
                offset = 0
                for producer, channels in sources:
                    out_order[producer] = [c - offset for c in in_order[name] if offset <= c < offset + channels]
                    offset += channels
                # a consumer of several producers (the merge) must keep them in concatenation order
                if len(sources) > 1:
                    owner = [next(i for i, (_, n) in enumerate(sources) if c < sum(m for _, m in sources[:i + 1]))
                             for c in in_order[name]]
                    if owner != sorted(owner):
                        raise ValueError(f"the groups of {name} mix the channels of its concatenated inputs")
            self.layers = nn.ModuleDict()
            for name, layer in net.layers.items():
                # the input, in the producer's new output order, is the input permuted by in_order (see above)
                weight = layer.weight.detach()[out_order[name]][:, in_order[name]]
                bias = layer.bias.detach()[out_order[name]]
                sizes = [len(g) for g in plan.get(name, [list(range(layer.in_channels))])]
                bounds = np.cumsum([0] + sizes)
                self.layers[name] = GroupedLayer(layer, weight, bias, list(zip(bounds[:-1], bounds[1:])))
            self.specs = net.specs

    _CLASSES.extend([GroupedLayer, GroupedTFNet])
    return _CLASSES
