"""The convolution ceiling a model is compared with: XNNPACK's own speed on the model's dominant convolutions.

A convolution-bound TFLite model cannot run faster than XNNPACK runs its largest convolutions
alone. So the benchmark builds one-convolution TFLite files (conv + bias + ELU, as in GMCNN) with
the shapes that carry most of the model's MACs -- for the shipped tf cnum-32 model at 512x680:
7x7 128->128 and 3x3 128->128 at 128x170 (the quarter-resolution encoder layers) -- in fp32 and
int8, times them through the project's TFLite engine with the same threads and in the same run as
the models, and reports each model's GMAC/s as a fraction of the best of them (fp32 ceiling for
fp32/fp16 files, PyTorch and ONNX Runtime; int8 ceiling for int8 and int8-dynamic files, which run
XNNPACK's int8 kernels).

A ceiling is what the convolution can do, so each file's GMAC/s comes from its fastest timed run, of at
least :data:`ROOFLINE_RUNS` (a convolution costs 0.2-1.3 s at full size): with the models' 3 runs and their
median, one run on this 2-core machine read the 1024x1360 7x7 fp32 convolution at 54 GMAC/s, which the
same file ran at 83 alone (7 runs, fastest 89), and the fp32 model read "143 %" of its ceiling.

Building needs TensorFlow (the converter), in a child process, as the export does.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

#: kernel sizes whose dominant layer the benchmark measures (the issue's 7x7 and 3x3)
ROOFLINE_KERNELS = (7, 3)
PRECISIONS = ("fp32", "int8")
#: the fewest timed runs of each one-convolution file; its ceiling is the fastest of them
ROOFLINE_RUNS = 10


@dataclass(frozen=True)
class ConvShape:
    """One stride-1 convolution: ``kernel`` x ``kernel``, ``in_channels`` -> ``out_channels`` on a
    ``rows`` x ``cols`` feature map (input and output, SAME padding)."""

    kernel: int
    in_channels: int
    out_channels: int
    rows: int
    cols: int

    @property
    def gmac(self) -> float:
        return self.rows * self.cols * self.in_channels * self.out_channels * self.kernel * self.kernel / 1e9

    def name(self, precision: str) -> str:
        return f"conv{self.kernel}x{self.kernel}_{self.in_channels}to{self.out_channels}_{self.rows}x{self.cols}_{precision}"

    def describe(self) -> str:
        return f"{self.kernel}x{self.kernel} {self.in_channels}->{self.out_channels} at {self.rows}x{self.cols}"


def dominant_convs(layers: Sequence[dict], kernels: Sequence[int] = ROOFLINE_KERNELS) -> List[ConvShape]:
    """Per kernel size, the (channels, feature map) group of square, ungrouped convolutions with the
    most MACs in total (dilation ignored: XNNPACK runs a dilated convolution at the same cost per MAC).

    ``layers``: :func:`models.gmcnn.conv_layers` rows."""
    totals: Dict[ConvShape, int] = {}
    for layer in layers:
        kh, kw = layer["kernel"]
        if kh != kw or kh not in kernels or layer["groups"] != 1:
            continue
        shape = ConvShape(kh, layer["in_channels"], layer["out_channels"], *layer["out_hw"])
        totals[shape] = totals.get(shape, 0) + int(layer["macs"])
    best = {}
    for shape, macs in totals.items():
        if shape.kernel not in best or macs > totals[best[shape.kernel]]:
            best[shape.kernel] = shape
    return [best[k] for k in kernels if k in best]


_BUILD_CONV = r"""
import os, sys, numpy as np, tensorflow as tf
out, precisions = sys.argv[1], sys.argv[2].split(",")
for spec in sys.argv[3:]:
    k, cin, cout, h, w = (int(v) for v in spec.split(","))
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.normal(0, (1.0 / (k * k * cin)) ** 0.5, (k, k, cin, cout)).astype(np.float32))
    bias = tf.constant(rng.normal(0, 0.05, cout).astype(np.float32))
    @tf.function(input_signature=[tf.TensorSpec([1, h, w, cin], tf.float32, name="x")])
    def conv(x):
        return tf.nn.elu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))
    for precision in precisions:
        path = f"{out}/conv{k}x{k}_{cin}to{cout}_{h}x{w}_{precision}.tflite"
        if os.path.exists(path):
            continue
        c = tf.lite.TFLiteConverter.from_concrete_functions([conv.get_concrete_function()], conv)
        if precision == "int8":
            def rep():
                for _ in range(4):
                    yield [rng.uniform(-1, 1, (1, h, w, cin)).astype(np.float32)]
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.representative_dataset = rep
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            c.inference_input_type = tf.int8
            c.inference_output_type = tf.int8
        open(path + ".tmp", "wb").write(c.convert())
        os.replace(path + ".tmp", path)
"""


def build_conv_files(shapes: Union[ConvShape, Sequence[ConvShape]], out_dir: Path,
                     precisions: Sequence[str] = PRECISIONS) -> Dict:
    """One-convolution TFLite files (NHWC float32 input ``x`` (1,rows,cols,C_in), or int8 for ``int8``;
    weights ~ N(0, 1/fan_in), fixed seed) in ``out_dir``; files already there are reused. The missing ones
    are built in one child process (TensorFlow's import costs seconds).
    Returns {precision: path} for one shape, {(shape, precision): path} for a sequence of them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    many = not isinstance(shapes, ConvShape)
    shapes = list(shapes) if many else [shapes]
    paths = {(s, p): out_dir / f"{s.name(p)}.tflite" for s in shapes for p in precisions}
    missing = [s for s in shapes if any(not paths[(s, p)].exists() for p in precisions)]
    if missing:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        args = [",".join(str(v) for v in (s.kernel, s.in_channels, s.out_channels, s.rows, s.cols)) for s in missing]
        proc = subprocess.run([sys.executable, "-c", _BUILD_CONV, str(out_dir), ",".join(precisions), *args],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"building the {', '.join(s.describe() for s in missing)} convolution files failed: "
                               f"{tail[0]}")
    return paths if many else {p: path for (_, p), path in paths.items()}


def ceiling_precision(precision: str) -> str:
    """Which microbenchmark a model precision is compared with: int8 kernels for int8 and int8-dynamic."""
    return "int8" if precision.startswith("int8") else "fp32"


def roofline_specs(model_shape: str, files: Dict[Tuple[ConvShape, str], Path], threads: Sequence[int],
                   warmup: int, runs: int) -> List[dict]:
    """benchmarks.worker specs (kind tflite, role roofline) timing every microbenchmark file of the model
    shape ``model_shape`` ("ROWSxCOLS") at every thread count: ``runs`` timed runs, at least
    :data:`ROOFLINE_RUNS`."""
    runs = max(int(runs), ROOFLINE_RUNS)
    specs = []
    for t in threads:
        for (shape, precision), path in files.items():
            specs.append({"kind": "tflite", "role": "roofline", "engine": "tflite", "precision": precision,
                          "label": f"xnnpack conv {shape.describe()} {precision} {t}t", "conv": shape.describe(),
                          "shape_key": model_shape, "gmac": shape.gmac, "path": str(path), "threads": t,
                          "warmup": warmup, "runs": runs, "xnnpack": True})
    return specs


def ceilings(results: Sequence[dict]) -> Tuple[Dict[str, Dict[str, Dict[str, float]]], List[dict]]:
    """From worker results: ({model shape: {threads: {precision: best GMAC/s of its convolutions}}}, rows); a
    convolution's GMAC/s is that of its fastest run (``min_s``), its median kept in the row beside it."""
    peak: Dict[str, Dict[str, Dict[str, float]]] = {}
    rows = []
    for r in results:
        s = r["spec"]
        if s.get("role") != "roofline":
            continue
        row = {"model_shape": s["shape_key"], "conv": s["conv"], "precision": s["precision"], "threads": s["threads"],
               "gmac": s["gmac"], **({"run": r["run"]} if r.get("run") else {})}
        if r.get("ok"):
            med, best = r["stats"]["median_s"], r["stats"]["min_s"]
            row.update(median_s=med, min_s=best, gmac_per_s=s["gmac"] / best,
                       load_avg_before=r.get("load_avg_before"), load_avg_after=r.get("load_avg_after"))
            by_t = peak.setdefault(s["shape_key"], {}).setdefault(str(s["threads"]), {})
            by_t[s["precision"]] = max(by_t.get(s["precision"], 0.0), row["gmac_per_s"])
        else:
            row["error"] = r.get("error", "failed")
        rows.append(row)
    return peak, rows


def ceiling_for(peak: Dict[str, Dict[str, Dict[str, float]]], model_shape: str, threads, precision: str):
    """The ceiling a model row is divided by, or None when its microbenchmark was not measured."""
    return peak.get(model_shape, {}).get(str(threads), {}).get(ceiling_precision(precision))
