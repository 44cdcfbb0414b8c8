"""Model subcommands: init-checkpoint, convert-checkpoint, inspect, train, evaluate, pack-photos."""
from __future__ import annotations

import json
from pathlib import Path

INSPECT_SHAPES = ((512, 680), (1024, 1360))


def _formatter():
    from runtime_py.cli import HelpFormatter

    class Formatter(HelpFormatter):
        """Shows defaults, except ``None`` ones, whose help text says what happens instead."""

        def _get_help_string(self, action):
            if action.default is None:
                return action.help
            return super()._get_help_string(action)

    return Formatter


def register(sub) -> None:
    formatter = _formatter()

    p = sub.add_parser("init-checkpoint", help="write a randomly initialised checkpoint (tests, smoke runs)",
                       formatter_class=formatter)
    p.add_argument("out", type=Path, help="output .safetensors path")
    p.add_argument("--variant", choices=["tf", "torch"], default="tf", help="GMCNN variant")
    p.add_argument("--cnum", type=int, default=32, help="base channel width (32 = the published models)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initialisation")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored weight dtype")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("convert-checkpoint", help="convert an official TF checkpoint or PyTorch .pth to the project format",
                       formatter_class=formatter)
    p.add_argument("src", type=Path, help="TF checkpoint directory or prefix (snap-0), or a .pth generator state dict")
    p.add_argument("out", type=Path, help="output .safetensors path")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored weight dtype")
    p.add_argument("--description", default=None,
                   help="replace the description metadata (default: keep the source's)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="print a checkpoint's variant, width, parameter count and GMACs",
                       formatter_class=formatter)
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help="checkpoint to inspect (default: the shipped default model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    from .train_cli import register as register_train, register_evaluate, register_pack

    register_train(sub)
    register_evaluate(sub)
    register_pack(sub)


def _check_output(out: Path) -> None:
    from runtime_py.errors import UserError

    from runtime_py.imageio import check_output_file

    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the project format is a .safetensors file")
    check_output_file(out, "output checkpoint", parents=True)


def _write(action, out: Path):
    """Run a checkpoint-writing ``action``; file-system failures become one-line user errors."""
    from runtime_py.errors import UserError

    try:
        return action()
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None


def cmd_init(args) -> int:
    from runtime_py.errors import UserError

    from .checkpoint import save_checkpoint
    from .gmcnn import build_generator

    _check_output(args.out)
    try:
        gen = build_generator(args.variant, args.cnum, seed=args.seed,
                              description=f"random initialisation, seed {args.seed}: fills holes with noise")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _write(lambda: save_checkpoint(gen, args.out, dtype=args.dtype), args.out)
    print(f"wrote {args.out} ({args.variant}, cnum {args.cnum}, seed {args.seed})")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import convert_checkpoint

    _check_output(args.out)
    if args.out.resolve() == args.src.resolve():
        from runtime_py.errors import UserError

        raise UserError("output path equals the source checkpoint; choose another")
    out = _write(lambda: convert_checkpoint(args.src, args.out, dtype=args.dtype, description=args.description),
                 args.out)
    print(f"wrote {out}")
    return 0


def describe(path=None) -> dict:
    """Facts about a checkpoint as a JSON-able dict."""
    from . import default_checkpoint, load_generator
    from .checkpoint import sha256_path
    from .gmcnn import count_macs, count_parameters

    gen = load_generator(path)  # None: the default model, with its own error when missing
    p = Path(path) if path is not None else default_checkpoint()
    return {
        "checkpoint": str(p),
        "sha256": sha256_path(p),
        "meta": gen.meta.to_dict(),
        "parameters": count_parameters(gen),
        "gmacs": {f"{h}x{w}": round(count_macs(gen, h, w) / 1e9, 3) for h, w in INSPECT_SHAPES},
    }


def cmd_inspect(args) -> int:
    info = describe(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    meta = info["meta"]
    print(f"checkpoint   {info['checkpoint']}")
    print(f"sha256       {info['sha256']}")
    print(f"variant      {meta['variant']}  (cnum {meta['cnum']}, channel order {meta['channel_order']}, "
          f"training size {meta['train_size'][0]}x{meta['train_size'][1]})")
    if meta.get("description"):
        print(f"description  {meta['description']}")
    print(f"parameters   {info['parameters']:,}")
    for shape, g in info["gmacs"].items():
        print(f"GMAC @ {shape:<10}{g:,.1f}")
    return 0

