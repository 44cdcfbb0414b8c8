"""Model latency and memory: every TFLite artifact, PyTorch eager and ONNX Runtime, the convolution ceiling.

Every measurement is one worker process (see ``benchmarks.worker``). Derived
numbers, computed here from the raw results: the ratio of each median to PyTorch
eager fp32's median at the same shape and thread count, achieved GMAC/s
(convolution MACs of the checkpoint at that shape / median seconds) and that as a
fraction of XNNPACK's speed on the model's dominant convolutions alone
(``benchmarks.roofline``), measured at the same shape and thread count in the same run;
the numpy/OpenBLAS SGEMM figure stays as context, labelled with the OpenBLAS kernels it ran.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .android import DEVICE_DIR, benchmark_model_args
from .roofline import ceiling_for, ceilings

PRECISION_ORDER = ("fp32", "fp16", "int8-dynamic", "int8", "int16x8")


def _shape_key(shape) -> str:
    return f"{int(shape[0])}x{int(shape[1])}"


def plan_latency(manifest, artifacts_dir: Path, threads: Sequence[int], warmup: int, runs: int,
                 checkpoint: Optional[Path], onnx_files: Dict[str, Path], sgemm_n: int,
                 shapes: Optional[Sequence[str]] = None, precisions: Optional[Sequence[str]] = None,
                 ios: Optional[Sequence[str]] = None, xnnpack_off: bool = True, model: str = "",
                 roofline: Sequence[dict] = ()) -> List[dict]:
    """Worker specs, in run order: SGEMM per thread count, the ``roofline`` convolution specs
    (``benchmarks.roofline.roofline_specs``), then per shape and thread count the
    reference engines and every TFLite artifact (plus XNNPACK off for fp32 tensor artifacts).

    ``model`` (e.g. ``tf-c32``) names the network in every label and row, so runs of different
    checkpoints can be merged into one report."""
    tag = f"[{model}] " if model else ""
    arts = [a for a in manifest.artifacts if a.format == "tflite"
            and (not shapes or _shape_key(a.shape) in shapes)
            and (not precisions or a.precision in precisions)
            and (not ios or a.io in ios)]
    order = {p: i for i, p in enumerate(PRECISION_ORDER)}
    arts.sort(key=lambda a: (a.height * a.width, a.io != "tensor", order.get(a.precision, 99)))
    specs = []
    for t in threads:
        specs.append({"kind": "sgemm", "label": f"sgemm n={sgemm_n} {t}t", "n": sgemm_n, "threads": t,
                      "warmup": 1, "runs": max(3, runs)})
    specs += list(roofline)
    shape_list = sorted({tuple(a.shape) for a in arts}, key=lambda s: s[0] * s[1])
    for shape in shape_list:
        key = _shape_key(shape)
        for t in threads:
            common = {"threads": t, "warmup": warmup, "runs": runs, "shape": list(shape), "shape_key": key,
                      "model": model}
            if checkpoint is not None:
                specs.append({"kind": "torch", "label": f"{tag}torch fp32 {key} {t}t", "engine": "pytorch-eager",
                              "precision": "fp32", "io": "tensor", "path": str(checkpoint), **common})
                if key in onnx_files:
                    specs.append({"kind": "onnxruntime", "label": f"{tag}onnxruntime fp32 {key} {t}t",
                                  "engine": "onnxruntime", "precision": "fp32", "io": "tensor",
                                  "path": str(onnx_files[key]), **common})
            for a in (x for x in arts if tuple(x.shape) == shape):
                inventory = a.op_inventory if isinstance(getattr(a, "op_inventory", None), dict) else {}
                base = {"kind": "tflite", "engine": "tflite", "precision": a.precision, "io": a.io,
                        "manifest_xnnpack_fallback": inventory.get("xnnpack_fallback_ops"),
                        "path": str(Path(artifacts_dir) / a.file), "file": a.file, "bytes": a.bytes, **common}
                specs.append({**base, "label": f"{tag}tflite {a.precision} {a.io} {key} {t}t", "xnnpack": True})
                if xnnpack_off and a.precision == "fp32" and a.io == "tensor":
                    specs.append({**base, "label": f"{tag}tflite {a.precision} {a.io} {key} {t}t no-xnnpack",
                                  "engine": "tflite-no-xnnpack", "xnnpack": False})
    return specs


def derive(results: List[dict], macs: Dict[str, int]) -> Dict[str, object]:
    """Rows for the tables: latency stats, memory, ratios to PyTorch, GMAC/s vs the convolution ceiling
    (and vs the SGEMM figure)."""
    conv_peak, roofline_rows = ceilings(results)
    # merged results (benchmarks.merge) tag each row with its run: a model row is divided by its own run's ceiling
    # (the machine's speed drifts between runs); one run's rows carry no tag and share the one ceiling
    run_peak = {run: ceilings([r for r in results if r.get("run") == run])[0]
                for run in {r.get("run") for r in results}}
    peak: Dict[int, float] = {}
    for r in results:
        if r["spec"]["kind"] == "sgemm" and r.get("ok"):
            t = r["spec"]["threads"]
            peak[t] = max(peak.get(t, 0.0), r["gmac_per_s"])
    torch_median = {(r["spec"].get("model", ""), r["spec"]["shape_key"], r["spec"]["threads"]): r["stats"]["median_s"]
                    for r in results if r["spec"]["kind"] == "torch" and r.get("ok")}
    rows = []
    for r in results:
        s = r["spec"]
        if s["kind"] == "sgemm" or s.get("role") == "roofline":
            continue
        row = {"label": s["label"], "model": s.get("model", ""), "engine": s["engine"], "precision": s["precision"], "io": s["io"],
               "shape": s["shape_key"], "threads": s["threads"], "xnnpack": s.get("xnnpack", ""),
               "warmup": s["warmup"], "runs": s["runs"], "file": s.get("file", ""), "bytes": s.get("bytes", "")}
        if not r.get("ok"):
            row["error"] = r.get("error", "failed")
            rows.append(row)
            continue
        st = r["stats"]
        row.update({
            "init_s": r["init_s"], "first_s": r["first_s"], "warmup_mean_s": (sum(r["warmup_s"]) / len(r["warmup_s"])) if r["warmup_s"] else None,
            "min_s": st["min_s"], "median_s": st["median_s"], "p90_s": st["p90_s"],
            "rss_idle_mib": r["rss_after_init"] / 2 ** 20, "rss_after_first_mib": r["rss_after_first"] / 2 ** 20,
            "peak_rss_mib": r["peak_rss"] / 2 ** 20, "peak_added_over_idle_mib": r["peak_added_over_idle"] / 2 ** 20,
            "load_avg_before": r.get("load_avg_before"), "load_avg_after": r.get("load_avg_after"),
        })
        tm = torch_median.get((s.get("model", ""), s["shape_key"], s["threads"]))
        row["speedup_vs_torch"] = (tm / st["median_s"]) if tm else None
        m = macs.get(f"{s['model']} {s['shape_key']}" if s.get("model") else s["shape_key"], macs.get(s["shape_key"]))
        if m:
            row["gmac_per_s"] = m / st["median_s"] / 1e9
            p = peak.get(s["threads"])
            row["fraction_of_sgemm_peak"] = (row["gmac_per_s"] / p) if p else None
            c = ceiling_for(run_peak[r.get("run")], s["shape_key"], s["threads"], s["precision"])
            row["fraction_of_xnnpack_conv"] = (row["gmac_per_s"] / c) if c else None
        if "delegation" in r:
            d = r["delegation"]
            row["nodes"] = d["nodes"]
            row["xnnpack_partitions"] = d["partitions"]
            row["nodes_outside_xnnpack"] = d["nodes_outside"]
            row["ops_outside_xnnpack"] = " ".join(f"{k}x{v}" for k, v in d["ops_outside"].items())
        fallback = s.get("manifest_xnnpack_fallback")
        if fallback:
            row["manifest_xnnpack_fallback"] = (" ".join(f"{k}x{v}" for k, v in fallback.items())
                                                if isinstance(fallback, dict) else " ".join(map(str, fallback)))
        rows.append(row)
    kernels = sorted({r.get("openblas_kernels") for r in results if r["spec"]["kind"] == "sgemm" and r.get("ok")} - {None})
    return {"rows": rows, "sgemm_peak_gmac_per_s": {str(k): v for k, v in sorted(peak.items())},
            "sgemm_kernels": ", ".join(kernels), "xnnpack_conv_gmac_per_s": conv_peak, "roofline_rows": roofline_rows}


def android_commands(specs: List[dict]) -> List[dict]:
    """The benchmark_model command line for every TFLite configuration measured here."""
    out = []
    for s in specs:
        if s["kind"] != "tflite" or s.get("role") == "roofline":
            continue
        args = benchmark_model_args(s["file"], s["threads"], s["warmup"], s["runs"], xnnpack=s.get("xnnpack", True))
        name = Path(s["file"]).name
        out.append({"label": s["label"], "file": s["file"], "push": f"adb push {name} {DEVICE_DIR}/",
                    "shell": " ".join(args)})
    return out
