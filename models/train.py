"""First-stage GMCNN training (reconstruction losses only) on a folder of photos.

The loss is the paper's pre-training objective, with the reference PyTorch
weights: ``1.4 * L_rec + 1.2 * L_ae`` where

* ``L_rec`` is the confidence-driven, spatially weighted L1 over the hole: the
  weight of a hole pixel comes from propagating the known region's confidence
  into the hole (7 rounds of a 65x65 Gaussian blur of ``conf + (1 - mask)``,
  each masked back to the hole), so pixels near the boundary count more than
  pixels deep inside. The mean is normalised by the hole fraction.
* ``L_ae`` is plain L1 on the known region, normalised by its fraction.

Optimiser: Adam with the reference betas (0.5, 0.9).

A run lives in one folder: ``last.pt`` (model, optimiser, step; written
atomically every few minutes and on exit), ``best.safetensors`` (best
validation hole-PSNR so far, project format), ``log.jsonl`` (training and
validation records) and ``config.json``. The batch of step ``s`` is drawn from
its own generator seeded with ``(seed, s)``, so ``--resume`` continues the exact
sample stream from the step alone, and the stream is the same whether batches
are drawn inline or ahead of time on loader threads.

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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from runtime_py.errors import UserError

from .gmcnn import build_generator, check_shape
from .train_cli import TrainConfig

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LAMBDA_REC = 1.4   # reference PyTorch train options
LAMBDA_AE = 1.2
ADAM_BETAS = (0.5, 0.9)


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
    hole = mask
    conf = torch.zeros_like(mask)
    with torch.no_grad():
        for _ in range(iters):
            x = F.pad(conf + (1.0 - hole), (pad, pad, pad, pad), mode=mode)
            x = F.conv2d(F.conv2d(x, k_rows), k_cols)
            conf = x * hole
    return conf


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        conf: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """First-stage GMCNN loss; pred/target (N,3,H,W) in [-1,1], mask (N,1,H,W) 1 = hole.

    Returns the scalar loss and its parts as floats (``rec``: weighted hole L1,
    ``ae``: known-region L1).
    """
    if conf is None:
        conf = confidence_weights(mask)
    diff = (pred - target).abs()
    rec = (diff * conf).mean() / mask.mean().clamp_min(1e-6)
    ae = (diff * (1.0 - mask)).mean() / (1.0 - mask).mean().clamp_min(1e-6)
    loss = LAMBDA_REC * rec + LAMBDA_AE * ae
    return loss, {"rec": float(rec.detach()), "ae": float(ae.detach())}


def he_init_(gen, seed: int) -> None:
    """Re-draw every conv weight from N(0, 2 / fan_in) (He et al.), biases zero.

    The reference N(0, 0.02) init shrinks the signal by ~3x per layer in this deep
    network (output std ~0.02 at init), so short runs only learn output biases;
    He init keeps the input visible at the output (std ~0.4) from step 0.
    """
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
                m.bias.zero_()


# ------------------------------------------------------------------------------ data

def list_photos(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory of photos")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise UserError(f"{folder}: no photos ({', '.join(PHOTO_SUFFIXES)})")
    return photos


def load_photo(path: Path, short_side: int) -> np.ndarray:
    """Decode once and downscale so the short side is at most ``short_side``; (H,W,3) uint8 RGB."""
    from runtime_py.errors import native_stderr

    with native_stderr():  # libjpeg's own "Premature end of JPEG file" is not the user's error line
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: not a readable image")
    h, w = img.shape[:2]
    scale = short_side / min(h, w)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def random_crop(rng: np.random.Generator, photo: np.ndarray, crop: int, max_scale: float) -> np.ndarray:
    """A ``crop`` x ``crop`` RGB uint8 patch: a square of random side (crop .. crop*max_scale, log-uniform,
    capped by the photo) at a random place, resized to ``crop``, flipped left-right half the time."""
    h, w = photo.shape[:2]
    largest = min(h, w, int(crop * max_scale))
    side = crop if largest <= crop else int(round(math.exp(rng.uniform(math.log(crop), math.log(largest)))))
    side = min(max(side, 1), h, w)
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    patch = photo[y:y + side, x:x + side]
    if side != crop:
        patch = cv2.resize(patch, (crop, crop), interpolation=cv2.INTER_AREA if side > crop else cv2.INTER_LINEAR)
    if rng.uniform() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H,W,3) RGB list -> (N,3,H,W) float32 in [-1, 1]."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N,3,H,W) in [-1, 1] -> (N,H,W,3) uint8 RGB."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).numpy().astype(np.uint8)


def sample_batch(rng: np.random.Generator, photos: Sequence[np.ndarray], batch: int, crop: int,
                 max_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """A training batch drawn only from ``rng``: images (N,3,crop,crop) in [-1,1], masks (N,1,crop,crop)."""
    from runtime_py.masks import random_training_mask

    images, masks = [], []
    for _ in range(batch):
        photo = photos[int(rng.integers(0, len(photos)))]
        images.append(random_crop(rng, photo, crop, max_scale))
        masks.append(random_training_mask(rng, crop, crop))
    mask_t = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    return to_tensor(images), mask_t


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that draws the batch of (0-based) ``step``: a function of the seed and the step alone."""
    return np.random.default_rng([seed, step])


class BatchStream:
    """Training batches for steps ``first_step``, ``first_step + 1``, ...

    With ``threads`` > 0, up to ``depth`` batches are drawn ahead on a thread pool (OpenCV's resizes and the
    mask drawing release the GIL), so a GPU step does not wait for the CPU-side crops. Each batch comes from
    :func:`batch_rng`, so the stream does not depend on the thread count. With ``pin_memory`` the tensors are
    page-locked for asynchronous host-to-GPU copies.
    """

    def __init__(self, photos: Sequence[np.ndarray], batch: int, crop: int, max_scale: float, seed: int,
                 first_step: int, threads: int = 0, depth: int = 0, pin_memory: bool = False):
        self._args = (photos, batch, crop, max_scale)
        self._seed = seed
        self._next_step = first_step
        self._pin = pin_memory
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="batches") if threads > 0 else None
        self._depth = max(depth, 2 * threads)
        self._pending: Deque[Future] = deque()

    def _draw(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        images, masks = sample_batch(batch_rng(self._seed, step), *self._args)
        if self._pin:
            images, masks = images.pin_memory(), masks.pin_memory()
        return images, masks

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._pool is None:
            self._next_step += 1
            return self._draw(self._next_step - 1)
        while len(self._pending) < self._depth:
            self._pending.append(self._pool.submit(self._draw, self._next_step))
            self._next_step += 1
        return self._pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()


def resolve_loader_threads(requested: int, device: torch.device) -> int:
    """-1 = automatic: inline on a CPU (the cores train), otherwise most of the host's cores, at most 8."""
    if requested >= 0:
        return requested
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# ------------------------------------------------------------------------ validation

VAL_MASKS = (("strokes", "medium"), ("rect", "medium"), ("blob", "large"), ("strokes", "large"))


def validation_set(photos: Sequence[np.ndarray], crop: int, per_photo: int, seed: int,
                   max_scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed validation crops and masks: (K,crop,crop,3) uint8 RGB, (K,crop,crop) uint8 1 = hole."""
    from runtime_py.masks import make_mask

    rng = np.random.default_rng(seed + 1_000_003)
    crops, masks = [], []
    for photo in photos:
        for i in range(per_photo):
            crops.append(random_crop(rng, photo, crop, max_scale))
            kind, size = VAL_MASKS[len(masks) % len(VAL_MASKS)]
            masks.append(make_mask(kind, crop, crop, seed=seed + len(masks), size=size))
    return np.stack(crops), np.stack(masks)


def composite(pred: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Network pixels in the hole, original pixels elsewhere; (H,W,3) uint8."""
    m = (mask > 0)[..., None]
    return np.where(m, pred, original)


@torch.no_grad()
def validate(gen, crops: np.ndarray, masks: np.ndarray, device: torch.device) -> Dict[str, float]:
    """Mean hole PSNR / SSIM of the composited output over the fixed validation crops."""
    from runtime_py.metrics import psnr, ssim

    gen.eval()
    psnrs, ssims = [], []
    for img, m in zip(crops, masks):
        x = to_tensor([img]).to(device)
        mt = torch.from_numpy(m.astype(np.float32))[None, None].to(device)
        out = to_uint8(gen(x, mt))[0]
        res = composite(out, img, m)
        psnrs.append(psnr(img, res, m > 0))
        ssims.append(ssim(img, res, m > 0))
    gen.train()
    return {"val_hole_psnr": float(np.mean(psnrs)), "val_hole_ssim": float(np.mean(ssims))}


# ---------------------------------------------------------------------------- config

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


# ---------------------------------------------------------------------------- trainer

class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.stop = False

    def __call__(self, *_):
        self.stop = True


def split_photos(photos: List[Path], val_names: Sequence[str]) -> Tuple[List[Path], List[Path]]:
    names = {p.name for p in photos}
    missing = [n for n in val_names if n not in names]
    if missing:
        raise UserError(f"validation photos not in the folder: {', '.join(missing)}")
    val = [p for p in photos if p.name in set(val_names)]
    train = [p for p in photos if p.name not in set(val_names)]
    if not train:
        raise UserError("no training photos left after holding out the validation photos")
    if not val:
        raise UserError("at least one validation photo is needed (--val-photos)")
    return train, val


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Dict[str, object]:
    """Run (or continue) training as configured; returns a summary dict. See the module docstring."""
    from tqdm import tqdm

    from .checkpoint import save_checkpoint

    try:
        check_shape(cfg.variant, cfg.crop, cfg.crop)
        check_shape(cfg.variant, cfg.val_crop, cfg.val_crop)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.max_minutes <= 0:
        raise UserError("--batch-size, --lr and --max-minutes must be positive")
    if cfg.amp not in ("off", "bf16"):
        raise UserError(f"--amp: unknown mode {cfg.amp!r} (off, bf16)")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    else:
        # fixed crop size, so cuDNN's per-shape algorithm search pays off after the first step
        torch.backends.cudnn.benchmark = True
    use_amp = cfg.amp == "bf16"
    memory_format = torch.channels_last if use_amp and device.type == "cuda" else torch.contiguous_format
    cv2.setNumThreads(1)

    from runtime_py.imageio import check_output_dir, make_output_dir

    out = Path(cfg.out)
    check_output_dir(out, "run folder (--out)")
    last_path = out / "last.pt"
    if resume and not last_path.exists():
        raise UserError(f"--resume: {last_path} does not exist")
    if not resume and last_path.exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    state = None
    if resume:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        saved = TrainConfig(**state["config"])
        # The run's identity (network, data, validation set) comes from its folder. Budgets, intervals,
        # learning rate, batch size and crop size may change on resume (e.g. small crops first, then full size).
        for key in ("variant", "cnum", "seed", "val_photos", "cache_short_side", "max_scale",
                    "val_crops_per_photo", "val_crop", "init"):
            setattr(cfg, key, getattr(saved, key))
    train_paths, val_paths = split_photos(list_photos(Path(cfg.photos)), cfg.val_photos)

    # phases: [{"crop", "batch_size", "lr", "from_step"}, ...], one per change of those settings
    phases = list(state.get("phases", [])) if state is not None else []
    current = {"crop": cfg.crop, "batch_size": cfg.batch_size, "lr": cfg.lr}
    if not phases or any(phases[-1][k] != v for k, v in current.items()):
        phases.append({**current, "from_step": int(state["step"]) if state is not None else 0})
    crops_text = " then ".join(f"{p['crop']}x{p['crop']} from step {p['from_step']}" for p in phases)
    description = (f"GMCNN {cfg.variant} cnum {cfg.cnum} ({cfg.init} init), first-stage (reconstruction-loss) "
                   f"training on {len(train_paths)} photos, crops {crops_text}; held out: {', '.join(cfg.val_photos)}")
    gen = build_generator(cfg.variant, cfg.cnum, seed=cfg.seed, channel_order="rgb",
                          train_size=(cfg.crop, cfg.crop), description=description)
    if cfg.init == "he":
        he_init_(gen, cfg.seed)
    elif cfg.init != "reference":
        raise UserError(f"unknown --init {cfg.init!r}")
    gen = gen.to(device, memory_format=memory_format)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    step, trained_s, best = 0, 0.0, -math.inf
    if state is not None:
        gen.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            group["lr"] = cfg.lr
        step, trained_s, best = int(state["step"]), float(state["trained_s"]), float(state["best"])
    gen.train()

    photos = []
    with tqdm(train_paths, desc="decode", disable=not progress, leave=False) as bar:  # erased, even on an error
        for path in bar:
            photos.append(load_photo(path, cfg.cache_short_side))
    val_photos = [load_photo(p, cfg.cache_short_side) for p in val_paths]
    val_crops, val_masks = validation_set(val_photos, cfg.val_crop, cfg.val_crops_per_photo, cfg.seed, cfg.max_scale)
    # the run folder appears only now, once the photos were found and decoded: a refused run leaves none
    make_output_dir(out, "run folder (--out)")
    atomic_write_text(out / "config.json", json.dumps({**asdict(cfg),
                                                       "train_photos": [p.name for p in train_paths],
                                                       "val_photo_files": [p.name for p in val_paths]}, indent=2))

    loader_threads = resolve_loader_threads(cfg.loader_threads, device)
    batches = BatchStream(photos, cfg.batch_size, cfg.crop, cfg.max_scale, cfg.seed, first_step=step,
                          threads=loader_threads, pin_memory=device.type == "cuda")
    log = (out / "log.jsonl").open("a")

    def record(entry: dict) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def save_last() -> None:
        atomic_torch_save({"model": gen.state_dict(), "optimizer": opt.state_dict(),
                           "step": step, "trained_s": trained_s, "best": best, "config": asdict(cfg),
                           "phases": phases}, last_path)

    def run_validation() -> dict:
        nonlocal best
        scores = validate(gen, val_crops, val_masks, device)
        improved = scores["val_hole_psnr"] > best
        if improved:
            best = scores["val_hole_psnr"]
            gen.meta.extra = {"step": step, "trained_s": round(trained_s, 1), **scores}
            save_checkpoint(gen, out / "best.safetensors")
        entry = {"kind": "val", "step": step, "trained_s": round(trained_s, 1), **scores, "best": improved}
        record(entry)
        return entry

    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    start = time.monotonic()
    last_ckpt = last_val = start
    if state is None or phases[-1]["from_step"] == step:
        record({"kind": "phase", "step": step, **phases[-1]})
    if state is None:
        run_validation()  # the untrained baseline, so the log shows what training bought
    bar = tqdm(total=cfg.max_steps or None, initial=step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    window: List[Tuple[float, float, float]] = []  # (loss, rec, ae) since the last log record
    try:
        while not stop.stop:
            if cfg.max_steps and step >= cfg.max_steps:
                break
            if time.monotonic() - start >= cfg.max_minutes * 60:
                break
            t0 = time.monotonic()
            images, masks = batches.next()
            images = images.to(device, memory_format=memory_format, non_blocking=True)
            masks = masks.to(device, memory_format=memory_format, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                pred = gen(images, masks)
            loss, parts = reconstruction_loss(pred.float(), images, masks)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {float(loss)} at step {step + 1}; lower --lr and --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            trained_s += time.monotonic() - t0
            window.append((float(loss.detach()), parts["rec"], parts["ae"]))
            bar.update(1)
            if step % cfg.log_every == 0:
                mean_loss, mean_rec, mean_ae = (float(v) for v in np.mean(window, axis=0))
                window.clear()
                record({"kind": "train", "step": step, "trained_s": round(trained_s, 1), "loss": mean_loss,
                        "rec": mean_rec, "ae": mean_ae, "lr": cfg.lr})
                bar.set_postfix(loss=f"{mean_loss:.4f}", best_psnr=f"{best:.2f}")
            now = time.monotonic()
            if now - last_val >= cfg.val_every_minutes * 60:
                run_validation()
                last_val = time.monotonic()
            if now - last_ckpt >= cfg.checkpoint_every_minutes * 60:
                save_last()
                last_ckpt = time.monotonic()
        final = run_validation()
        save_last()
    finally:
        batches.close()
        bar.close()
        log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return {"step": step, "trained_s": trained_s, "best_val_hole_psnr": best, "final": final,
            "stopped_by_signal": stop.stop, "out": str(out)}
