"""``gmcnn-mobile`` command line. Subcommands live beside the code they drive and
register themselves here; heavy libraries are imported only when a subcommand runs."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .errors import UserError

# Modules with a ``register(subparsers)`` function, in help order.
COMMAND_MODULES = [
    "models.cli",
    "export.cli",
    "runtime_py.inpaint_cli",
    "benchmarks.cli",
    "runtime_py.golden_cli",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default in --help, except where there is none or the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "(default:" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the tool's error convention: a usage error is one line on stderr, exit 2
    (argparse's own prints the whole usage block first). Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gmcnn-mobile",
        description="Turn a trained GMCNN inpainting generator into phone artifacts, check them, measure them.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that part of the tool is not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"gmcnn-mobile {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gmcnn-mobile {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
