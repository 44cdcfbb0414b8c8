"""The TensorFlow half of the TFLite export, run as one child process per export.

    python -m export.tflite_worker PLAN.json

For each job of the plan (one ONNX file = one shape and I/O signature): onnx2tf writes a
saved_model, then the TFLite converter makes each requested precision from that
saved_model, the flatbuffer post-passes run (:mod:`export.tflite_graph`), and the TFLite
analyzer's GPU-compatibility report is captured. Only the precisions asked for are
converted: onnx2tf's own .tflite outputs and its ``-oiqt`` variants (which include slow
int16 builds) are never made.

Why a child process: the parent (PyTorch export, LiteRT parity) never imports
TensorFlow; onnx2tf runs ONNX Runtime over every intermediate tensor (memory heavy at
full size), prints a great deal and calls ``sys.exit`` on failure. Each job's output goes
to its own log file; progress and results go to the parent as JSON lines on stdout.

Plan (JSON)::

    {"threads": int,                                                # calibration threads
     "jobs": [{"name": str, "onnx": path, "saved_model": dir, "log": path,
               "cind": {"image": npy, "mask": npy},            # NHWC samples for onnx2tf
               "artifacts": [{"precision": "fp32|fp16|int8-dynamic|int8", "io": "tensor|image",
                              "out": path, "calibration": {"image": npy, "mask": npy} | null,
                              "int8_tail": bool, "pad_mode": "slices|mirror_pad",
                              "upsample_mode": "resize|depth_to_space", "metadata": {...}}]}]}
"""
from __future__ import annotations

import contextlib
import io as _io
import json
import os
import sys
import time
import traceback

from .tflite import EVENT_PREFIX


class _Events:
    """JSON lines to the parent on a private duplicate of the original stdout."""

    def __init__(self):
        self._fd = os.dup(1)

    def send(self, **event) -> None:
        os.write(self._fd, (EVENT_PREFIX + json.dumps(event) + "\n").encode())


@contextlib.contextmanager
def _log_to(path: str):
    """Send fd 1 and 2 (Python and C++ output alike) to ``path`` inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def check_onnx(onnx_path: str) -> None:
    """Fail early (before TensorFlow starts) on an ONNX file onnx2tf could not read."""
    import onnx

    onnx.checker.check_model(onnx.load(onnx_path))


def run_onnx2tf(onnx_path: str, saved_model: str, cind: dict) -> None:
    import numpy as np
    import onnx2tf
    import tensorflow as tf
    import tf_keras

    params = []
    for name, path in cind.items():
        channels = int(np.load(path, mmap_mode="r").shape[-1])
        params.append([name, path, [0.0] * channels, [1.0] * channels])
    try:
        model = onnx2tf.convert(
            input_onnx_file_path=onnx_path,
            output_folder_path=saved_model,
            not_use_onnxsim=True,  # the exporter already ran onnxsim
            custom_input_op_name_np_data_path=params,
            disable_model_save=True,  # we write the saved_model ourselves, and no .tflite
            verbosity="info",
        )
    except SystemExit as exc:  # onnx2tf reports errors by exiting
        raise RuntimeError(f"onnx2tf exited with status {exc.code}") from None
    if model is None:
        raise RuntimeError("onnx2tf returned no model")
    signature = [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    archive = tf_keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=lambda *xs: {"output": model(list(xs))}, input_signature=signature)
    archive.write_out(saved_model)


_CALIBRATION_REPORT: dict = {}
CALIBRATION_THREADS = [2]


def _install_calibration() -> None:
    """Make the converter calibrate with :func:`export.tflite_calibration.calibrate_ranges`
    (XNNPACK, multi-threaded, free of the in-place range problem) instead of its own calibrator."""
    from tensorflow.lite.python.optimize import calibrator

    from .tflite_calibration import calibrate_ranges

    if getattr(calibrator.Calibrator.calibrate, "_gmcnn", False):
        return

    def calibrate(self, dataset_gen):
        data, report = calibrate_ranges(self._model_content, dataset_gen, threads=CALIBRATION_THREADS[0])
        _CALIBRATION_REPORT.clear()
        _CALIBRATION_REPORT.update(report)
        return data

    calibrate._gmcnn = True
    calibrator.Calibrator.calibrate = calibrate


def convert_precision(saved_model: str, precision: str, io: str, calibration) -> bytes:
    """TFLite converter from the saved_model for one precision (see docs/EXPORT.md)."""
    import numpy as np
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "int8-dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        images, masks = np.load(calibration["image"]), np.load(calibration["mask"])

        def representative():
            for i in range(images.shape[0]):
                yield {"image": images[i : i + 1], "mask": masks[i : i + 1]}

        _install_calibration()
        _CALIBRATION_REPORT.clear()
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io == "image":
            conv.inference_input_type = tf.uint8
            conv.inference_output_type = tf.uint8
    elif precision != "fp32":
        raise ValueError(f"unknown TFLite precision {precision!r}")
    return conv.convert()


def gpu_analysis(data: bytes) -> str:
    import tensorflow as tf

    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        tf.lite.experimental.Analyzer.analyze(model_content=data, gpu_compatibility=True)
    return out.getvalue()


def run_job(job: dict, events: _Events) -> None:
    from . import tflite_graph
    from .tflite import postprocess

    name = job["name"]
    t0 = time.time()
    events.send(event="stage", job=name, stage="onnx2tf")
    with _log_to(job["log"]):
        try:
            check_onnx(job["onnx"])
            run_onnx2tf(job["onnx"], job["saved_model"], job["cind"])
        except Exception as exc:
            traceback.print_exc()
            events.send(event="error", job=name, stage="onnx2tf", message=f"{type(exc).__name__}: {exc}", log=job["log"])
            return
    events.send(event="stage_done", job=name, stage="onnx2tf", seconds=round(time.time() - t0, 2))
    for art in job["artifacts"]:
        t1 = time.time()
        events.send(event="stage", job=name, stage=f"convert {art['precision']}", out=art["out"])
        with _log_to(job["log"]):
            try:
                raw = convert_precision(job["saved_model"], art["precision"], art["io"], art.get("calibration"))
                # the converter's own file, kept beside the saved_model for inspection and tests
                with open(os.path.join(os.path.dirname(job["saved_model"]), f"converter_{art['precision']}.tflite"), "wb") as f:
                    f.write(raw)
                before = tflite_graph.inventory(raw)
                final, report = postprocess(raw, art["precision"], art["io"], int8_tail=art.get("int8_tail", True),
                                            metadata=art.get("metadata"), pad_mode=art.get("pad_mode", "slices"),
                                            upsample_mode=art.get("upsample_mode", "resize"))
                if art["precision"] == "int8":
                    report["calibration"] = dict(_CALIBRATION_REPORT)
                analysis = gpu_analysis(final)
                tmp = art["out"] + ".part"
                with open(tmp, "wb") as f:
                    f.write(final)
                os.replace(tmp, art["out"])
            except Exception as exc:
                traceback.print_exc()
                events.send(event="error", job=name, stage=f"convert {art['precision']}", out=art["out"],
                            message=f"{type(exc).__name__}: {exc}", log=job["log"])
                continue
        events.send(event="artifact", job=name, out=art["out"], seconds=round(time.time() - t1, 2),
                    inventory_converter=before, postpass=report, analyzer=analysis)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        plan = json.load(f)
    events = _Events()
    t0 = time.time()
    CALIBRATION_THREADS[0] = int(plan.get("threads", 2))
    for job in plan["jobs"]:
        run_job(job, events)
    events.send(event="finished", seconds=round(time.time() - t0, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
