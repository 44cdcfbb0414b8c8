"""``gmcnn-mobile``: the root command line. Each part registers its own subcommands (a
``register(subparsers)`` function beside the code it drives); heavy libraries are imported only when a
subcommand runs. The parser class, help formatter and shared argument types are
:mod:`runtime_py.cli`'s."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import benchmarks.cli
import export.cli
import models.cli
import runtime_py.golden_cli
import runtime_py.inpaint_cli
from runtime_py.cli import HelpFormatter, Parser, run
from runtime_py.memory import avoid_numpy_huge_pages

PROG = "gmcnn-mobile"
#: The parts' subcommand modules, in help order.
COMMAND_MODULES = (models.cli, export.cli, runtime_py.inpaint_cli, benchmarks.cli, runtime_py.golden_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Turn a trained GMCNN inpainting generator into phone artifacts, check them, measure them.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    # the export's fallback prices its files with the benchmarks' one-process-per-file measurement
    # (export itself never starts a benchmark process)
    parser.set_defaults(measure_file=_measure_file)
    return parser


def _measure_file(path, threads: int, runs: int, warmup: int = 1) -> dict:
    from benchmarks.measure import measure_file

    return measure_file(path, threads, runs, warmup)


def main(argv: Optional[List[str]] = None) -> int:
    avoid_numpy_huge_pages()  # the command's processes and those it starts (docs/EXPORT.md, "Page faults")
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
