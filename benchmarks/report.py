"""Writing a benchmark run: results.json, CSV tables, PNG plots and report.md, all atomically.

Plots use matplotlib's Agg backend (no display needed). Every file is written to a
temporary name in the output directory and renamed into place.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .quality import SCORE_KEYS, summarize as summarize_quality
from .roofline import ROOFLINE_RUNS

#: the checkout; paths of this machine in results and reports are written relative to it
REPO_ROOT = Path(__file__).resolve().parents[1]
#: an absolute path inside text: a "/" not preceded by a word character (so "GMAC/s", "fp16/w8" are not)
_ABS_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"`),;]+")
#: result keys whose paths are not this machine's (Android device paths such as /data/local/tmp)
DEVICE_KEYS = ("android",)

MODE_ORDER = ("baseline", "shrink", "two-step", "two-step+shrink")
PRECISION_ORDER = ("fp32", "fp16", "int8-dynamic", "int8", "int16x8")


def write_atomic(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def portable(value, root: Path = REPO_ROOT):
    """``value`` (a run's results or any JSON-like part of them) with every absolute path of this machine
    -- one whose top folder exists here -- rewritten relative to ``root`` (``../runs/x`` for a folder beside
    the checkout), in plain values and inside command lines alike; reports, CSVs and the README then carry
    no machine's absolute path. Keys in :data:`DEVICE_KEYS` are left alone."""
    if isinstance(value, dict):
        return {k: (v if k in DEVICE_KEYS else portable(v, root)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v, root) for v in value)
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or "/" not in value:
        return value

    def relative(match) -> str:
        path = match.group(0)
        top = path.split("/")[1]
        if not top or not os.path.isdir("/" + top):
            return path
        return os.path.relpath(path, root)

    return _ABS_PATH.sub(relative, value)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys or ["empty"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in keys})
    write_atomic(path, buf.getvalue())


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "" if v is None else v


def _sgemm_spread(lat: dict, threads) -> str:
    """' (best of N merged runs: lo-hi)' when merged runs measured the SGEMM peak more than once."""
    measured = [v for r in lat.get("raw", []) if r["spec"]["kind"] == "sgemm" and str(r["spec"]["threads"]) == str(threads)
                for v in r.get("gmac_per_s_measured", [])]
    if len(measured) < 2:
        return ""
    return f" (best of {len(measured)} merged runs: {fmt(min(measured), 1)}-{fmt(max(measured), 1)})"


def fmt(v, digits: int = 2, unit: str = "") -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- plots

def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    write_atomic(path, buf.getvalue())


def plot_latency(rows: List[dict], path: Path) -> bool:
    ok = [r for r in rows if "median_s" in r]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in ok}, key=lambda s: int(s.split("x")[0]))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7.5), squeeze=False, sharex="col")
    for j, shape in enumerate(shapes):
        sub = [r for r in ok if r["shape"] == shape]
        labels = sorted({(r.get("model", ""), r["engine"], r["precision"], r["io"]) for r in sub},
                        key=lambda e: (e[0], e[1] != "pytorch-eager", e[1] != "onnxruntime", e[3] != "tensor", e[1],
                                       PRECISION_ORDER.index(e[2]) if e[2] in PRECISION_ORDER else 9))
        threads = sorted({r["threads"] for r in sub})
        width = 0.8 / max(len(threads), 1)
        for metric, ax, unit in (("median_s", axes[0][j], "median latency (s)"),
                                 ("peak_rss_mib", axes[1][j], "peak RSS (MiB)")):
            for k, t in enumerate(threads):
                vals = []
                for lab in labels:
                    match = [r for r in sub if (r.get("model", ""), r["engine"], r["precision"], r["io"]) == lab
                             and r["threads"] == t]
                    vals.append(match[0][metric] if match else 0.0)
                xs = [i + k * width for i in range(len(labels))]
                ax.bar(xs, vals, width=width, label=f"{t} thread{'s' if t > 1 else ''}")
            ax.set_xticks([i + width * (len(threads) - 1) / 2 for i in range(len(labels))])
            ax.set_xticklabels([f"{m} {e.replace('pytorch-eager', 'torch').replace('tflite-no-xnnpack', 'tflite no-xnn')}"
                                f"\n{p} {io}" for m, e, p, io in labels], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(unit)
            ax.set_title(f"{shape}: {unit.split(' (')[0]}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.suptitle("Model latency and memory (each bar: its own process)")
    _save_fig(fig, path)
    plt.close(fig)
    return True


STAGE_ORDER = ("decode", "orientation", "resize", "morphology", "model", "composite", "other", "encode")


def ordered_stages(rows: List[dict]) -> List[str]:
    """Stage names in pipeline order, unknown ones after."""
    names = []
    for r in rows:
        for k in r.get("stage_seconds", {}):
            if k not in names:
                names.append(k)
    return sorted(names, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n))


def plot_pipeline(rows: List[dict], path: Path) -> bool:
    ok = [r for r in rows if "stage_seconds" in r]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ordered_stages(ok)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(ok) + 2), 4.5))
    bottoms = [0.0] * len(ok)
    for st in stages:
        vals = [r["stage_seconds"].get(st, 0.0) for r in ok]
        ax.bar(range(len(ok)), vals, bottom=bottoms, label=st)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels([f"{r.get('model', '')} {r['photo'][:14]} {r['megapixels']:.1f}MP\n{r['mode']} tiles={r['tiles']}"
                        for r in ok],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title("Pipeline end-to-end time by stage")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)
    return True


def plot_quality(rows: List[dict], path: Path) -> bool:
    """2x2 bars: hole / band PSNR by mask kind, hole PSNR / hole SSIM by size class; one bar per method."""
    ok_rows = [r for r in rows if "error" not in r]
    if not ok_rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [s["method"] for s in _order_methods(summarize_quality(ok_rows, by=("method",)))]
    by_kind = summarize_quality(ok_rows, by=("method", "kind"))
    by_size = summarize_quality(ok_rows, by=("method", "size"))
    kinds = [k for k in ("strokes", "blob", "rect") if any(r["kind"] == k for r in by_kind)]
    sizes = [z for z in ("small", "medium", "large") if any(r["size"] == z for r in by_size)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    width = 0.8 / max(len(methods), 1)
    panels = ((axes[0][0], by_kind, "kind", kinds, "hole_psnr", "hole PSNR (dB) by mask kind"),
              (axes[0][1], by_kind, "kind", kinds, "band_psnr", "boundary-band PSNR (dB) by mask kind"),
              (axes[1][0], by_size, "size", sizes, "hole_psnr", "hole PSNR (dB) by hole size"),
              (axes[1][1], by_size, "size", sizes, "hole_ssim", "hole SSIM by hole size"))
    for ax, summary, field, groups, key, title in panels:
        for i, m in enumerate(methods):
            vals = []
            for g in groups:
                match = [r for r in summary if r["method"] == m and r[field] == g]
                v = match[0][key] if match else float("nan")
                vals.append(v if math.isfinite(v) else 0.0)
            ax.bar([x + i * width for x in range(len(groups))], vals, width=width, label=m)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(groups))])
        ax.set_xticklabels(groups)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(methods)), fontsize=8)
    fig.suptitle("Quality by method (mean over photos and cases; higher is better)")
    fig.subplots_adjust(bottom=0.12, hspace=0.3)
    _save_fig(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------- markdown

def headline_tables(results: dict) -> str:
    """Latency per precision at each shape and thread count (tensor I/O), peak RSS at the most threads
    measured, and quality per mode."""
    parts = []
    lat = [r for r in results.get("latency", {}).get("rows", []) if "median_s" in r]
    if lat:
        sel = [r for r in lat if r["io"] == "tensor"]
        threads = sorted({r["threads"] for r in sel})
        tmax = threads[-1]
        shapes = sorted({r["shape"] for r in sel}, key=lambda s: int(s.split("x")[0]))
        engines = []
        for r in sorted(sel, key=lambda r: (r.get("model", ""), r["engine"] != "pytorch-eager", r["engine"] != "onnxruntime",
                                            r["engine"], PRECISION_ORDER.index(r["precision"]) if r["precision"] in PRECISION_ORDER else 9)):
            e = (r.get("model", ""), r["engine"], r["precision"])
            if e not in engines:
                engines.append(e)
        with_ceiling = any(r.get("fraction_of_xnnpack_conv") for r in sel)
        header = ["model", "engine", "precision"]
        for s in shapes:
            header += [f"{s} median {t}t (s)" for t in threads] + [f"{s} peak RSS {tmax}t (MiB)"]
            header += [f"{s} % of conv ceiling {tmax}t"] if with_ceiling else []
        header.append("file (MiB, largest shape)")
        rows = []
        for e in engines:
            row = [e[0], e[1], e[2]]
            size = ""
            for s in shapes:
                at = {r["threads"]: r for r in sel if (r.get("model", ""), r["engine"], r["precision"]) == e and r["shape"] == s}
                row += [fmt(at[t]["median_s"]) if t in at else "–" for t in threads]
                row.append(fmt(at[tmax]["peak_rss_mib"], 0) if tmax in at else "–")
                if with_ceiling:
                    row.append(_percent(at[tmax].get("fraction_of_xnnpack_conv")) if tmax in at else "–")
                any_row = next(iter(at.values()), None)
                if any_row and any_row.get("bytes"):
                    size = fmt(float(any_row["bytes"]) / 2 ** 20, 1)
            row.append(size or "–")
            rows.append(row)
        counts = " and ".join(str(t) for t in threads)
        ceiling_note = (" `% of conv ceiling`: the model's convolution GMAC/s (median run) over XNNPACK's own GMAC/s "
                        "on the model's dominant convolutions alone (one-convolution TFLite files, same shape, threads "
                        "and run, their fastest run; int8 ceiling for the int8 precisions, fp32 for the rest)"
                        if with_ceiling else "")
        parts += [line for line in [section_machine_line(results, "latency")] if line]
        parts.append(f"Model latency (median) at {counts} thread{'s' if threads != [1] else ''} and peak RSS at "
                     f"{tmax}, tensor I/O{'.' + ceiling_note if ceiling_note else ''}:\n\n" + md_table(header, rows))
        ceiling = conv_ceiling_table(results.get("latency", {}))
        if ceiling:
            parts.append("The convolution ceiling (XNNPACK, measured in the same run as the model rows it divides):\n\n"
                         + ceiling)
    q = results.get("quality", {}).get("rows", [])
    if q:
        summ = summarize_quality([r for r in q if r["group"] in ("mode", "classical")], by=("method",))
        rows = [[s["method"], s["n"], fmt(s["hole_psnr"]), fmt(s["hole_ssim"], 3), fmt(s["band_psnr"]),
                 fmt(s["band_ssim"], 3), fmt(s["seconds"], 1)] for s in _order_methods(summ)]
        parts += [line for line in [section_machine_line(results, "quality")] if line]
        parts.append("Quality per mode (mean over photos and mask kinds/sizes):\n\n" +
                     md_table(["method", "cases", "hole PSNR", "hole SSIM", "band PSNR", "band SSIM", "s/case"], rows))
    return "\n\n".join(parts)


def _percent(fraction) -> str:
    return fmt(100 * fraction, 0) + " %" if fraction else "–"


def conv_ceiling_table(lat: dict) -> str:
    """The XNNPACK one-convolution measurements (benchmarks.roofline) as a table, '' when there are none; with the
    run (its start time) each was measured in where merged runs measured them more than once."""
    roof = lat.get("roofline_rows", [])
    runs = sorted({r.get("run") or "" for r in roof})
    rows = [([r.get("run") or "–"] if len(runs) > 1 else [])
            + [r["model_shape"], r["conv"], r["precision"], r["threads"], fmt(r.get("min_s"), 3), fmt(r.get("median_s"), 3),
               fmt(r.get("gmac_per_s"), 1) if "gmac_per_s" in r else "failed: " + str(r.get("error", ""))[:60]]
            for r in sorted(roof, key=lambda r: r.get("run") or "")]
    if not rows:
        return ""
    return md_table((["run"] if len(runs) > 1 else []) + ["model shape", "convolution", "precision", "threads",
                                                          "fastest s", "median s", "GMAC/s (fastest run)"], rows)


def section_machine_line(results: dict, section: str) -> str:
    """Where one section's rows were measured: the machine its source recorded (``benchmarks.run.section_machine``),
    else -- results from before sections recorded one -- the run's (or the last merged run's)."""
    src = (results.get(section) or {}).get("source") or {}
    machine = src.get("machine")
    if not machine:
        return machine_line(results["meta"]) if results.get("meta") else ""
    line = _recorded_machine_line(machine)
    model = src.get("model_sha256")
    return line[:-1] + f"; the artifacts' checkpoint sha256 {model[:8]}..." if model else line


def _recorded_machine_line(machine: dict) -> str:
    """:func:`machine_line` of a section's recorded machine (``benchmarks.run.section_machine``)."""
    return machine_line({**machine, "versions": {"ai-edge-litert": machine.get("litert") or "?"}}, merged=False)


def machine_line(meta: dict, merged: bool = True) -> str:
    """CPU, its SIMD flags, thread counts and load of the run (or runs, when merged)."""
    simd = meta.get("cpu_simd") or {}
    flags = (f"; CPU flags {' '.join(simd.get('present', [])) or 'none of note'}"
             + (f", no {'/'.join(simd['absent'])}" if simd.get("absent") else "")) if simd else "; CPU flags not recorded"
    threads = ", ".join(str(t) for t in meta.get("threads", [])) or "?"
    load = meta.get("load_avg_start")
    load_text = f"1-minute load average {load:.1f} at the start" if isinstance(load, (int, float)) else "load not recorded"
    merged = len(meta.get("merged_from", [])) if merged else 0
    return (f"Measured {meta['started'][:10]} on {meta['cpu']} ({meta['cpu_count']} cores{flags}), "
            f"{threads} thread(s), {load_text}"
            + (f" of the last of {merged + 1} merged runs" if merged else "")
            + f"; TFLite via LiteRT {meta['versions'].get('ai-edge-litert', '?')} with XNNPACK.")


def _order_methods(summ: List[dict]) -> List[dict]:
    def key(s):
        m = s.get("mode") or ""
        p = s.get("precision") or ""
        return (s.get("group") != "mode", s.get("group") != "precision",
                MODE_ORDER.index(m) if m in MODE_ORDER else 9,
                PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 9, s["method"])

    return sorted(summ, key=key)


def _source_line(section: dict) -> List[str]:
    src = section.get("source") if isinstance(section, dict) else None
    if not src:
        return []
    machine = src.get("machine")
    where = " " + _recorded_machine_line(machine) if machine else ""
    return [f"Measured by `{src.get('command')}` ({src.get('started')}), artifacts `{src.get('artifacts')}`, "
            f"checkpoint `{src.get('checkpoint') or 'from the manifest'}`.{where}\n"]


def render_markdown(results: dict, plots: Dict[str, str]) -> str:
    meta = results["meta"]
    out = [f"# gmcnn-mobile benchmark report\n",
           f"Generated by `{meta['command']}` on {meta['started']} (took {fmt(meta.get('wall_s'), 0)} s).\n",
           "## Machine and setup\n",
           f"- {machine_line(meta)}",
           f"- CPU: {meta['cpu']} ({meta['cpu_count']} logical cores visible); load average at start "
           f"{fmt(meta['load_avg_start'], 2)}, at end {fmt(meta.get('load_avg_end'), 2)}.",
           f"- {meta['contention_note']}",
           f"- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
           f"- Artifacts: `{meta['artifacts']}`; checkpoint: `{meta.get('checkpoint') or 'none found'}`"
           + (f" ({meta['checkpoint_meta']})" if meta.get("checkpoint_meta") else ""),
           f"- Timed runs per measurement: {meta['runs']} after {meta['warmup']} warm-up run(s); threads: {meta['threads']}.",
           ""]
    if meta.get("merged_from"):
        out += ["This report merges earlier runs into the latest one (see each section's source line): "
                + "; ".join(f"`{m['command']}` ({m['started']})" for m in meta["merged_from"]) + ".\n"]
    if meta.get("notes"):
        out += ["Notes:\n"] + [f"- {n}" for n in meta["notes"]] + [""]
    head = headline_tables(results)
    if head:
        out += ["## Headline\n", head, ""]

    lat = results.get("latency")
    if lat:
        out += ["## Model latency and memory\n"] + _source_line(lat) + [
                "Each row is its own process: `idle RSS` is the resident set of the loaded-but-idle engine "
                "(after load and tensor allocation), `added` is the peak RSS minus that (what inference adds). "
                "`init` is load + allocate, `first` the first inference (kept apart from the timed runs, as are "
                "the warm-up runs). GMAC/s counts convolution MACs of the checkpoint at that shape over the median; "
                "`% conv` compares it with XNNPACK's own speed on the model's dominant convolutions (below: the "
                f"fastest of at least {ROOFLINE_RUNS} runs; the int8 ceiling for int8 and int8-dynamic files, fp32 for "
                "the rest), "
                "`% SGEMM` with the "
                "numpy/OpenBLAS SGEMM figure (context only: other kernels than XNNPACK's), both at the same "
                "thread count in this run.\n"]
        ceiling = conv_ceiling_table(lat)
        if ceiling:
            out += ["Convolution ceiling (one-convolution TFLite files with the model's dominant shapes, "
                    "through the TFLite engine with XNNPACK):\n", ceiling, ""]
        peaks = lat.get("sgemm_peak_gmac_per_s", {})
        if peaks:
            kernels = lat.get("sgemm_kernels") or "unknown"
            out.append("Context: numpy/OpenBLAS SGEMM, n = {} (OpenBLAS kernels: {}): ".format(meta.get("sgemm_n"), kernels) +
                       ", ".join(f"{t} thread(s): {fmt(v, 1)} GMAC/s{_sgemm_spread(lat, t)}"
                                 for t, v in peaks.items()) + "\n")
        if meta.get("macs"):
            out.append("Convolution MACs per inference: " +
                       ", ".join(f"{s}: {v / 1e9:.1f} G" for s, v in meta["macs"].items()) + "\n")
        header = ["model", "engine", "prec.", "io", "shape", "thr", "init s", "first s", "min s", "median s", "p90 s",
                  "idle RSS MiB", "peak RSS MiB", "added MiB", "x vs torch", "GMAC/s", "% conv", "% SGEMM"]
        rows = []
        for r in lat["rows"]:
            if "error" in r:
                rows.append([r.get("model", ""), r["engine"], r["precision"], r["io"], r["shape"], r["threads"],
                             "failed: " + r["error"][:80]] + [""] * (len(header) - 7))
                continue
            rows.append([r.get("model", ""), r["engine"], r["precision"], r["io"], r["shape"], r["threads"], fmt(r["init_s"]),
                         fmt(r["first_s"]), fmt(r["min_s"], 3), fmt(r["median_s"], 3), fmt(r["p90_s"], 3),
                         fmt(r["rss_idle_mib"], 0), fmt(r["peak_rss_mib"], 0), fmt(r["peak_added_over_idle_mib"], 0),
                         fmt(r.get("speedup_vs_torch")), fmt(r.get("gmac_per_s"), 1),
                         fmt(100 * r["fraction_of_xnnpack_conv"], 0) if r.get("fraction_of_xnnpack_conv") else "–",
                         fmt(100 * r["fraction_of_sgemm_peak"], 0) if r.get("fraction_of_sgemm_peak") else "–"])
        out += [md_table(header, rows), ""]
        if "latency" in plots:
            out += [f"![latency and memory]({plots['latency']})\n"]
        xnn = [r for r in lat["rows"] if r["engine"] in ("tflite", "tflite-no-xnnpack") and r["precision"] == "fp32"
               and r["io"] == "tensor" and "median_s" in r]
        if xnn:
            out += ["### XNNPACK on vs off (fp32 TFLite)\n"]
            rows = []
            for r in xnn:
                rows.append([r.get("model", ""), r["shape"], r["threads"], "on" if r["engine"] == "tflite" else "off",
                             fmt(r["median_s"], 3), fmt(r["peak_rss_mib"], 0), r.get("xnnpack_partitions", "–"),
                             r.get("nodes_outside_xnnpack", "–"), r.get("ops_outside_xnnpack") or "none",
                             r.get("manifest_xnnpack_fallback") or "–"])
            out += [md_table(["model", "shape", "threads", "XNNPACK", "median s", "peak RSS MiB", "partitions",
                              "nodes outside XNNPACK", "ops outside XNNPACK (measured)", "manifest says"], rows), ""]
            out.append("Ops outside XNNPACK (measured) are read from the interpreter's node list: nodes not covered "
                       "by any XNNPACK partition run on the interpreter's built-in kernels. `manifest says` is the "
                       "export's op inventory (`xnnpack_fallback_ops`) when the manifest has one.\n")
            other = [r for r in lat["rows"] if r["engine"] == "tflite" and r.get("ops_outside_xnnpack")
                     and not (r["precision"] == "fp32" and r["io"] == "tensor")]
            if other:
                seen = {}
                for r in other:
                    seen.setdefault((r["precision"], r["io"], r["shape"]), r["ops_outside_xnnpack"])
                out += ["Other artifacts with ops outside XNNPACK:\n",
                        md_table(["precision", "io", "shape", "ops outside XNNPACK"],
                                 [[p, i, s, o] for (p, i, s), o in seen.items()]), ""]
    android = results.get("android")
    if android:
        pushes = []
        for c in android:
            if c["push"] not in pushes:
                pushes.append(c["push"])
        out += ["## Android: the same measurements with `benchmark_model`\n",
                "Push LiteRT's `benchmark_model` binary and the artifacts to the phone, then run one line per "
                "configuration measured above (threads, warm-up and timed runs, XNNPACK on/off, peak memory "
                "footprint); add `--enable_op_profiling=true` for a per-op breakdown:\n",
                "```sh", "adb push benchmark_model /data/local/tmp/ && adb shell chmod +x /data/local/tmp/benchmark_model"]
        out += pushes + [f"adb shell {c['shell']}" for c in android] + ["```", ""]

    pipe = results.get("pipeline")
    if pipe and pipe.get("rows"):
        out += ["## Pipeline cost\n"] + _source_line(pipe) + [
                f"Mask: {pipe['mask']['kind']} / {pipe['mask']['size']}, seed {pipe['mask']['seed']}; engine "
                f"TFLite {pipe['precision']}, {pipe['threads']} thread(s); each row its own process. "
                "`open` (engine creation) is excluded from end-to-end time. The non-model share is "
                "end-to-end minus model time, over end-to-end. Stages: `decode` (file to pixels, EXIF applied), "
                "`orientation` (portrait rotation), `resize` (every resize to and from model shapes), `morphology` "
                "(mask erosions of shrink and the two-step ring), `model` (inference incl. feeding), `composite` "
                "(stitching predictions into the image, tile blending), `other` (pipeline time outside its named "
                "stages: cropping, tile bookkeeping), `encode` (JPEG q95 in memory).\n"]
        for note in pipe.get("notes", []):
            out.append(f"- {note}")
        rows = []
        stage_names = ordered_stages(pipe["rows"])
        for r in pipe["rows"]:
            if "error" in r:
                rows.append([r.get("model", ""), r["photo"], "", r["mode"], r["tiles"], "failed: " + r["error"][:80]]
                            + [""] * (5 + len(stage_names)))
                continue
            rows.append([r.get("model", ""), r["photo"] + (f" (upscaled from {r['upscaled_from']})" if r.get("upscaled_from") else ""),
                         f"{r['megapixels']:.1f}", r["mode"], r["tiles"], fmt(r["end_to_end_s"]), fmt(r["model_s"]),
                         fmt(100 * r["non_model_share"], 0) + " %", r["model_runs"], f"{r['tiles_run']}/{r['tiles_skipped']}",
                         fmt(r["peak_rss_mib"], 0)] + [fmt(r["stage_seconds"].get(k), 2) for k in stage_names])
        out += ["", md_table(["model", "photo", "MP", "mode", "tiles", "end-to-end s", "model s", "non-model", "model runs",
                              "tiles run/skipped", "peak RSS MiB"] + [f"{k} s" for k in stage_names], rows), ""]
        if "pipeline" in plots:
            out.append(f"![pipeline stages]({plots['pipeline']})\n")

    q = results.get("quality")
    if q and q.get("rows"):
        out += ["## Quality\n"] + _source_line(q) + [
                f"{q['cases']} cases: real photos x masks from recorded seeds (`runtime_py.masks.make_mask(kind, H, W, seed, size)`, "
                f"seeds in quality.csv), scored against the original photo at full resolution with "
                f"`runtime_py.metrics.region_scores` (hole; band = {q['band_px']} px each side of the hole boundary). "
                "PSNR in dB, SSIM in [0, 1]; higher is better.\n"]
        for note in q.get("notes", []):
            out.append(f"- {note}")
        out.append("")
        rows_all = q["rows"]
        by_method = _order_methods(summarize_quality(rows_all, by=("method",)))
        out += ["### Overall\n", md_table(["method", "group", "cases", "errors", "hole PSNR", "hole SSIM", "band PSNR",
                                          "band SSIM", "whole PSNR", "s/case"],
                                         [[s["method"], s["group"], s["n"], s["errors"], fmt(s["hole_psnr"]),
                                           fmt(s["hole_ssim"], 3), fmt(s["band_psnr"]), fmt(s["band_ssim"], 3),
                                           fmt(s["psnr"]), fmt(s["seconds"], 1)] for s in by_method]), ""]
        cells = summarize_quality(rows_all, by=("method", "kind", "size"))
        kinds = [k for k in ("strokes", "blob", "rect") if any(c["kind"] == k for c in cells)]
        sizes = [s for s in ("small", "medium", "large") if any(c["size"] == s for c in cells)]
        for metric, label, digits in (("hole_psnr", "hole PSNR (dB)", 2), ("band_psnr", "boundary-band PSNR (dB)", 2),
                                      ("hole_ssim", "hole SSIM", 3)):
            header = ["method"] + [f"{k} {s}" for k in kinds for s in sizes]
            rows = []
            for m in by_method:
                row = [m["method"]]
                for k in kinds:
                    for s in sizes:
                        c = [x for x in cells if x["method"] == m["method"] and x["kind"] == k and x["size"] == s]
                        row.append(fmt(c[0][metric], digits) if c else "–")
                rows.append(row)
            out += [f"### {label} by method x mask kind x size\n", md_table(header, rows), ""]
        if "quality" in plots:
            out.append(f"![quality]({plots['quality']})\n")
    skipped = meta.get("skipped") or []
    if skipped:
        out += ["## Not measured in this run\n"] + [f"- {s}" for s in skipped] + [""]
    out += ["## Files\n", "`results.json` (everything, raw per-run timings included), `latency.csv`, `pipeline.csv`, "
            "`quality.csv` (one row per case and method, with seeds), `quality_summary.csv`, the PNG plots, "
            "`logs/` (each worker's stderr).\n"]
    return "\n".join(out)


def write_report(out_dir: Path, results: dict) -> Dict[str, Path]:
    """Write every output file (paths of this machine made relative, :func:`portable`); returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = portable(results)
    files = {}
    plots = {}
    lat_rows = results.get("latency", {}).get("rows", [])
    pipe_rows = results.get("pipeline", {}).get("rows", [])
    q_rows = results.get("quality", {}).get("rows", [])
    if plot_latency(lat_rows, out_dir / "latency.png"):
        plots["latency"] = "latency.png"
    if plot_pipeline(pipe_rows, out_dir / "pipeline.png"):
        plots["pipeline"] = "pipeline.png"
    if plot_quality(q_rows, out_dir / "quality.png"):
        plots["quality"] = "quality.png"
    for name, rel in plots.items():
        files[f"{name}.png"] = out_dir / rel
    write_csv(out_dir / "latency.csv", lat_rows)
    write_csv(out_dir / "pipeline.csv", [{k: v for k, v in r.items() if k != "runs"} for r in pipe_rows])
    write_csv(out_dir / "quality.csv", q_rows)
    write_csv(out_dir / "quality_summary.csv", summarize_quality(q_rows) if q_rows else [])
    for n in ("latency.csv", "pipeline.csv", "quality.csv", "quality_summary.csv"):
        files[n] = out_dir / n
    write_atomic(out_dir / "results.json", json.dumps(results, indent=1, default=_json_default))
    files["results.json"] = out_dir / "results.json"
    write_atomic(out_dir / "report.md", render_markdown(results, plots))
    files["report.md"] = out_dir / "report.md"
    return files


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)
