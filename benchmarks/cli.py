"""``gmcnn-mobile bench``: model latency and memory, pipeline cost and quality, written as a report.

Outputs in ``--out``: results.json, latency.csv, pipeline.csv, quality.csv,
quality_summary.csv, report.md and PNG plots (see benchmarks/report.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime_py.cli import (HelpFormatter, choices_list, comma_list, int_at_least, int_list, keyword_or,
                            shape_list)
from runtime_py.contract import IOS
from runtime_py.masks import KINDS, SIZE_CLASSES
from runtime_py.pipeline import MODES, TRISTATE

SECTIONS = ("latency", "pipeline", "quality")


def pipeline_configs(text: str):
    """``MODE:TILES`` pairs (``baseline:auto,two-step:off``; TILES defaults to auto), or ``all``: None."""
    if text.strip() == "all":
        return None
    out = []
    for item in comma_list(text):
        mode, _, tiles = item.partition(":")
        tiles = tiles or "auto"
        if mode not in MODES or tiles not in TRISTATE:
            raise argparse.ArgumentTypeError(f"{item!r} is not MODE:TILES (modes {', '.join(MODES)}; "
                                             f"tiles {', '.join(TRISTATE)})")
        out.append((mode, tiles))
    return out


def register(sub) -> None:
    p = sub.add_parser(
        "bench", formatter_class=HelpFormatter,
        help="benchmark exported artifacts: latency/memory, pipeline cost, quality (JSON, CSV, Markdown, plots)",
        description=__doc__ + "\nEvery latency/memory measurement and every pipeline-cost run is its own process.")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                   help="export directory with manifest.json (from 'gmcnn-mobile export --out DIR')")
    p.add_argument("--photos", type=Path, action="append", default=None, metavar="DIR",
                   help="photo folder or file (repeatable); default: the bundled demo photo and "
                        "../shared/data/photos beside the repository when present")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="small run (< 10 min here on an idle CPU): smallest shape, tensor I/O, 2 timed runs, "
                        "2 threads; pipeline cost of baseline and two-step (whole and tiled) on one photo; "
                        "3 quality cases in baseline mode per precision, plus the classical methods")
    p.add_argument("--threads", type=keyword_or("auto", int_list(1)), default="auto", help="comma-separated thread counts; auto = 1,2 (2 with --quick)")
    p.add_argument("--runs", type=keyword_or("auto", int_at_least(1)), default="auto", help="timed runs per measurement; auto = 10 (2 with --quick)")
    p.add_argument("--warmup", type=keyword_or("auto", int_at_least(0)), default="auto", help="warm-up runs before the timed ones; auto = 2 (1 with --quick)")
    p.add_argument("--sections", type=choices_list(SECTIONS), default=",".join(SECTIONS), help="which parts to run (comma-separated)")
    p.add_argument("--shapes", type=keyword_or("all", shape_list), default="all", help="artifact shapes to time, e.g. 512x680 (all = every shape)")
    p.add_argument("--precisions", type=keyword_or("all", comma_list), default="all", help="artifact precisions to time, e.g. fp32,int8")
    p.add_argument("--io", type=keyword_or("auto", choices_list(IOS)), default="auto", help="I/O signatures to time: tensor,image (auto = both; tensor with --quick)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint for the PyTorch and ONNX Runtime references (default: the manifest's source "
                        "checkpoint, else the shipped default model)")
    p.add_argument("--no-xnnpack-off", action="store_true", help="skip the fp32 TFLite run with XNNPACK turned off")
    p.add_argument("--pipeline-precision", default="fp32", help="TFLite precision the pipeline-cost runs use")
    p.add_argument("--pipeline-configs", type=pipeline_configs, default="all",
                   help="pipeline-cost configurations as MODE:TILES pairs, e.g. baseline:auto,two-step:off "
                        "(all = baseline, shrink, two-step whole and tiled, two-step+shrink)")
    p.add_argument("--pipeline-threads", type=int_at_least(1), default=None, help="threads for pipeline and quality (default: the most of --threads)")
    p.add_argument("--quality-photos", type=keyword_or("all", comma_list), default="all",
                   help="comma-separated file names of the photos quality is scored on (e.g. photos the model "
                        "was not trained on); all = every photo found")
    p.add_argument("--quality-kinds", type=choices_list(KINDS, "all"), default="all", help="mask kinds scored: strokes,blob,rect (all)")
    p.add_argument("--quality-sizes", type=choices_list(SIZE_CLASSES, "all"), default="all", help="hole size classes scored: small,medium,large (all)")
    p.add_argument("--quality-precisions", type=keyword_or("all", comma_list), default="all",
                   help="artifact precisions scored in baseline mode beside the modes' own (all = every one exported)")
    p.add_argument("--quality-per-cell", type=int_at_least(1), default=1, help="quality cases per mask kind x size cell")
    p.add_argument("--quality-modes", type=keyword_or("auto", choices_list(MODES)), default="auto",
                   help="pipeline modes scored: auto = all four (baseline with --quick)")
    p.add_argument("--no-classical", action="store_true",
                   help="leave the classical baselines (OpenCV, PatchMatch) out of the quality section")
    p.add_argument("--no-patchmatch", action="store_true", help="leave PatchMatch out even when pypatchmatch is installed")
    p.add_argument("--sgemm-n", type=int_at_least(1), default=None, help="SGEMM side for the fp32 peak (default 3072, 1024 with --quick)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="MIN",
                   help="start no new measurement after this many minutes (0 = no limit); what was left out is "
                        "listed in the report")
    p.add_argument("--note", action="append", default=None, metavar="TEXT",
                   help="a line for the report's notes (repeatable), e.g. which checkpoint the artifacts came from")
    p.add_argument("--merge", action="store_true",
                   help="keep the sections and rows of an earlier run in --out/results.json that this run does not "
                        "measure again (rows with the same key are replaced); the report covers both")
    p.add_argument("--update-readme", type=Path, nargs="?", const=Path("README.md"), default=None, metavar="README",
                   help="also rewrite the benchmark section of README between <!-- bench:start --> and <!-- bench:end -->")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .run import BenchConfig, run_bench

    cfg = BenchConfig.from_args(args)
    files = run_bench(cfg)
    print(f"wrote {len(files)} files to {cfg.out}: " + ", ".join(sorted(p.name for p in files.values())))
    return 0
