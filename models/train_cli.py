"""``gmcnn-mobile train``: argument parsing and the run configuration (no torch import here).

The trainer itself is :mod:`models.train`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List


@dataclass
class TrainConfig:
    photos: str
    out: str
    variant: str = "tf"
    cnum: int = 32
    crop: int = 256
    batch_size: int = 1
    lr: float = 2e-4
    max_minutes: float = 60.0
    max_steps: int = 0
    val_photos: List[str] = field(default_factory=lambda: ["Kite.jpg", "Path.jpg"])
    val_crops_per_photo: int = 4
    val_crop: int = 256
    init: str = "reference"
    val_every_minutes: float = 10.0
    checkpoint_every_minutes: float = 3.0
    log_every: int = 10
    cache_short_side: int = 768
    max_scale: float = 3.0
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    amp: str = "off"
    loader_threads: int = -1


DESCRIPTION = ("First-stage GMCNN training: confidence-weighted L1 on the hole + L1 on the known region, Adam; "
               "random crops at random scales, seeded free-form/rectangle/blob masks, held-out validation photos.")


def register(sub) -> None:
    from runtime_py.cli import HelpFormatter

    d = TrainConfig(photos="", out="")
    p = sub.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train a GMCNN generator (first stage: reconstruction losses) on a folder of photos",
        description=DESCRIPTION + "\n\nStop it any time (Ctrl-C / SIGTERM saves); --resume continues "
                    "the same sample stream. The best checkpoint by validation hole-PSNR is RUN_DIR/best.safetensors.")
    p.add_argument("--photos", type=Path, required=True, help="folder of training photos (jpg/png)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log.jsonl, config.json)")
    p.add_argument("--variant", choices=["tf", "torch"], default=d.variant, help="GMCNN variant")
    p.add_argument("--cnum", type=int, default=d.cnum, help="base channel width")
    p.add_argument("--crop", type=int, default=d.crop,
                   help="training crop side in pixels (multiple of 4); may change on --resume (a new phase)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (betas 0.5, 0.9 as the reference)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="wall-clock budget of this invocation (a resumed run gets a fresh budget)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop at this total step count (0 = no limit)")
    p.add_argument("--val-photos", nargs="+", default=d.val_photos, metavar="NAME",
                   help="file names in --photos held out for validation")
    p.add_argument("--val-crops-per-photo", type=int, default=d.val_crops_per_photo,
                   help="fixed validation crops per held-out photo")
    p.add_argument("--val-crop", type=int, default=d.val_crop, help="side of the fixed validation crops")
    p.add_argument("--val-every-minutes", type=float, default=d.val_every_minutes, help="validation interval")
    p.add_argument("--checkpoint-every-minutes", type=float, default=d.checkpoint_every_minutes,
                   help="interval of the resumable RUN_DIR/last.pt")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps per training log record")
    p.add_argument("--cache-short-side", type=int, default=d.cache_short_side,
                   help="photos are decoded once and kept in memory downscaled to this short side")
    p.add_argument("--max-scale", type=float, default=d.max_scale,
                   help="crops cover crop..crop*max-scale pixels of the cached photo before resizing")
    p.add_argument("--init", choices=["reference", "he"], default=d.init,
                   help="weight init: reference N(0, 0.02), or He N(0, 2/fan_in) (learns faster in short runs)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial weights, crops and masks")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device, help="auto = cuda when available")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--loader-threads", type=int, default=d.loader_threads,
                   help="threads drawing batches ahead of the training step; -1 = automatic (0 on a CPU, "
                        "where the cores train; up to 8 beside a GPU); the sample stream is the same for any value")
    p.add_argument("--amp", choices=["off", "bf16"], default=d.amp,
                   help="bf16 autocast for the generator's forward/backward (losses and weights stay float32); "
                        "on CUDA also channels-last convolutions; meant for GPUs, slow on CPUs without bf16 units")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    cfg = TrainConfig(photos=str(args.photos), out=str(args.out), variant=args.variant, cnum=args.cnum,
                      crop=args.crop, batch_size=args.batch_size, lr=args.lr, max_minutes=args.max_minutes,
                      max_steps=args.max_steps, val_photos=list(args.val_photos),
                      val_crops_per_photo=args.val_crops_per_photo, val_crop=args.val_crop,
                      val_every_minutes=args.val_every_minutes,
                      checkpoint_every_minutes=args.checkpoint_every_minutes, log_every=args.log_every,
                      cache_short_side=args.cache_short_side, max_scale=args.max_scale, seed=args.seed, init=args.init,
                      device=args.device, threads=args.threads, amp=args.amp,
                      loader_threads=args.loader_threads)
    from .train import train

    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def register_evaluate(sub) -> None:
    from runtime_py.cli import HelpFormatter

    p = sub.add_parser(
        "evaluate", formatter_class=HelpFormatter,
        help="hole PSNR/SSIM of a checkpoint vs OpenCV Telea on held-out photos with seeded masks",
        description="Each photo is centre-cropped and resized to every --sizes entry; each seeded mask "
                    "(kind x size class) is filled by the model (composited) and by cv2 INPAINT_TELEA (radius 5); "
                    "both are scored over the hole against the original. Prints a Markdown table.")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to score (default: the shipped model)")
    p.add_argument("--photos", type=Path, required=True, help="photo folder")
    p.add_argument("--names", nargs="+", default=["Kite.jpg", "Path.jpg"], metavar="NAME",
                   help="photos to evaluate on (use the held-out ones)")
    p.add_argument("--sizes", nargs="+", default=["256x256", "512x680"], metavar="HxW", help="evaluation sizes")
    p.add_argument("--kinds", nargs="+", default=["strokes", "rect", "blob"], choices=["strokes", "rect", "blob"],
                   help="mask kinds")
    p.add_argument("--size-classes", nargs="+", default=["small", "medium", "large"],
                   choices=["small", "medium", "large"], help="mask size classes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write every case and the summary as JSON here")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from .evaluate import cmd_evaluate

    return cmd_evaluate(args)
