"""First-stage GMCNN training (reconstruction losses only) on a folder of photos.

The loss is the paper's pre-training objective, with the reference PyTorch
weights: ``1.4 * L_rec + 1.2 * L_ae`` where

* ``L_rec`` is the confidence-driven, spatially weighted L1 over the hole: the
  weight of a hole pixel comes from propagating the known region's confidence
  into the hole (7 rounds of a 65x65 Gaussian blur of ``conf + (1 - mask)``,
  each masked back to the hole), so pixels near the boundary count more than
  pixels deep inside. The mean is normalised by the hole fraction.
* ``L_ae`` is plain L1 on the known region, normalised by its fraction.

Optionally ``+ activation_penalty * P`` where ``P`` is the mean over activated convolutions of
``mean(relu(|y| - activation_limit)^2) / activation_limit^2``: it leaves normal activations alone and
pulls outliers (which break int8, see :mod:`models.conditioning`) back under the limit.

Optimiser: Adam with the reference betas (0.5, 0.9) (fused on CUDA), optional linear learning-rate
warm-up from the step the optimiser state was created, optional gradient-norm clipping.

A run lives in one folder: ``last.pt`` (model, optimiser, step; written
atomically every few minutes and on exit), ``best.safetensors`` (best
validation checkpoint so far, project format), ``log.jsonl`` (training,
validation and timing records) and ``config.json``. The batch of step ``s`` is drawn from
its own generator seeded with ``(seed, s)``, so ``--resume`` continues the exact
sample stream from the step alone, and the stream is the same whether batches
are drawn inline or ahead of time on loader threads (:mod:`models.train_data`).

A run may start from trained weights (``init_from``: the shipped model or weights a GPU machine
handed back); its step count then continues from the checkpoint's, and the checkpoint's record of
earlier runs (``extra["runs"]``) is carried into every checkpoint this run writes.

Validation (every few minutes, on the validation photos' whole views, batched, no gradients) scores
hole PSNR/SSIM and, from the same forward passes, the dead-layer share and peak activation
(:mod:`models.conditioning`); with ``peak_samples`` (an .npz of the export's held-out samples at
1024x1360) the peak is also measured there. The best checkpoint is the best hole PSNR among
well-conditioned ones (no dead layer, peak under the limit), or among all while none is.

Images inside the trainer are float32 tensors (N,3,H,W), RGB, in [-1, 1];
masks are (N,1,H,W) float32 with 1 = hole.
"""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from runtime_py.errors import UserError

from .conditioning import PEAK_LIMIT, ActivationMonitor, activated_convolutions, load_samples, summarize, \
    well_conditioned
from .dataset import split_names
from .gmcnn import build_generator, check_shape
from .train_config import IDENTITY_KEYS, TrainConfig
from .train_data import (BatchStream, Recipe, composite, list_photos, load_photo, masks_tensor,
                         resolve_loader_threads, to_tensor, to_uint8, validation_set)

LAMBDA_REC = 1.4   # reference PyTorch train options
LAMBDA_AE = 1.2
ADAM_BETAS = (0.5, 0.9)
BRANCHES = ("b1", "b2", "b3")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


# ------------------------------------------------------------------ confidence weights

def gaussian_taps(size: int = 65, sigma: float = 1.0 / 40) -> np.ndarray:
    """1-D taps whose outer product's square root is the reference blur kernel; (size,) float64.

    The reference builds a 2-D kernel ``sqrt(outer(k, k))`` from the standard-normal
    mass ``k`` of ``size`` equal bins spanning ``[-sigma - d/2, sigma + d/2]``,
    ``d = (2 sigma + 1) / size``. That kernel is separable into ``sqrt(k)`` taps,
    which is what is returned (normalised so the 2-D kernel sums to 1).
    """
    step = (2.0 * sigma + 1.0) / size
    edges = np.linspace(-sigma - step / 2, sigma + step / 2, size + 1)
    cdf = np.array([0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) for x in edges])
    taps = np.sqrt(np.diff(cdf))
    return taps / taps.sum()


def confidence_weights(mask: torch.Tensor, size: int = 65, sigma: float = 1.0 / 40, iters: int = 7) -> torch.Tensor:
    """Spatial loss weights for the hole, (N,1,H,W) float32 in [0, 1]: 0 on known pixels.

    ``mask``: (N,1,H,W) float, 1 = hole. Known pixels start with confidence 1; each
    round blurs the confidence map and keeps it only inside the hole, so the weight
    decays with distance from the known region.
    """
    taps = torch.as_tensor(gaussian_taps(size, sigma), dtype=mask.dtype, device=mask.device)
    k_rows = taps.view(1, 1, size, 1)
    k_cols = taps.view(1, 1, 1, size)
    pad = size // 2
    h, w = mask.shape[-2:]
    mode = "reflect" if pad < min(h, w) else "replicate"
    hole = mask.contiguous()
    conf = torch.zeros_like(hole)
    with torch.no_grad():
        for _ in range(iters):
            x = F.pad(conf + (1.0 - hole), (pad, pad, pad, pad), mode=mode)
            x = F.conv2d(F.conv2d(x, k_rows), k_cols)
            conf = x * hole
    return conf


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        conf: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """First-stage GMCNN loss; pred/target (N,3,H,W) in [-1,1], mask (N,1,H,W) 1 = hole.

    Returns the scalar loss and its parts as detached 0-d tensors (``rec``: weighted hole L1,
    ``ae``: known-region L1); reading them (``float``) waits for the device.
    """
    if conf is None:
        conf = confidence_weights(mask)
    diff = (pred - target).abs()
    rec = (diff * conf).mean() / mask.mean().clamp_min(1e-6)
    ae = (diff * (1.0 - mask)).mean() / (1.0 - mask).mean().clamp_min(1e-6)
    loss = LAMBDA_REC * rec + LAMBDA_AE * ae
    return loss, {"rec": rec.detach(), "ae": ae.detach()}


# ------------------------------------------------------------------------ initialisation

def he_init_(gen, seed: int, prefixes: Optional[Sequence[str]] = None) -> List[str]:
    """Re-draw conv weights from N(0, 2 / fan_in) (He et al.), biases zero; only layers whose name (the TF
    layer name, e.g. ``b1conv3``, or the module path) starts with one of ``prefixes`` when given.
    Returns the re-drawn layers' names.

    The reference N(0, 0.02) init shrinks the signal by ~3x per layer in this deep
    network (output std ~0.02 at init), so short runs only learn output biases;
    He init keeps the input visible at the output (std ~0.4) from step 0.
    """
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    done = []
    with torch.no_grad():
        for name, m in gen.named_modules():
            if not isinstance(m, nn.Conv2d):
                continue
            short = name.rsplit(".", 1)[-1]
            if prefixes is not None and not any(short.startswith(p) for p in prefixes):
                continue
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            # drawn on the CPU (where the seeded generator lives) so that a GPU run gets the same weights
            m.weight.copy_(torch.empty(m.weight.shape).normal_(0.0, math.sqrt(2.0 / fan_in), generator=g))
            m.bias.zero_()
            done.append(short)
    return done


def branch_channels(cnum: int) -> Dict[str, slice]:
    """Which input channels of the tf variant's ``mergeconv17`` each branch feeds: b1 4c, b2 2c, b3 c/2."""
    c = cnum
    return {"b1": slice(0, 4 * c), "b2": slice(4 * c, 6 * c), "b3": slice(6 * c, 6 * c + c // 2)}


def reinit_branches(gen, branches: Sequence[str], seed: int, images: torch.Tensor, masks: torch.Tensor) -> List[str]:
    """He re-initialise whole branches of a trained ``tf`` generator (a branch with a dead layer cannot learn
    again: ELU passes no gradient at its floor) without changing what the generator computes.

    ``mergeconv17``'s weights on the branch's channels are zeroed, and its bias takes over the old branch
    output's contribution at that output's per-channel median over ``images``/``masks`` (exact where the old
    output was spatially constant, as a dead branch's is away from the zero-padded border, which the median
    ignores). Gradients reach the new branch once those weights move off zero. Returns the re-drawn layers.
    """
    if gen.meta.variant != "tf":
        raise UserError("--reinit works on the tf variant only")
    unknown = sorted(set(branches) - set(BRANCHES))
    if unknown:
        raise UserError(f"--reinit: unknown branch(es) {', '.join(unknown)}; choose from {', '.join(BRANCHES)}")
    if not branches:
        return []
    merge = gen.net.layers["mergeconv17"]
    captured = {}
    hook = merge.register_forward_pre_hook(lambda mod, inp: captured.setdefault("x", inp[0].detach()))
    try:
        with torch.no_grad():
            gen(images, masks)
    finally:
        hook.remove()
    x = captured["x"].float()
    typical = x.transpose(0, 1).reshape(x.shape[1], -1).median(dim=1).values  # (C_in,)
    chans = branch_channels(gen.meta.cnum)
    with torch.no_grad():
        for b in branches:
            sl = chans[b]
            w = merge.weight[:, sl]  # (C_out, C_b, k, k)
            merge.bias += (w.float().sum(dim=(2, 3)) @ typical[sl]).to(merge.bias.dtype)
            w.zero_()
    return he_init_(gen, seed, prefixes=list(branches))


# ------------------------------------------------------------------------ activation penalty

class ActivationPenalty:
    """While attached, sums ``mean(relu(|y| - limit)^2) / limit^2`` over the activated convolutions of
    the training forward pass (autograd-connected); :meth:`take` returns the mean and resets."""

    def __init__(self, gen, limit: float):
        self.limit = float(limit)
        self._terms: List[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._hook) for _, m, act, _ in activated_convolutions(gen) if act]

    def _hook(self, mod, inputs, output):
        if torch.is_grad_enabled():
            self._terms.append((F.relu(output.float().abs() - self.limit) ** 2).mean() / self.limit ** 2)

    def take(self) -> torch.Tensor:
        terms, self._terms = self._terms, []
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


# ---------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(gen, images: np.ndarray, masks: np.ndarray, device: torch.device, batch: int = 8,
             peak_samples: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Dict[str, object]:
    """Hole PSNR/SSIM of the composited output over fixed samples, and the conditioning numbers of the
    same forward passes (float32, no autocast). images (K,H,W,3) uint8 RGB, masks (K,H,W) 1 = hole;
    ``peak_samples``: more (images, masks), at any one size, on which only the peak is measured."""
    from runtime_py.metrics import psnr, ssim

    was_training = gen.training
    gen.eval()
    psnrs, ssims = [], []
    batch = max(d for d in range(1, min(batch, len(images)) + 1) if len(images) % d == 0)  # one cuDNN shape
    try:
        with ActivationMonitor(gen) as mon:
            for i in range(0, len(images), batch):
                x = to_tensor(list(images[i:i + batch])).to(device)
                m = masks_tensor(list(masks[i:i + batch])).to(device)
                for j, out in enumerate(to_uint8(gen(x, m))):
                    img, hole = images[i + j], masks[i + j] > 0
                    res = composite(out, img, hole)
                    psnrs.append(psnr(img, res, hole))
                    ssims.append(ssim(img, res, hole))
        cond = summarize(mon.rows())
        result: Dict[str, object] = {
            "val_hole_psnr": float(np.mean(psnrs)), "val_hole_ssim": float(np.mean(ssims)),
            "dead_layers": cond["dead_layers"], "worst_floor_share": round(cond["worst_floor_share"], 4),
            "worst_floor_layer": cond["worst_floor_layer"], "val_peak": cond["peak"], "val_peak_layer": cond["peak_layer"]}
        peak = cond
        if peak_samples is not None:
            with ActivationMonitor(gen) as mon:
                for img, hole in zip(*peak_samples):
                    gen(to_tensor([img]).to(device), masks_tensor([hole]).to(device))
            peak = summarize(mon.rows())
            result.update(heldout_peak=peak["peak"], heldout_peak_layer=peak["peak_layer"])
        result["well_conditioned"] = well_conditioned({"dead_layers": cond["dead_layers"], "peak": peak["peak"]})
    finally:
        gen.train(was_training)
    return result


# ---------------------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch")
    return torch.device(name)


def atomic_torch_save(obj, path: Path) -> None:
    from runtime_py.imageio import default_file_mode

    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.fchmod(fd, default_file_mode())  # mkstemp makes 0600 files
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    from runtime_py.imageio import write_bytes_atomic

    write_bytes_atomic(path, text.encode())


def config_from_state(saved: dict) -> TrainConfig:
    """The TrainConfig a last.pt was written with (settings this version no longer has are dropped)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def learning_rate(cfg: TrainConfig, step: int, optimizer_from: int, elapsed_s: float = 0.0) -> float:
    """cfg.lr after a linear warm-up over cfg.warmup_steps steps counted from ``optimizer_from``, the step at
    which the optimiser's state was created (fresh Adam moments are noisy; a resumed run keeps its state),
    and, over the last cfg.lr_decay_minutes of this call's cfg.max_minutes (``elapsed_s`` = seconds since
    the call started), a cosine fall to cfg.lr * cfg.lr_final_fraction. The decay follows the clock because
    a lent GPU is budgeted in minutes, not steps: one call then both trains and anneals."""
    lr = cfg.lr
    if cfg.warmup_steps > 0:
        lr *= min(1.0, (step - optimizer_from + 1) / cfg.warmup_steps)
    if cfg.lr_decay_minutes > 0:
        decay_s = min(cfg.lr_decay_minutes, cfg.max_minutes) * 60
        left = min(max(cfg.max_minutes * 60 - elapsed_s, 0.0), decay_s) / decay_s  # 1 before the decay, 0 at the end
        lr *= cfg.lr_final_fraction + (1 - cfg.lr_final_fraction) * 0.5 * (1 - math.cos(math.pi * left))
    return lr


def check_config(cfg: TrainConfig) -> None:
    """UserError for settings that cannot train, before anything is written."""
    try:
        check_shape(cfg.variant, cfg.crop, cfg.crop)
        check_shape(cfg.variant, *cfg.whole_size)
        check_shape(cfg.variant, *cfg.val_size)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if min(cfg.batch_size, cfg.whole_batch_size, cfg.val_masks_per_photo) < 1 or cfg.lr <= 0 or cfg.max_minutes <= 0:
        raise UserError("--batch-size, --whole-batch-size, --val-masks-per-photo, --lr and --max-minutes must be positive")
    if not 0.0 <= cfg.whole_fraction <= 1.0:
        raise UserError("--whole-fraction must be between 0 and 1")
    if not 0.0 < cfg.max_hole <= 0.9 or not 0.0 < cfg.hole_start <= 0.9:
        raise UserError("--max-hole and --hole-start must be fractions of the image in (0, 0.9]")
    if min(cfg.warmup_steps, cfg.hole_ramp_steps) < 0 or cfg.clip_grad_norm < 0 or cfg.activation_penalty < 0:
        raise UserError("--warmup-steps, --hole-ramp-steps, --clip-grad-norm and --activation-penalty must not be negative")
    if cfg.lr_decay_minutes < 0 or not 0 < cfg.lr_final_fraction <= 1:
        raise UserError("--lr-decay-minutes must not be negative and --lr-final-fraction must be in (0, 1]")
    if cfg.activation_limit <= 0:
        raise UserError("--activation-limit must be positive")
    if cfg.amp not in ("off", "bf16"):
        raise UserError(f"--amp: unknown mode {cfg.amp!r} (off, bf16)")
    if cfg.compile not in COMPILE_MODES:
        raise UserError(f"--compile: unknown mode {cfg.compile!r} ({', '.join(COMPILE_MODES)})")
    if cfg.init not in ("reference", "he"):
        raise UserError(f"unknown --init {cfg.init!r}")


class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.stop = False

    def __call__(self, *_):
        self.stop = True


def _phase_of(cfg: TrainConfig) -> dict:
    return {"crop": cfg.crop, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_decay_minutes": cfg.lr_decay_minutes,
            "lr_final_fraction": cfg.lr_final_fraction, "whole_fraction": cfg.whole_fraction,
            "whole_size": list(cfg.whole_size), "whole_batch_size": cfg.whole_batch_size, "max_hole": cfg.max_hole,
            "hole_start": cfg.hole_start, "hole_ramp_steps": cfg.hole_ramp_steps}


def hole_curriculum_start(phases: List[dict]) -> int:
    """The step the hole curriculum counts from: the start of the run of latest phases that share the hole
    settings (a new learning rate on resume does not restart the ramp; new hole settings do)."""
    keys = ("max_hole", "hole_start", "hole_ramp_steps")
    start = phases[-1]["from_step"]
    for p in reversed(phases):
        if any(p.get(k) != phases[-1].get(k) for k in keys):
            break
        start = p["from_step"]
    return start


def _describe_phases(phases: List[dict]) -> str:
    parts = []
    for p in phases:
        what = f"{p['crop']}x{p['crop']} crops (batch {p['batch_size']})"
        if p.get("whole_fraction"):
            h, w = p["whole_size"]
            what += f", {p['whole_fraction']:.0%} of steps whole photos at {h}x{w} (batch {p['whole_batch_size']})"
        parts.append(f"{what}, holes up to {p.get('max_hole', 0.3):.0%}, lr {p['lr']:g} from step {p['from_step']}")
    return "; then ".join(parts)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---------------------------------------------------------------------------- trainer

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Dict[str, object]:
    """Run (or continue) training as configured; returns a summary dict. See the module docstring."""
    from tqdm import tqdm

    from .checkpoint import save_checkpoint

    from runtime_py.imageio import check_output_dir, make_output_dir

    wall_start = time.monotonic()
    out = Path(cfg.out)
    check_output_dir(out, "run folder (--out)")
    last_path = out / "last.pt"
    if resume and not last_path.exists():
        raise UserError(f"--resume: {last_path} does not exist")
    if not resume and last_path.exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    state = torch.load(last_path, map_location="cpu", weights_only=True) if resume else None
    if state is not None:
        # The run's identity (network, data, validation set) comes from its folder. Budgets, intervals,
        # learning rate, batch sizes, crop and whole sizes and holes may change on resume (a new phase).
        saved = config_from_state(state["config"])
        for key in IDENTITY_KEYS:
            setattr(cfg, key, getattr(saved, key))
    check_config(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    else:
        # few fixed shapes, so cuDNN's per-shape algorithm search pays off after each shape's first step
        torch.backends.cudnn.benchmark = True
    use_amp = cfg.amp == "bf16"
    memory_format = torch.channels_last if use_amp and device.type == "cuda" else torch.contiguous_format
    import cv2

    cv2.setNumThreads(1)

    paths = list_photos(Path(cfg.photos))
    by_name = {p.name: p for p in paths}
    split = split_names(list(by_name), cfg.val_photos, cfg.exclude_photos)
    peak_samples = None
    if cfg.peak_samples:
        images, masks, _ = load_samples(Path(cfg.peak_samples))
        peak_samples = (images, masks)

    # one photo at a time: load_photo filters the decoder's stderr, a process-wide redirection
    photos = []
    with tqdm(split.train, desc="decode", disable=not progress, leave=False) as bar:  # erased, even on an error
        for name in bar:
            photos.append(load_photo(by_name[name], cfg.cache_short_side))
    val_photos = [load_photo(by_name[n], cfg.cache_short_side) for n in split.validation]
    val_images, val_masks = validation_set(val_photos, cfg.val_size, cfg.val_masks_per_photo, cfg.seed)

    # ---- the network, its history, the optimiser
    if state is not None:
        gen = build_generator(cfg.variant, cfg.cnum, channel_order=state.get("channel_order", "rgb"))
        gen.load_state_dict(state["model"])
        prior_runs = list(state.get("prior_runs", []))
        step, trained_s = int(state["step"]), float(state["trained_s"])
        optimizer_from = int(state.get("optimizer_from", 0))
        invocations = list(state.get("invocations", []))
        phases = list(state.get("phases", []))
        best_key = tuple(state.get("best_key", (False, float(state["best"]))))
    else:
        prior_runs, invocations, phases, best_key = [], [], [], (False, -math.inf)
        step, trained_s = 0, 0.0
        if cfg.init_from:
            from . import load_generator

            gen = load_generator(cfg.init_from)
            cfg.variant, cfg.cnum = gen.meta.variant, gen.meta.cnum
            extra = dict(gen.meta.extra or {})
            step, trained_s = int(extra.get("step", 0)), float(extra.get("trained_s", 0.0))
            prior_runs = list(extra.get("runs") or ([{"to_step": step, "trained_s": trained_s,
                                                      "note": "trained before runs were recorded"}] if step else []))
        else:
            gen = build_generator(cfg.variant, cfg.cnum, seed=cfg.seed)
            if cfg.init == "he":
                he_init_(gen, cfg.seed)
        optimizer_from = step
    first_step = step
    gen = gen.to(device, memory_format=memory_format)
    if state is None and cfg.reinit:
        k = min(4, len(val_images))
        reinit_branches(gen, cfg.reinit, cfg.seed, to_tensor(list(val_images[:k])).to(device),
                        masks_tensor(list(val_masks[:k])).to(device))
    gen.meta.train_size = (cfg.crop, cfg.crop) if cfg.whole_fraction == 0 else tuple(cfg.whole_size)
    adam_kwargs = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=ADAM_BETAS, **adam_kwargs)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    gen.train()

    current = _phase_of(cfg)
    if not phases or any(phases[-1].get(k) != v for k, v in current.items()):
        phases.append({**current, "from_step": step})
    recipe = Recipe(cfg.batch_size, cfg.crop, cfg.max_scale, cfg.whole_fraction, tuple(cfg.whole_size),
                    cfg.whole_batch_size, cfg.max_hole, cfg.hole_start, cfg.hole_ramp_steps, hole_curriculum_start(phases))
    origin = f"; continued from {cfg.init_from} at step {prior_runs[-1]['to_step'] if prior_runs else 0}" \
        if cfg.init_from else f" ({cfg.init} init)"
    gen.meta.description = (
        f"GMCNN {cfg.variant} cnum {cfg.cnum}{origin}, first-stage (reconstruction-loss) training on "
        f"{len(split.train)} photos: {_describe_phases(phases)}"
        + (f"; branches re-initialised: {', '.join(cfg.reinit)}" if cfg.reinit else "")
        + f"; validated on {len(split.validation)} photos ({', '.join(split.validation)}); "
        f"never trained on: {', '.join(sorted(set(cfg.exclude_photos) | set(split.validation)))}")

    model = gen
    if cfg.compile != "off":
        model = torch.compile(gen, mode=None if cfg.compile == "default" else cfg.compile, dynamic=False)
    penalty = ActivationPenalty(gen, cfg.activation_limit) if cfg.activation_penalty > 0 else None

    # the run folder appears only now, once the photos were decoded and the
    # starting weights loaded: a refused run leaves none
    make_output_dir(out, "run folder (--out)")
    atomic_write_text(out / "config.json", json.dumps({**asdict(cfg), "train_photos": split.train,
                                                       "val_photo_files": split.validation,
                                                       "excluded_present": split.held_out}, indent=2))
    loader_threads = resolve_loader_threads(cfg.loader_threads, device.type)
    batches = BatchStream(photos, recipe, cfg.seed, first_step=step, threads=loader_threads,
                          pin_memory=device.type == "cuda")
    log = (out / "log.jsonl").open("a")
    timer = {"setup_s": 0.0, "steps_s": 0.0, "warmup_s": 0.0, "validation_s": 0.0, "checkpoint_s": 0.0,
             "data_wait_s": 0.0}
    timed_steps = 0
    invocation = {"from_step": first_step, "to_step": step, "device": _device_name(device), "amp": cfg.amp,
                  "compile": cfg.compile, "wall_s": 0.0, "steps_per_s": None}

    def record(entry: dict) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def runs_so_far() -> List[dict]:
        invocation.update(to_step=step, wall_s=round(time.monotonic() - wall_start, 1),
                          steps_per_s=round(timed_steps / timer["steps_s"], 2) if timer["steps_s"] else None)
        return prior_runs + invocations + [dict(invocation)]

    def save_last() -> None:
        t0 = time.monotonic()
        atomic_torch_save({"model": gen.state_dict(), "optimizer": opt.state_dict(), "step": step,
                           "trained_s": trained_s, "best": best_key[1], "best_key": list(best_key),
                           "config": asdict(cfg), "phases": phases, "prior_runs": prior_runs,
                           "invocations": invocations + [runs_so_far()[-1]], "optimizer_from": optimizer_from,
                           "channel_order": gen.meta.channel_order}, last_path)
        timer["checkpoint_s"] += time.monotonic() - t0

    def run_validation() -> dict:
        nonlocal best_key, last_validation
        t0 = time.monotonic()
        scores = validate(gen, val_images, val_masks, device, peak_samples=peak_samples)
        key = (bool(scores["well_conditioned"]), float(scores["val_hole_psnr"]))
        improved = key > best_key
        timer["validation_s"] += time.monotonic() - t0
        if improved:
            best_key = key
            t1 = time.monotonic()
            gen.meta.extra = {"step": step, "trained_s": round(trained_s, 1),
                              **{k: v for k, v in scores.items() if not k.endswith("_layer")},
                              "runs": runs_so_far()}
            save_checkpoint(gen, out / "best.safetensors")
            timer["checkpoint_s"] += time.monotonic() - t1
        entry = {"kind": "val", "step": step, "trained_s": round(trained_s, 1), **scores, "best": improved}
        record(entry)
        last_validation = entry
        return entry

    last_validation: Optional[dict] = None

    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    if not resume or phases[-1]["from_step"] == step:
        record({"kind": "phase", "step": step, **phases[-1]})
    timer["setup_s"] = time.monotonic() - wall_start
    if state is None:
        run_validation()  # the starting point, so the log shows what training bought
    bar = tqdm(total=cfg.max_steps or None, initial=step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    params = [p for p in gen.parameters()]
    clip = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else math.inf
    zero = torch.zeros((), device=device)
    sums = {k: zero.clone() for k in ("loss", "rec", "ae", "penalty", "grad_norm")}
    window = {"start": time.monotonic(), "timed": 0, "logged": 0, "kinds": {}}
    seen_shapes = set()
    last_ckpt = last_val = time.monotonic()

    def flush() -> None:
        """Wait for the device, book the window's time to steps, write a training record."""
        nonlocal trained_s, timed_steps
        values = {k: float(v) for k, v in sums.items()}  # synchronises
        elapsed = time.monotonic() - window["start"]
        timer["steps_s"] += elapsed
        trained_s += elapsed
        timed_steps += window["timed"]
        n = window["logged"]
        if n:
            if not math.isfinite(values["loss"]):
                raise UserError(f"loss became {values['loss']} by step {step}; lower --lr (or clip gradients) and --resume")
            entry = {"kind": "train", "step": step, "trained_s": round(trained_s, 1),
                     **{k: values[k] / n for k in ("loss", "rec", "ae", "grad_norm")},
                     "lr": learning_rate(cfg, step - 1, optimizer_from, time.monotonic() - wall_start),
                     "batches": dict(window["kinds"]),
                     "steps_per_s": round(window["timed"] / elapsed, 2) if window["timed"] and elapsed > 0 else None}
            if penalty is not None:
                entry["penalty"] = values["penalty"] / n
            record(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", best_psnr=f"{best_key[1]:.2f}")
        for v in sums.values():
            v.zero_()
        window.update(start=time.monotonic(), timed=0, logged=0, kinds={})

    def one_step(net, images, masks):
        lr_now = learning_rate(cfg, step, optimizer_from, time.monotonic() - wall_start)
        for group in opt.param_groups:
            group["lr"] = lr_now
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = net(images, masks)
        loss, parts = reconstruction_loss(pred.float(), images, masks)
        pen = penalty.take() if penalty is not None else None
        total = loss + cfg.activation_penalty * pen.to(loss.device) if pen is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return total.detach(), parts, pen, grad_norm

    final = None
    try:
        while not stop.stop:
            if cfg.max_steps and step >= cfg.max_steps:
                break
            if time.monotonic() - wall_start >= cfg.max_minutes * 60:
                break
            t_fetch = time.monotonic()
            kind, images, masks = batches.next()
            timer["data_wait_s"] += time.monotonic() - t_fetch
            shape = (kind, tuple(images.shape))
            first = shape not in seen_shapes
            if first:  # cuDNN's algorithm search (and compilation) for this shape: booked as warm-up
                flush()
            images = images.to(device, memory_format=memory_format, non_blocking=True)
            masks = masks.to(device, memory_format=memory_format, non_blocking=True)
            t_first = time.monotonic()
            try:
                loss, parts, pen, grad_norm = one_step(model, images, masks)
            except Exception as exc:
                if model is gen or not first:
                    raise
                record({"kind": "compile_failed", "step": step, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                model = gen  # eager from here on; this step is redone
                if penalty is not None:
                    penalty.take()
                loss, parts, pen, grad_norm = one_step(model, images, masks)
            step += 1
            sums["loss"] += loss
            sums["rec"] += parts["rec"]
            sums["ae"] += parts["ae"]
            sums["grad_norm"] += grad_norm.detach().float()
            if pen is not None:
                sums["penalty"] += pen.detach().to(device)
            window["logged"] += 1
            window["kinds"][kind] = window["kinds"].get(kind, 0) + 1
            bar.update(1)
            if first:
                float(loss)  # wait for the device
                took = time.monotonic() - t_first
                timer["warmup_s"] += took
                trained_s += took
                seen_shapes.add(shape)
                record({"kind": "warmup", "step": step, "batch": kind, "shape": list(images.shape), "seconds": round(took, 2)})
                window["start"] = time.monotonic()
            else:
                window["timed"] += 1
            if step % cfg.log_every == 0:
                flush()
                now = time.monotonic()
                if now - last_val >= cfg.val_every_minutes * 60:
                    run_validation()
                    last_val = time.monotonic()
                if now - last_ckpt >= cfg.checkpoint_every_minutes * 60:
                    save_last()
                    last_ckpt = time.monotonic()
                # validation and checkpoints are booked to their own timers; the window flush() opened
                # before them would also book them to the steps
                window["start"] = time.monotonic()
        flush()
        # a periodic validation at this very step already scored these weights (seen on a GPU: 10 s twice)
        final = last_validation if last_validation and last_validation["step"] == step else run_validation()
        save_last()
    finally:
        batches.close()
        bar.close()
        if penalty is not None:
            penalty.remove()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        wall = time.monotonic() - wall_start
        # to 10 ms: the parts then add up to the wall time within 6 x 5 ms of rounding
        timing = {"kind": "timing", "step": step, "wall_s": round(wall, 2), **{k: round(v, 2) for k, v in timer.items()},
                  "timed_steps": timed_steps, "steps_this_call": step - first_step,
                  "steps_per_s": round(timed_steps / timer["steps_s"], 2) if timer["steps_s"] > 0 else None,
                  "step_share": round(timer["steps_s"] / wall, 3) if wall > 0 else None}  # warm-up excluded
        record(timing)
        log.close()
    return {"step": step, "trained_s": trained_s, "best_val_hole_psnr": best_key[1],
            "best_well_conditioned": best_key[0], "final": final, "stopped_by_signal": stop.stop, "out": str(out),
            "timing": timing}
