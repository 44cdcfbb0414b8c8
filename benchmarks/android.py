"""The Android ``benchmark_model`` command line equivalent to one measured configuration.

``benchmark_model`` is the LiteRT/TFLite benchmark binary for Android
(``adb push`` it with the artifact to /data/local/tmp). Flags as documented for
the tool: --graph, --num_threads, --warmup_runs, --num_runs, --use_xnnpack,
--report_peak_memory_footprint, --enable_op_profiling.
"""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import List

DEVICE_DIR = "/data/local/tmp"


def benchmark_model_args(artifact_file: str, threads: int, warmup: int, runs: int,
                         xnnpack: bool = True, op_profiling: bool = False) -> List[str]:
    graph = str(PurePosixPath(DEVICE_DIR) / PurePosixPath(artifact_file).name)
    args = [
        f"{DEVICE_DIR}/benchmark_model",
        f"--graph={graph}",
        f"--num_threads={int(threads)}",
        f"--warmup_runs={int(warmup)}",
        f"--num_runs={int(runs)}",
        f"--use_xnnpack={'true' if xnnpack else 'false'}",
        "--report_peak_memory_footprint=true",
    ]
    if op_profiling:
        args.append("--enable_op_profiling=true")
    return args


def benchmark_model_command(artifact_file: str, threads: int, warmup: int, runs: int,
                            xnnpack: bool = True, op_profiling: bool = False) -> str:
    """``adb push`` of the artifact plus the ``adb shell benchmark_model ...`` line, as one shell snippet."""
    name = PurePosixPath(artifact_file).name
    run = " ".join(benchmark_model_args(artifact_file, threads, warmup, runs, xnnpack, op_profiling))
    return f"adb push {name} {DEVICE_DIR}/ && adb shell {run}"
