"""``gmcnn-mobile train``, ``evaluate`` and ``pack-photos``: argument parsing only (no torch import here).

The trainer is :mod:`models.train`, its configuration :mod:`models.train_config`, the evaluation
:mod:`models.evaluate`, the photo split and packing :mod:`models.dataset`.
"""
from __future__ import annotations

import json
from pathlib import Path

from runtime_py.cli import HelpFormatter, int_at_least, shape

from .dataset import DEFAULT_MARGIN, DEVICE_TREE_LIMIT, HELD_OUT, VALIDATION
from .train_config import TrainConfig

DESCRIPTION = ("First-stage GMCNN training: confidence-weighted L1 on the hole + L1 on the known region, Adam; "
               "random crops at random scales and whole photos at a model shape, seeded free-form/rectangle/blob "
               "masks up to --max-hole of the image, validation photos set aside by name.")


def register(sub) -> None:

    d = TrainConfig(photos="", out="")
    p = sub.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train a GMCNN generator (first stage: reconstruction losses) on a folder of photos",
        description=DESCRIPTION + "\n\nStop it any time (Ctrl-C / SIGTERM saves); --resume continues "
                    "the same sample stream. The best checkpoint (best validation hole PSNR among well-conditioned "
                    "ones) is RUN_DIR/best.safetensors; RUN_DIR/log.jsonl ends with a timing record "
                    "(steps per second, share of wall time in steps).")
    p.add_argument("--photos", type=Path, required=True,
                   help="flat folder of photos (jpg/png), e.g. one written by 'gmcnn-mobile pack-photos'")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log.jsonl, config.json)")
    p.add_argument("--variant", choices=["tf", "torch"], default=d.variant, help="GMCNN variant (ignored with --init-from)")
    p.add_argument("--cnum", type=int, default=d.cnum, help="base channel width (ignored with --init-from)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint's weights (e.g. the shipped model or weights a GPU machine "
                        "handed back); the step count continues from the checkpoint's")
    p.add_argument("--reinit", nargs="+", default=d.reinit, choices=["b1", "b2", "b3"], metavar="BRANCH",
                   help="He re-initialise these branches (b1, b2, b3) of the starting weights without changing the "
                        "output (their merge weights start at zero): revives a dead branch")
    p.add_argument("--crop", type=int, default=d.crop,
                   help="training crop side in pixels (multiple of 4); may change on --resume (a new phase)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step")
    p.add_argument("--whole-fraction", type=float, default=d.whole_fraction,
                   help="share of steps that train on whole photos at --whole-size instead of crops")
    p.add_argument("--whole-size", type=shape, default=d.whole_size, metavar="ROWSxCOLS",
                   help="size whole photos are resized to (a random 60-100 %% window of the photo's aspect)")
    p.add_argument("--whole-batch-size", type=int, default=d.whole_batch_size, help="whole photos per step")
    p.add_argument("--max-hole", type=float, default=d.max_hole, help="largest hole, as a fraction of the image")
    p.add_argument("--hole-start", type=float, default=d.hole_start,
                   help="largest hole at the start of the phase, growing to --max-hole over --hole-ramp-steps")
    p.add_argument("--hole-ramp-steps", type=int, default=d.hole_ramp_steps,
                   help="steps of the hole curriculum (0 = --max-hole from the start)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (betas 0.5, 0.9 as the reference)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up from the step the optimiser state was created (0 = none)")
    p.add_argument("--lr-decay-minutes", type=float, default=d.lr_decay_minutes,
                   help="cosine learning-rate decay over the last minutes of --max-minutes, to --lr x "
                        "--lr-final-fraction at the end (0 = constant rate)")
    p.add_argument("--lr-final-fraction", type=float, default=d.lr_final_fraction,
                   help="the learning rate at the end of --lr-decay-minutes, as a fraction of --lr")
    p.add_argument("--clip-grad-norm", type=float, default=d.clip_grad_norm,
                   help="clip the gradient's global L2 norm to this (0 = no clipping; the log shows the norm)")
    p.add_argument("--activation-penalty", type=float, default=d.activation_penalty,
                   help="weight of the penalty on convolution outputs beyond --activation-limit (0 = off)")
    p.add_argument("--activation-limit", type=float, default=d.activation_limit,
                   help="|output| above which the activation penalty applies")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="wall-clock budget of this invocation, set-up and validation included")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop at this total step count (0 = no limit)")
    p.add_argument("--val-photos", nargs="+", default=None, metavar="NAME",
                   help="file names in --photos set aside for validation (default: the 10 of the model card, "
                        "models.dataset.VALIDATION)")
    p.add_argument("--exclude-photos", nargs="*", default=None, metavar="NAME",
                   help="file names in --photos never read, the held-out evaluation photos (default: "
                        f"{' '.join(d.exclude_photos)})")
    p.add_argument("--val-size", type=shape, default=d.val_size, metavar="ROWSxCOLS",
                   help="size of the validation photos' whole views")
    p.add_argument("--val-masks-per-photo", type=int, default=d.val_masks_per_photo,
                   help="fixed validation masks per validation photo (kinds and size classes cycled)")
    p.add_argument("--peak-samples", type=Path, default=None,
                   help=".npz of samples (models.conditioning.save_samples) whose peak activation every "
                        "validation also measures, e.g. the export's held-out photos at 1024x1360")
    p.add_argument("--val-every-minutes", type=float, default=d.val_every_minutes, help="validation interval")
    p.add_argument("--checkpoint-every-minutes", type=float, default=d.checkpoint_every_minutes,
                   help="interval of the resumable RUN_DIR/last.pt")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps per training log record (the device is waited for only then)")
    p.add_argument("--cache-short-side", type=int, default=d.cache_short_side,
                   help="photos are decoded once and kept in memory downscaled to this short side")
    p.add_argument("--max-scale", type=float, default=d.max_scale,
                   help="crops cover crop..crop*max-scale pixels of the cached photo before resizing")
    p.add_argument("--init", choices=["reference", "he"], default=d.init,
                   help="weight init without --init-from: reference N(0, 0.02), or He N(0, 2/fan_in)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial weights, crops and masks")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device, help="auto = cuda when available")
    p.add_argument("--threads", type=int_at_least(1), default=d.threads, help="torch CPU threads")
    p.add_argument("--loader-threads", type=int, default=d.loader_threads,
                   help="threads drawing batches ahead of the training step; -1 = automatic (0 on a CPU, "
                        "where the cores train; up to 8 beside a GPU); the sample stream is the same for any value")
    p.add_argument("--amp", choices=["off", "bf16"], default=d.amp,
                   help="bf16 autocast for the generator's forward/backward (losses and weights stay float32); "
                        "on CUDA also channels-last convolutions; meant for GPUs, slow on CPUs without bf16 units")
    p.add_argument("--compile", choices=["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   default=d.compile,
                   help="torch.compile the generator for training steps (validation stays eager); its compile "
                        "time is booked as warm-up in the log; if compiling fails the run goes on eagerly")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    cfg = TrainConfig(
        photos=str(args.photos), out=str(args.out), variant=args.variant, cnum=args.cnum, crop=args.crop,
        batch_size=args.batch_size, whole_fraction=args.whole_fraction, whole_size=args.whole_size,
        whole_batch_size=args.whole_batch_size, max_hole=args.max_hole, hole_start=args.hole_start,
        hole_ramp_steps=args.hole_ramp_steps, lr=args.lr, warmup_steps=args.warmup_steps,
        lr_decay_minutes=args.lr_decay_minutes, lr_final_fraction=args.lr_final_fraction,
        clip_grad_norm=args.clip_grad_norm, activation_penalty=args.activation_penalty,
        activation_limit=args.activation_limit, max_minutes=args.max_minutes, max_steps=args.max_steps,
        val_photos=list(VALIDATION if args.val_photos is None else args.val_photos),
        exclude_photos=list(HELD_OUT if args.exclude_photos is None else args.exclude_photos), val_size=args.val_size,
        val_masks_per_photo=args.val_masks_per_photo,
        peak_samples=str(args.peak_samples) if args.peak_samples else None, init=args.init,
        init_from=str(args.init_from) if args.init_from else None, reinit=list(args.reinit),
        val_every_minutes=args.val_every_minutes, checkpoint_every_minutes=args.checkpoint_every_minutes,
        log_every=args.log_every, cache_short_side=args.cache_short_side, max_scale=args.max_scale, seed=args.seed,
        device=args.device, threads=args.threads, amp=args.amp, compile=args.compile,
        loader_threads=args.loader_threads)
    from .train import train

    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def register_evaluate(sub) -> None:

    from runtime_py.pipeline import MODES

    from .evaluate import KINDS, SIZE_CLASSES

    p = sub.add_parser(
        "evaluate", formatter_class=HelpFormatter,
        help="hole PSNR/SSIM of a checkpoint vs OpenCV Telea through the runtime's pipeline, per mask kind",
        description="Each photo is centre-cropped to the aspect of --size and resized to it; every mask kind x "
                    "size class (runtime_py.masks.make_mask, the benchmark's kinds and size classes, seeded) is "
                    "filled by the runtime's own pipeline on the torch engine (--mode, default baseline) and by "
                    "cv2 INPAINT_TELEA (radius 5); both are scored over the hole against the original. Prints a "
                    "Markdown table per mask kind and whether the model beats Telea (mean hole PSNR and SSIM, "
                    "and on at least two of the three kinds).")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to score (default: the shipped model)")
    p.add_argument("--data", type=Path, required=True,
                   help="the shared data folder (train/<group>/*, photos/*) or a flat photo folder")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="photos to evaluate on (flat names, as the model card lists them; default: the held-out "
                        "pair and the 10 validation photos)")
    p.add_argument("--size", type=shape, default="512x680", metavar="ROWSxCOLS",
                   help="evaluation size (the pipeline's model shape)")
    p.add_argument("--mode", default="baseline", choices=MODES, help="pipeline mode")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS), help="mask kinds")
    p.add_argument("--size-classes", nargs="+", default=list(SIZE_CLASSES), choices=list(SIZE_CLASSES),
                   help="mask size classes")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write every case and the summary as JSON here")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from .evaluate import cmd_evaluate

    return cmd_evaluate(args)


def register_pack(sub) -> None:

    p = sub.add_parser(
        "pack-photos", formatter_class=HelpFormatter,
        help="write the compact copy of the training and validation photos that travels to a GPU machine",
        description="Every photo of --data except the held-out ones, orientation applied, long side at most "
                    "--long-side, re-encoded as JPEG at the highest quality (90, 85, ... 60) whose total fits what "
                    "the device tool's 64 MiB leaves beside the working tree (git's tracked and untracked, "
                    "not ignored files) and --margin-mib. Writes OUT/*.jpg and OUT/split.json.")
    p.add_argument("--data", type=Path, required=True, help="the shared data folder (train/<group>/*, photos/*)")
    p.add_argument("--out", type=Path, default=Path(".devdata/photos"),
                   help="output folder (ignored by git; carried to the device machine)")
    p.add_argument("--long-side", type=int, default=1024, help="longest side of a packed photo in pixels")
    p.add_argument("--limit-mib", type=float, default=DEVICE_TREE_LIMIT / 2**20,
                   help="what the device tool carries in all")
    p.add_argument("--margin-mib", type=float, default=DEFAULT_MARGIN / 2**20,
                   help="kept free of the limit (the tree may grow before the call)")
    p.add_argument("--tree-mib", type=float, default=None,
                   help="size of the travelling working tree (default: measured with git in the current directory)")
    p.set_defaults(func=_cmd_pack)


def _cmd_pack(args) -> int:
    from .dataset import pack, packing_budget

    tree = None if args.tree_mib is None else int(args.tree_mib * 2**20)
    budget = packing_budget(Path.cwd(), int(args.limit_mib * 2**20), int(args.margin_mib * 2**20), tree)
    report = pack(args.data, args.out, budget, long_side=args.long_side)
    print(f"packed {report.photos} photos ({len(report.validation)} for validation; held out and left behind: "
          f"{', '.join(HELD_OUT)}) into {report.out}: {report.data_bytes / 2**20:.1f} MiB at JPEG quality "
          f"{report.quality}, long side <= {report.long_side} px ({report.packed_pixels / 1e6:.1f} of "
          f"{report.source_pixels / 1e6:.1f} megapixels kept, {report.pixel_share:.0%}); "
          f"{budget / 2**20:.1f} MiB were available")
    return 0
