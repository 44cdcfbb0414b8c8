"""Why int8 fails for a model: the value range of every convolution output on real photos.

Full-integer TFLite gives each activation tensor one int8 scale, ``(max - min) / 255``.
When a layer's outputs reach large values while most of them sit in a narrow band (GMCNN's
ELU layers: many values at the -1 floor, a few at +100), one int8 step is wider than that
band and the layer's typical values collapse onto a few levels. The parity gate then
reports a low hole PSNR for ``int8`` and ``int8-dynamic`` files (dynamic-range kernels
quantize activations per tensor at run time, so they suffer the same way).

``python -m export.activations [--checkpoint CKPT] [--shape 512x680]`` prints, per
convolution (output after its ELU for the ``tf`` variant, before it for ``torch``): min,
max, the int8 step of that range, the share of values at the floor (the range's minimum,
ELU's -1, which int8 holds exactly), and over the values above the floor their median and
the number of int8 levels spanning their middle half (``levels_iqr``; below ~4 those
values are mostly rounding noise in int8). ``--sensitivity`` adds, per layer, the model output's hole PSNR
when only that layer's input is rounded to int8, which ranks the layers that cost the most.
Samples: the export's held-out photos and masks, prepared as the runtime feeds the model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from runtime_py.errors import UserError
from runtime_py.memory import reuse_freed_memory

# Quantiles from a fixed-size subsample: exact min/max, and medians/quartiles to ~0.1 %.
SUBSAMPLE = 200_000


def _network_batch(images: np.ndarray, masks: np.ndarray):
    """uint8 (N,H,W,3) RGB and (N,H,W[,1]) masks -> ((N,3,H,W) float32 in [-1,1], (N,1,H,W) float32, 1 = hole)."""
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    m = torch.from_numpy((masks.reshape(masks.shape[:3]) > 0).astype(np.float32))[:, None]
    return x, m


def forward_each_sample(generator, images: np.ndarray, masks: np.ndarray, after_conv,
                        reuse_memory: bool = False) -> None:
    """One float forward per sample (images (N,H,W,3) uint8 RGB, masks (N,H,W[,1]) nonzero = hole),
    calling ``after_conv(name, module, inputs, output)`` after every ``nn.Conv2d``, in network order.

    ``reuse_memory``: each forward inside :func:`runtime_py.memory.reuse_freed_memory` -- faster, for a price in
    memory that depends on what ``after_conv`` allocates. Measured in a full export at 1024x1360 (docs/EXPORT.md,
    "Page faults"): the input means' 12 forwards 260 -> 190 s for 0.1 GiB more; :func:`layer_snr`, whose hook
    computes every convolution again, 179 -> 124 s for 1.8 GiB more, which the memory budget has no room for."""
    import torch

    hooks = [module.register_forward_hook(lambda mod, inputs, output, name=name: after_conv(name, mod, inputs, output))
             for name, module in generator.named_modules() if isinstance(module, torch.nn.Conv2d)]
    try:
        x, m = _network_batch(images, masks)
        with torch.no_grad():
            for i in range(x.shape[0]):
                with reuse_freed_memory() if reuse_memory else contextlib.nullcontext():
                    generator(x[i:i + 1], m[i:i + 1])
    finally:
        for h in hooks:
            h.remove()


def conv_input_means(generator, images: np.ndarray, masks: np.ndarray) -> Dict[str, np.ndarray]:
    """Per convolution (module name), the mean of each input channel over the samples' pixels: float64 (C_in,),
    one float forward per sample (images (N,H,W,3) uint8 RGB, masks (N,H,W[,1]) nonzero = hole). The input
    before the convolution's own padding, as the network feeds it."""
    import torch

    sums: Dict[str, np.ndarray] = {}

    def after_conv(name, module, inputs, output):
        mean = inputs[0].mean(dim=(0, 2, 3), dtype=torch.float64).numpy()  # accumulated in float64, no copy
        sums[name] = sums.get(name, 0) + mean

    forward_each_sample(generator, images, masks, after_conv, reuse_memory=True)
    return {name: total / len(images) for name, total in sums.items()}


def conv_output_stats(generator, images: np.ndarray, masks: np.ndarray, seed: int = 0) -> List[Dict[str, float]]:
    """Per-convolution statistics over a batch, in network order.

    images: (N, H, W, 3) uint8 RGB; masks: (N, H, W) or (N, H, W, 1), nonzero = hole.
    Returns one dict per ``nn.Conv2d`` module: layer, min, max, int8_step, at_floor (share of
    values within half a step of min), and over the values above the floor median, p25, p75 and
    levels_iqr ((p75 - p25) / int8_step).
    """
    import torch

    gen = generator.eval()
    gathered: Dict[str, List[torch.Tensor]] = {}
    forward_each_sample(gen, images, masks,
                        lambda name, mod, inputs, output: gathered.setdefault(name, []).append(output.detach().flatten()))
    rng = np.random.default_rng(seed)
    rows = []
    for name, parts in gathered.items():
        values = torch.cat(parts).numpy()
        lo, hi = float(values.min()), float(values.max())
        sub = values if values.size <= SUBSAMPLE else values[rng.integers(0, values.size, SUBSAMPLE)]
        step = max(hi - lo, 1e-12) / 255.0
        # values at the floor (ELU's -1) are exact in int8 (the range's minimum); the loss is in the rest
        above = sub[sub > lo + step / 2]
        at_floor = 1.0 - above.size / sub.size
        p25, p50, p75 = (float(v) for v in np.quantile(above if above.size else sub, [0.25, 0.5, 0.75]))
        rows.append({"layer": name, "min": lo, "max": hi, "int8_step": step, "at_floor": at_floor, "median": p50,
                     "p25": p25, "p75": p75, "levels_iqr": (p75 - p25) / step})
    return rows


def tensor_extremes(t) -> Tuple[float, float]:
    """(min, max) of a whole tensor as floats, through ``amin``/``amax``: on a channels-last tensor, which every
    convolution of a forward fed NHWC samples makes (:func:`_network_batch`), PyTorch 2.13's ``aminmax``, ``min``
    and ``max`` of the whole tensor took 0.7 s for a 64x1024x1360 float32 tensor here and ``amin``/``amax`` 0.018 s
    (contiguous: 0.018-0.022 s either way); the same values."""
    return float(t.amin()), float(t.amax())


def _fake_int8(t):
    """Per-tensor asymmetric int8 rounding of ``t`` over its own min..max (what a calibrated scale does)."""
    lo, hi = tensor_extremes(t)
    step = max(hi - lo, 1e-12) / 255.0
    # in place on one new tensor: the same operations in the same order as ((t - lo) / step).round() * step + lo,
    # so the same values, without four full-size temporaries (about half the time: it runs on every layer's input)
    q = t - lo
    return q.div_(step).round_().mul_(step).add_(lo)


def _fake_int16(t):
    """Per-tensor symmetric int16 rounding of ``t`` over its own largest magnitude: TFLite's 16x8 activation
    grid (zero point 0, -32767..32767, a calibrated scale of max |t| / 32767)."""
    lo, hi = tensor_extremes(t)
    step = max(-lo, hi, 1e-12) / 32767.0
    q = t / step  # in place after this, as in _fake_int8
    return q.round_().clamp_(-32767, 32767).mul_(step)


#: What ``rounded`` may name: ``input`` (int8 per tensor over its own range: full-integer and dynamic-range
#: int8 files), ``input16`` (int16 symmetric per tensor over its own largest magnitude: 16x8 files),
#: ``weights`` (int8 symmetric per output channel: every TFLite quantized file and Core ML w8), ``bias`` (with
#: ``weights``: the bias corrected for the rounded weights' mean output shift, as int8-dynamic files are,
#: :func:`corrected_bias`; the caller gives the input means).
ROUNDINGS = ("input", "input16", "weights", "bias")


def _round_input(t, rounded: Sequence[str]):
    """A convolution input as ``rounded`` (:data:`ROUNDINGS`) rounds it: int16 grid for ``input16``, int8 for
    ``input``, unchanged otherwise."""
    if "input16" in rounded:
        return _fake_int16(t)
    if "input" in rounded:
        return _fake_int8(t)
    return t


def _rounds_input(rounded: Sequence[str]) -> bool:
    return "input" in rounded or "input16" in rounded


def _hole_psnr(a, b, hole) -> float:
    """8-bit PSNR between two (1,3,H,W) [-1,1] outputs over the hole pixels (hole: (1,1,H,W) bool)."""
    pa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    pb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = float(((pa - pb) ** 2)[hole.expand_as(pa)].mean())
    return 100.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _round_weights_int8(weight):
    """Symmetric per-output-channel int8 rounding of a convolution weight (what the converters do)."""
    scale = weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 127.0
    return (weight / scale).round().clamp(-127, 127) * scale


def corrected_bias(bias, weight, rounded_weight, input_mean):
    """``bias`` (O,) minus the mean output shift that rounding ``weight`` to ``rounded_weight`` (O, I, kh, kw) puts
    on an input with the per-channel means ``input_mean`` (I,): what export.tflite_graph.correct_conv_biases
    writes into a file."""
    import torch

    shift = (rounded_weight - weight).double().sum(dim=(2, 3)) @ torch.as_tensor(input_mean, dtype=torch.float64)
    return bias - shift.to(bias.dtype)


# Where the means kept in an input_means cache were measured: the cache's own entry, beside the convolutions'.
MEANS_SOURCE_KEY = "__measured_by__"
MEANS_FROM_PYTORCH = "a PyTorch float forward per calibration sample"


def input_means(generator, samples, cache: Optional[Path] = None, measured: Optional[Dict[str, np.ndarray]] = None,
                source: str = "") -> Dict[str, np.ndarray]:
    """:func:`conv_input_means` of ``samples`` (:class:`export.samples.Samples`), kept in ``cache`` (.npz) when
    given: the export measures them once per shape and run for the files' bias correction and the fallback's
    simulation of it. ``measured``: the same means measured elsewhere (the int8 calibration pass,
    ``export.tflite.calibration_input_means``; ``source`` says where, :func:`means_source`), taken instead of the
    forwards when the cache has none."""
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            return {k: saved[k] for k in saved.files if k != MEANS_SOURCE_KEY}
    if measured is not None:
        means = dict(measured)
    else:
        means, source = conv_input_means(generator, samples.images, samples.masks), MEANS_FROM_PYTORCH
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".partial.npz")
        np.savez(tmp, **means, **{MEANS_SOURCE_KEY: np.array(source or "given")})
        os.replace(tmp, cache)
    return means


def means_source(cache: Path) -> str:
    """Where the means an :func:`input_means` cache keeps were measured ("" when it has none)."""
    if not Path(cache).is_file():
        return ""
    with np.load(cache) as saved:
        return str(saved[MEANS_SOURCE_KEY]) if MEANS_SOURCE_KEY in saved.files else ""


def means_cache(work_root: Path, shape) -> Path:
    """Where an export keeps :func:`input_means` of its calibration samples at ``shape``."""
    return Path(work_root) / f"conv_input_means_{shape[0]}x{shape[1]}.npz"


def downstream_convs(generator) -> Dict[str, set]:
    """For each convolution, the convolutions whose outputs depend on its input (itself included).

    Found by taint: a NaN fed to one convolution's input reaches exactly the outputs that
    depend on it. Runs at the variant's smallest shape (milliseconds).
    """
    import torch

    from models.gmcnn import min_side

    gen = generator.eval()
    convs = [(n, m) for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    side = max(min_side(gen.meta.variant), 16)
    side += -side % 4
    image, mask = torch.zeros(1, 3, side, side), torch.zeros(1, 1, side, side)
    out: Dict[str, set] = {}
    for name, mod in convs:
        tainted = set()
        hooks = [mod.register_forward_pre_hook(lambda m, inp: (inp[0] * float("nan"),))]
        for other, om in convs:
            hooks.append(om.register_forward_hook(
                lambda m, i, o, other=other: tainted.add(other) if bool(torch.isnan(o).any()) else None))
        try:
            with torch.no_grad():
                gen(image, mask)
        finally:
            for h in hooks:
                h.remove()
        out[name] = tainted
    return out


def _float_forward(gen, convs, x, m, keep):
    """The float32 output of one forward (x (1,C,H,W), m (1,1,H,W): :func:`_network_batch`'s), calling
    ``keep(name, output)`` after each of ``convs`` ((name, module) pairs)."""
    import torch

    hooks = [mod.register_forward_hook(lambda mod, inp, out, name=name: keep(name, out)) for name, mod in convs]
    try:
        with torch.no_grad():
            return gen(x, m)
    finally:
        for h in hooks:
            h.remove()


def int8_sensitivity(generator, images: np.ndarray, masks: np.ndarray, rounded: Sequence[str] = ("input",),
                     whole_model: bool = True, per_sample: Optional[Dict[str, List[float]]] = None) -> Dict[str, float]:
    """Hole PSNR (dB, worst sample) of the output when only that convolution is rounded to int8,
    the rest float32. ``rounded`` says what is rounded: ``input`` (per-tensor, over its own range:
    what full-integer and dynamic-range kernels both do to activations) and/or ``weights``
    (symmetric per output channel, what the converters do to weights). With ``whole_model``, also
    key ``"all"``: every convolution's input rounded; ``"weights"``: every weight rounded,
    activations float; ``"weights+all"``: both.

    A simulation of quantization (ranks the layers that cost the most; the real file's number is
    the parity gate's). ``per_sample`` (a dict) receives each key's PSNR per sample. Each
    layer's run recomputes only the convolutions that depend on it (:func:`downstream_convs`);
    the others replay their float outputs, kept from the sample's float run.
    """
    import torch

    gen = generator.eval()
    convs = [(n, m) for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d)]
    live_sets = downstream_convs(gen)
    x, m = _network_batch(images, masks)
    saved = {name: mod.weight.detach().clone() for name, mod in convs}
    rounded_weights = {name: _round_weights_int8(w) for name, w in saved.items()}
    scores: Dict[str, List[float]] = {}

    def run(i, ref, hole, selected, weights, live, cache):
        """One forward of sample i with ``selected`` convolutions' inputs and ``weights`` rounded."""
        hooks = [mod.register_forward_pre_hook(lambda mod, inp: (_fake_int8(inp[0]),)) for _, mod in selected]
        replaced = []
        for name, mod in convs:
            if live is not None and name not in live:
                mod.forward = (lambda *a, out=cache[name]: out)  # not affected: replay the float output
                replaced.append(mod)
        try:
            with torch.no_grad():
                for name in weights:
                    dict(convs)[name].weight.copy_(rounded_weights[name])
                y = gen(x[i:i + 1], m[i:i + 1])
        finally:
            with torch.no_grad():
                for name in weights:
                    dict(convs)[name].weight.copy_(saved[name])
            for mod in replaced:
                del mod.forward
            for h in hooks:
                h.remove()
        return _hole_psnr(y, ref, hole)

    try:
        for i in range(x.shape[0]):
            cache: Dict[str, object] = {}
            ref = _float_forward(gen, convs, x[i:i + 1], m[i:i + 1], cache.__setitem__)
            hole = m[i:i + 1] > 0
            for name, mod in convs:
                selected = [(name, mod)] if "input" in rounded else []
                weights = [name] if "weights" in rounded else []
                scores.setdefault(name, []).append(run(i, ref, hole, selected, weights, live_sets[name], cache))
            if whole_model:
                names = [n for n, _ in convs]
                scores.setdefault("all", []).append(run(i, ref, hole, convs, [], None, cache))
                scores.setdefault("weights", []).append(run(i, ref, hole, [], names, None, cache))
                scores.setdefault("weights+all", []).append(run(i, ref, hole, convs, names, None, cache))
            del cache
    finally:
        with torch.no_grad():
            for name, mod in convs:
                mod.weight.copy_(saved[name])
    if per_sample is not None:
        per_sample.update(scores)
    return {k: min(v) for k, v in scores.items()}


def layer_snr(generator, images: np.ndarray, masks: np.ndarray, rounded: Sequence[str] = ("input", "weights"),
              per_sample: Optional[Dict[str, List[float]]] = None,
              bias_means: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, float]:
    """Per convolution, the signal-to-quantization-noise ratio (dB, worst sample) of its own output when
    only its ``rounded`` parts are rounded (:data:`ROUNDINGS`: ``input`` to int8 per tensor over its own
    range, ``input16`` to int16 symmetric over its own largest magnitude; ``weights`` to int8 symmetric per
    output channel; ``bias``: the bias corrected for the rounded weights with ``bias_means``,
    :func:`corrected_bias`), everything it is fed staying float32.

    The cheap sensitivity of the export's fallback (:mod:`export.fallback`): one float forward per
    sample, each convolution computed a second time on its rounded input (about twice a forward),
    where :func:`int8_sensitivity` runs the network again per layer (44 partial forwards per sample:
    over 2 hours for the four held-out samples at 512x680 on this 2-core machine). It measures the
    error a layer adds, not how later layers amplify it, so it ranks the layers by the noise they
    inject; the parity gate judges the files it leads to. ``per_sample`` receives every sample's dB per
    convolution. Several roundings in one pass: :func:`layer_snr_each`.
    """
    scores = layer_snr_each(generator, images, masks, [tuple(rounded)], bias_means)[tuple(rounded)]
    if per_sample is not None:
        per_sample.update(scores)
    return {k: min(v) for k, v in scores.items()}


def _linear_and_activation(mod):
    """A convolution module's (linear part, activation), whose composition is its ``forward``: a layer that applies
    its own activation says so (``preactivation``/``activation``, models.gmcnn.TFSameConv); a plain convolution is
    linear."""
    if hasattr(mod, "preactivation") and hasattr(mod, "activation"):
        return mod.preactivation, mod.activation
    return mod.forward, lambda y: y


def layer_snr_each(generator, images: np.ndarray, masks: np.ndarray, roundings: Sequence[Sequence[str]],
                   bias_means: Optional[Dict[str, np.ndarray]] = None) -> Dict[tuple, Dict[str, List[float]]]:
    """:func:`layer_snr` for several roundings in one pass (issue 17: the int8 and the bias-corrected int8-dynamic
    files' fallbacks rank on the same samples): per rounding (a tuple), per convolution, one dB per sample.

    One float forward per sample serves every rounding. A rounding that differs from another of them by ``bias``
    alone (int8-dynamic's ``input, weights, bias`` beside int8's ``input, weights``) takes that one's rounded
    convolution before its activation (:func:`_linear_and_activation`) plus its bias change, ``corrected_bias -
    bias`` per output channel, instead of computing the convolution again: a convolution is linear in its bias,
    so this is the same output but for the float32 rounding of the addition. Every rounding is otherwise
    computed as :func:`layer_snr` computes it, bit for bit."""
    roundings = list(dict.fromkeys(tuple(r) for r in roundings))
    for r in roundings:
        _check_bias_means(r, bias_means)
    without_bias = {r: tuple(x for x in r if x != "bias") for r in roundings}
    shifted = [r for r in roundings if "bias" in r and without_bias[r] in roundings]
    direct = [r for r in roundings if r not in shifted]
    gen = generator.eval()
    scores: Dict[tuple, Dict[str, List[float]]] = {r: {} for r in roundings}

    def record(r, name, q, output, signal):
        error = q - output
        noise = float(error.mul_(error).sum())  # squared in place: the values (q - output) ** 2 has
        db = 100.0 if noise == 0 else float(10 * np.log10(max(signal, 1e-30) / noise))
        scores[r].setdefault(name, []).append(min(db, 100.0))

    def measure(name, mod, inputs, output):
        inp = inputs[0]
        weight = mod.weight.data
        bias = mod.bias.data if mod.bias is not None else None
        signal = float(output.square().sum())
        rounded_weight = _round_weights_int8(weight) if any("weights" in r for r in roundings) else None
        for r in direct:
            partner = next((other for other in shifted if without_bias[other] == r), None)
            linear, activation = _linear_and_activation(mod) if partner is not None else (mod.forward, None)
            if "weights" in r:
                mod.weight.data = rounded_weight
                if "bias" in r and bias is not None:
                    mod.bias.data = corrected_bias(bias, weight, rounded_weight, bias_means[name])
            try:  # mod.forward, not mod(...): the layer's own padding, without calling the hooks again
                pre = linear(_round_input(inp, r), *inputs[1:])
            finally:
                mod.weight.data = weight
                if bias is not None:
                    mod.bias.data = bias
            record(r, name, activation(pre) if activation is not None else pre, output, signal)
            if partner is not None:
                if bias is not None:
                    change = corrected_bias(bias, weight, rounded_weight, bias_means[name]) - bias
                    pre.add_(change.view(1, -1, 1, 1))  # in place: r's output is recorded already
                record(partner, name, activation(pre), output, signal)
            del pre

    forward_each_sample(gen, images, masks, measure)
    return scores


def direct_consumers(downstream: Dict[str, set]) -> Dict[str, set]:
    """For each convolution, the convolutions that read its output with no convolution between them
    (from :func:`downstream_convs`: those depending on its output that depend on no other of them)."""
    out: Dict[str, set] = {}
    for name, down in downstream.items():
        after = down - {name}
        out[name] = {d for d in after if not any(d in downstream[e] - {e} for e in after - {d})}
    return out


def rounded_hole_psnr(generator, images: np.ndarray, masks: np.ndarray, configs: Dict[str, Sequence[str]],
                      rounded: Sequence[str] = ("input", "weights"),
                      downstream: Optional[Dict[str, set]] = None,
                      bias_means: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, List[float]]:
    """Per config (name -> the convolutions rounded to int8, every other one float32), the hole PSNR (dB)
    of the output against float32, one value per sample (images (N,H,W,3) uint8 RGB, masks (N,H,W[,1])
    nonzero = hole). ``rounded`` as in :func:`layer_snr`: ``input`` per tensor over its own range to int8,
    ``input16`` to int16 symmetric (16x8 files), ``weights`` symmetric per output channel to int8.

    What a file keeping the other convolutions out of quantization would lose, simulated in PyTorch,
    error building up along the network included (which :func:`layer_snr` does not see). The export's
    fallback ranks whole branches by it and predicts its per-layer candidates with it
    (:mod:`export.fallback`). Per sample: one float forward, then per config only the convolutions that
    depend on a rounded one (:func:`downstream_convs`); the others replay the float forward's outputs,
    kept only where a recomputed convolution reads them (a branch's last output, not the whole branch:
    a few tensors, not a forward's worth, at full size). A replayed output nothing recomputed reads is a
    NaN placeholder, so a wrong reading of the graph shows as NaN and raises, never as a wrong number.
    ``downstream``: :func:`downstream_convs` of the generator, where the caller has it already.
    ``bias_means``: each convolution's input means (:func:`input_means`), needed when ``rounded`` names ``bias``.
    """
    import torch

    _check_bias_means(rounded, bias_means)
    gen = generator.eval()
    convs = dict((n, m) for n, m in gen.named_modules() if isinstance(m, torch.nn.Conv2d))
    unknown = sorted({c for layers in configs.values() for c in layers} - set(convs))
    if unknown:
        raise ValueError(f"not convolutions of this generator: {', '.join(unknown)}")
    down = downstream if downstream is not None else downstream_convs(gen)
    readers = direct_consumers(down)
    plans = {}
    for key, layers in configs.items():
        live = set().union(*(down[c] for c in layers)) if layers else set()
        kept = {c for c in convs if c not in live and readers[c] & live}
        plans[key] = (list(layers), live, kept)
    needed = set().union(*(kept for _, _, kept in plans.values())) if plans else set()
    x, m = _network_batch(images, masks)
    scores: Dict[str, List[float]] = {key: [] for key in configs}
    for i in range(x.shape[0]):
        cache: Dict[str, object] = {}
        shapes: Dict[str, tuple] = {}

        def keep(name, out):
            shapes[name] = tuple(out.shape)
            if name in needed:
                cache[name] = out

        ref = _float_forward(gen, convs.items(), x[i:i + 1], m[i:i + 1], keep)
        hole = m[i:i + 1] > 0
        for key, (layers, live, kept) in plans.items():
            if not layers:
                scores[key].append(100.0)
                continue
            nan = torch.tensor(float("nan"))
            replaced, hooks, saved, saved_bias = [], [], {}, {}
            for name, mod in convs.items():
                if name not in live:
                    out = cache[name] if name in kept else nan.expand(shapes[name])
                    mod.forward = (lambda *a, out=out: out)
                    replaced.append(mod)
            try:
                with torch.no_grad():
                    for name in layers:
                        mod = convs[name]
                        if "weights" in rounded:
                            saved[name] = mod.weight.data
                            mod.weight.data = _round_weights_int8(mod.weight.data)
                            if "bias" in rounded and mod.bias is not None:
                                saved_bias[name] = mod.bias.data
                                mod.bias.data = corrected_bias(mod.bias.data, saved[name], mod.weight.data,
                                                               bias_means[name])
                        if _rounds_input(rounded):
                            hooks.append(mod.register_forward_pre_hook(
                                lambda mod, inp: (_round_input(inp[0], rounded),) + tuple(inp[1:])))
                    y = gen(x[i:i + 1], m[i:i + 1])
            finally:
                for name, w in saved.items():
                    convs[name].weight.data = w
                for name, b in saved_bias.items():
                    convs[name].bias.data = b
                for mod in replaced:
                    del mod.forward
                for h in hooks:
                    h.remove()
            if bool(torch.isnan(y).any()):
                raise RuntimeError(f"config {key!r}: a replayed convolution output reached the network output "
                                   "(the generator's graph is not what downstream_convs found)")
            scores[key].append(_hole_psnr(y, ref, hole))
        del cache
    return scores


def _check_bias_means(rounded: Sequence[str], bias_means) -> None:
    if "bias" in rounded and (bias_means is None or "weights" not in rounded):
        raise ValueError("rounding 'bias' needs 'weights' rounded too and the convolutions' input means")


def format_table(rows: Sequence[Dict[str, float]], flag_below: float = 4.0) -> str:
    sens = any("input_int8_hole_psnr_db" in r for r in rows)
    lines = [f"{'layer':<34} {'min':>8} {'max':>9} {'int8 step':>9} {'at floor':>8} {'median':>8} {'levels_iqr':>10}"
             + (f" {'input int8 dB':>13}" if sens else "")]
    for r in rows:
        flag = "  <- int8 flattens it" if r["levels_iqr"] < flag_below else ""
        extra = f" {r['input_int8_hole_psnr_db']:13.1f}" if sens else ""
        lines.append(f"{r['layer']:<34} {r['min']:8.3f} {r['max']:9.3f} {r['int8_step']:9.4f} {r['at_floor']:8.1%} "
                     f"{r['median']:8.3f} {r['levels_iqr']:10.1f}{extra}{flag}")
    worst = min(rows, key=lambda r: r["levels_iqr"]) if rows else None
    if worst is not None:
        n_flat = sum(r["levels_iqr"] < flag_below for r in rows)
        lines.append(f"{n_flat} of {len(rows)} layers have fewer than {flag_below:g} int8 levels across their middle "
                     f"half; worst {worst['layer']} ({worst['levels_iqr']:.1f}), largest output "
                     f"{max(r['max'] for r in rows):.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from runtime_py.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m export.activations", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: the shipped default model)")
    p.add_argument("--shape", default="512x680", help="ROWSxCOLS the samples are prepared at")
    p.add_argument("--photos", type=Path, default=None,
                   help="photo folder (default: the export's held-out photos, export/photos/holdout)")
    p.add_argument("--masks-per-photo", type=int, default=2, help="seeded masks per photo")
    p.add_argument("--sensitivity", action="store_true",
                   help="also run the model once per convolution with only its input rounded to int8 and report "
                        "the hole PSNR against float32 (one inference per layer: slow at full size)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    try:
        import torch

        from models import load_generator

        from runtime_py.cli import parse_shape
        from .samples import HOLDOUT_DIR, load_samples

        torch.set_num_threads(2)
        shape: Tuple[int, int] = parse_shape(args.shape)
        gen = load_generator(args.checkpoint)
        samples = load_samples(args.photos or HOLDOUT_DIR, shape, args.masks_per_photo, seed=2)
        rows = conv_output_stats(gen, samples.images, samples.masks)
        if args.sensitivity:
            sens = int8_sensitivity(gen, samples.images, samples.masks)
            for r in rows:
                r["input_int8_hole_psnr_db"] = sens[r["layer"]]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        whole = {k: sens[k] for k in ("all", "weights", "weights+all")} if args.sensitivity else None
        print(json.dumps({"layers": rows, "whole_model_hole_psnr_db": whole}, indent=1))
    else:
        print(format_table(rows))
        if args.sensitivity:
            worst = sorted(rows, key=lambda r: r["input_int8_hole_psnr_db"])[:5]
            print("most sensitive (only that layer's input in int8): "
                  + ", ".join(f"{r['layer']} {r['input_int8_hole_psnr_db']:.1f} dB" for r in worst))
            print(f"hole PSNR against float32 (worst sample): every convolution input in int8 {sens['all']:.1f} dB; "
                  f"every weight in int8 (per channel) {sens['weights']:.1f} dB; both {sens['weights+all']:.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
