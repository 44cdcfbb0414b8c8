"""One measurement in a fresh process: ``python -m benchmarks.worker SPEC.json RESULT.json``.

Running each configuration in its own process keeps its memory readings clean:
the resident set is read after the engine's library is imported (``rss_start``),
after the model is loaded and its buffers allocated (``rss_after_init``, the
loaded-but-idle engine), after the first inference (``rss_after_first``), and the
process's peak (``getrusage`` ``ru_maxrss``) at the end. Warm-up runs are timed
but reported apart from the timed runs.

SPEC keys: ``kind`` (tflite | torch | onnxruntime | sgemm | pipeline), ``threads``,
``warmup``, ``runs`` and per kind: ``path`` (model file), ``xnnpack`` (tflite),
``shape`` ([rows, cols]; torch/onnxruntime), ``n`` (sgemm matrix side).
Thread pools are pinned by the parent through OMP/OPENBLAS/MKL_NUM_THREADS too.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

from .stats import peak_rss_bytes, rss_bytes, summarize


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


def _tflite_feed(details: List[dict]) -> Dict[int, np.ndarray]:
    """Inputs for any TFLite signature: the 1-channel input is the mask, the 3-channel one the image."""
    feed = {}
    for d in details:
        shape = [int(s) for s in d["shape"]]
        h, w, c = shape[1], shape[2], shape[3]
        image, mask = synthetic_pair(h, w)
        masked = image * (1 - mask[..., None])
        # 1 = mask, 3 = image; 4 / 5 = a network-input signature ([masked, mask] / [masked, ones, mask])
        arr = {1: mask[..., None], 3: image, 4: np.dstack([masked, mask]),
               5: np.dstack([masked, np.ones_like(mask), mask])}.get(c)
        if arr is None:
            arr = np.random.default_rng(0).uniform(-1, 1, (h, w, c)).astype(np.float32)
        if d["dtype"] == np.uint8:
            arr = (mask[..., None] * 255) if c == 1 else (image + 1) * 127.5
            arr = np.round(arr).astype(np.uint8)
        elif d["dtype"] == np.int8:
            scale, zero = d["quantization"]
            arr = np.clip(np.round(arr / (scale or 1.0) + zero), -128, 127).astype(np.int8)
        feed[d["index"]] = np.ascontiguousarray(arr[None].astype(d["dtype"]))
    return feed


def _load_tflite(spec):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from .xnnpack import delegation_summary

    def load():
        resolver = OpResolverType.AUTO if spec.get("xnnpack", True) else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interp = Interpreter(model_path=spec["path"], num_threads=int(spec["threads"]),
                             experimental_op_resolver_type=resolver)
        interp.allocate_tensors()
        return interp

    def prepare(interp):
        feed = _tflite_feed(interp.get_input_details())
        out_index = interp.get_output_details()[0]["index"]

        def infer():
            for index, value in feed.items():
                interp.set_tensor(index, value)
            interp.invoke()
            return interp.get_tensor(out_index)

        return infer

    def describe(interp):
        return {"delegation": delegation_summary(interp._get_ops_details())}

    return load, prepare, describe


def _load_torch(spec):
    import torch

    torch.set_num_threads(int(spec["threads"]))
    torch.set_num_interop_threads(1)
    from models import load_generator

    h, w = spec["shape"]

    def load():
        return load_generator(spec["path"]).eval()

    def prepare(gen):
        image, mask = synthetic_pair(h, w)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
        m = torch.from_numpy(mask)[None, None].contiguous()

        def infer():
            with torch.inference_mode():
                return gen(x, m)

        return infer

    return load, prepare, lambda gen: {"torch": torch.__version__}


def _load_onnxruntime(spec):
    import onnxruntime as ort

    h, w = spec["shape"]

    def load():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(spec["threads"])
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return ort.InferenceSession(spec["path"], sess_options=opts, providers=["CPUExecutionProvider"])

    def prepare(sess):
        image, mask = synthetic_pair(h, w)
        by_channels = {3: image.transpose(2, 0, 1)[None], 1: mask[None, None]}
        feed = {i.name: np.ascontiguousarray(by_channels[int(i.shape[1])]) for i in sess.get_inputs()}

        def infer():
            return sess.run(None, feed)[0]

        return infer

    return load, prepare, lambda sess: {"onnxruntime": ort.__version__}


def measure_model(spec: dict, loader: Callable) -> dict:
    load, prepare, describe = loader(spec)
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    engine = load()
    init_s = time.perf_counter() - t0
    rss_after_init = rss_bytes()
    infer = prepare(engine)
    t0 = time.perf_counter()
    out = infer()
    first_s = time.perf_counter() - t0
    rss_after_first = rss_bytes()
    warm = []
    for _ in range(int(spec.get("warmup", 1))):
        t0 = time.perf_counter()
        infer()
        warm.append(time.perf_counter() - t0)
    runs = []
    for _ in range(int(spec.get("runs", 3))):
        t0 = time.perf_counter()
        infer()
        runs.append(time.perf_counter() - t0)
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
        **describe(engine),
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
            "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS")}


LOADERS = {"tflite": _load_tflite, "torch": _load_torch, "onnxruntime": _load_onnxruntime}


def run_spec(spec: dict) -> dict:
    kind = spec["kind"]
    if kind == "sgemm":
        return measure_sgemm(spec)
    if kind == "pipeline":
        from .pipeline_cost import measure_pipeline

        return measure_pipeline(spec)
    if kind not in LOADERS:
        raise ValueError(f"unknown measurement kind {kind!r}")
    return measure_model(spec, LOADERS[kind])


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
