"""One measurement in a fresh process: ``python -m benchmarks.worker SPEC.json RESULT.json``.

Running each configuration in its own process keeps its memory readings clean:
the resident set is read after the engine's library is imported (``rss_start``),
after the model is loaded and its buffers allocated (``rss_after_init``, the
loaded-but-idle engine), after the first inference (``rss_after_first``), and the
process's peak (``getrusage`` ``ru_maxrss``) at the end. Warm-up runs are timed
but reported apart from the timed runs.

SPEC keys: ``kind`` (tflite | torch | onnxruntime | sgemm | pipeline), ``threads``,
``warmup``, ``runs`` and per kind: ``path`` (model file), ``xnnpack`` (tflite),
``shape`` ([rows, cols]; torch/onnxruntime), ``n`` (sgemm matrix side). Models run through
the runtime's engines (``runtime_py.engines``), the same runners every other part uses.
Thread pools are pinned by the parent through OMP/OPENBLAS/MKL_NUM_THREADS too.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np

from runtime_py.contract import denormalize, layout_of, mask_pixels
from runtime_py.memory import peak_rss_bytes, rss_bytes

from .stats import summarize


def synthetic_pair(height: int, width: int, seed: int = 0):
    """A reproducible photo-like image and a rectangular hole at (height, width).

    Returns image (H, W, 3) float32 RGB in [-1, 1] (smooth gradients plus noise)
    and mask (H, W) float32 {0, 1}, 1 = hole (the centre 1/4 of the area).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), 0.5 * np.ones_like(xx)], axis=-1)
    image = np.clip(base * 2 - 1 + rng.normal(0, 0.1, base.shape), -1, 1).astype(np.float32)
    mask = np.zeros((height, width), np.float32)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
    return image, mask


def synthetic_feed(engine) -> Dict[str, np.ndarray]:
    """Inputs for any model an engine declares (any layout): the 1-channel input is the mask, the
    3-channel one the image, 4 / 5 channels a network-input signature ([masked, mask] / [masked, ones,
    mask]), anything else uniform noise; uint8 inputs get pixel values (mask 255 = hole), int8 ones
    their own quantization."""
    feed = {}
    for s in engine.input_specs():
        nhwc = layout_of(s.shape) == "NHWC"
        h, w, c = (s.shape[1], s.shape[2], s.shape[3]) if nhwc else (s.shape[2], s.shape[3], s.shape[1])
        image, mask = synthetic_pair(h, w)
        masked = image * (1 - mask[..., None])
        arr = {1: mask[..., None], 3: image, 4: np.dstack([masked, mask]),
               5: np.dstack([masked, np.ones_like(mask), mask])}.get(c)
        if arr is None:
            arr = np.random.default_rng(0).uniform(-1, 1, (h, w, c)).astype(np.float32)
        if s.dtype == "uint8":
            arr = np.round(mask_pixels(mask > 0)[..., None] if c == 1 else denormalize(image)).astype(np.uint8)
        elif s.dtype == "int8":
            scale, zero = s.quantization or (1.0, 0)
            arr = np.clip(np.round(arr / (scale or 1.0) + zero), -128, 127).astype(np.int8)
        arr = arr if nhwc else arr.transpose(2, 0, 1)
        feed[s.name] = np.ascontiguousarray(arr[None].astype(s.dtype))
    return feed


#: The runtime each kind of measurement imports before its first memory reading.
RUNTIMES = {"tflite": "ai_edge_litert.interpreter", "torch": "torch", "onnxruntime": "onnxruntime"}


def make_engine(spec: dict):
    """The runtime_py engine that runs ``spec``'s model, not yet activated."""
    threads = int(spec["threads"])
    if spec["kind"] == "tflite":
        from runtime_py.engines.tflite_engine import TFLiteEngine

        return TFLiteEngine(spec["path"], threads=threads, xnnpack=spec.get("xnnpack", True))
    if spec["kind"] == "torch":
        import torch

        from runtime_py.engines.torch_engine import TorchEngine

        torch.set_num_interop_threads(1)
        return TorchEngine(tuple(spec["shape"]), checkpoint=spec["path"], threads=threads)
    if spec["kind"] == "onnxruntime":
        from runtime_py.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec["path"], shape=tuple(spec["shape"]), threads=threads)
    raise ValueError(f"unknown measurement kind {spec['kind']!r}")


def runtime_facts(engine) -> dict:
    """What the report shows beside the times: the delegate's partitioning (TFLite), the runtime's version."""
    if engine.name == "tflite":
        return {"delegation": engine.delegation()}
    import importlib

    return {engine.name: importlib.import_module(engine.name).__version__}


def measure_model(spec: dict) -> dict:
    """Load, first inference (checked: feed against the model's inputs, output finite), warm-up and timed
    runs of one model through its engine; the timed runs skip the runner's checks, as the app would."""
    import importlib

    importlib.import_module(RUNTIMES[spec["kind"]])
    engine = make_engine(spec)
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    engine.activate()
    init_s = time.perf_counter() - t0
    rss_after_init = rss_bytes()
    feed = synthetic_feed(engine)
    t0 = time.perf_counter()
    out = next(iter(engine.infer(feed).values()))
    first_s = time.perf_counter() - t0
    rss_after_first = rss_bytes()
    warm = []
    for _ in range(int(spec.get("warmup", 1))):
        t0 = time.perf_counter()
        engine.infer(feed, check=False)
        warm.append(time.perf_counter() - t0)
    runs = []
    for _ in range(int(spec.get("runs", 3))):
        t0 = time.perf_counter()
        engine.infer(feed, check=False)
        runs.append(time.perf_counter() - t0)
    # runs 0: the first inference is the one timed (a file on LiteRT's reference kernels takes minutes per
    # inference, where a load's one-time costs are lost in the noise)
    runs = runs or [first_s]
    peak = peak_rss_bytes()
    out = np.asarray(out)
    return {
        "init_s": init_s,
        "first_s": first_s,
        "warmup_s": warm,
        "runs_s": runs,
        "stats": summarize(runs),
        "rss_start": rss_start,
        "rss_after_init": rss_after_init,
        "rss_after_first": rss_after_first,
        "peak_rss": peak,
        # what running the model adds over the loaded-but-idle engine
        "peak_added_over_idle": peak - rss_after_init,
        "output_shape": list(out.shape),
        "output_finite": bool(np.isfinite(out.astype(np.float32)).all()),
        **runtime_facts(engine),
    }


def measure_sgemm(spec: dict) -> dict:
    """fp32 peak proxy: best time of an n x n x n float32 matmul (numpy/OpenBLAS, threads pinned by env)."""
    n = int(spec.get("n", 2048))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    for _ in range(int(spec.get("warmup", 1))):
        np.matmul(a, b, out=c)
    runs = []
    for _ in range(int(spec.get("runs", 3))):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        runs.append(time.perf_counter() - t0)
    best = min(runs)
    return {"n": n, "runs_s": runs, "stats": summarize(runs), "gmac_per_s": n ** 3 / best / 1e9,
            "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"), "openblas_kernels": openblas_kernels()}


def openblas_kernels():
    """The kernel family numpy's OpenBLAS runs (``openblas_get_corename``: e.g. Haswell, Zen, SkylakeX;
    OPENBLAS_CORETYPE overrides its detection), or None when numpy links no OpenBLAS."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libs = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for lib in libs:
        handle = ctypes.CDLL(lib)
        for symbol in ("openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(handle, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def run_spec(spec: dict) -> dict:
    kind = spec["kind"]
    if kind == "sgemm":
        return measure_sgemm(spec)
    if kind == "pipeline":
        from .pipeline_cost import measure_pipeline

        return measure_pipeline(spec)
    return measure_model(spec)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    # load average of the shared machine around the measurement: other jobs inflate the timings
    result = {"spec": spec, "pid": os.getpid(), "load_avg_before": os.getloadavg()[0]}
    try:
        result.update(run_spec(spec))
        result["ok"] = True
        result["load_avg_after"] = os.getloadavg()[0]
    except Exception as exc:  # the parent reports it and goes on with the next measurement
        import traceback

        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, result_path)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
