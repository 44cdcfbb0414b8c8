"""Golden bundles: inputs and expected outputs of exported artifacts, for app developers' unit tests.

``write_bundle(artifacts_dir, out)`` checks every artifact of an export directory against its
manifest entry (sha256 and size; ``verify=False`` skips that), runs it on the host (TFLite in
LiteRT, Core ML in the reference executor off macOS) on fixed sample inputs and writes, in a
form an iOS or Android test reads without Python::

    BUNDLE/index.json                         what everything is (docs/COREML.md, "Golden bundles")
    BUNDLE/<folder>/case<k>/inputs/<name>.png|.bin      <folder>: the artifact's file name, '.' -> '_'
    BUNDLE/<folder>/case<k>/expected/<name>.png|.bin
    BUNDLE/pipeline/<NN>_<stage>.png|.bin     every stage of one sample pipeline run

Encoding: uint8 tensors whose layout is an image (N=1, H, W, C in {1, 3}) are PNG (lossless;
grayscale for C=1, RGB for C=3, batch axis dropped); everything else is a raw little-endian
buffer (``.bin``) of the listed dtype and shape, C order. Each tensor entry in index.json has
``name, role, file, encoding, dtype, shape, layout, value_range, channel_order, mask_polarity``
and, for expected outputs, ``tolerance = {max_abs, min_psnr_db, psnr_peak}``; a case's
``inputs`` are in the model's positional input order.

``compare_bundle(bundle, device_dir)`` reads outputs produced elsewhere -- written to the
same relative paths as the bundle's expected files, under ``device_dir`` -- and reports per
output: max abs difference, PSNR, NaN/Inf count and first index, pass/fail, and the tolerance
that would have passed; artifacts can be selected by format, precision or file name.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .contract import MASK_THRESHOLD, mask_pixels
from .errors import UserError
from .imageio import check_output_dir, default_file_mode, make_output_dir
from .tolerances import DEVICE

# 2: one folder per artifact file (extension included), inputs in positional order, sha256 by the
#    manifest's single recipe, pipeline settings recorded, unique stage names.
BUNDLE_SCHEMA = 2
INDEX_NAME = "index.json"
JSON_NOTE = ("strict JSON (RFC 8259): psnr_db is null when the outputs are identical (infinite PSNR; "
             "identical is then true); max_abs and psnr_db are null when nothing could be compared "
             "(missing or unreadable file, no finite values); nonfinite counts NaN/Inf values in the device "
             "output or the bundle, first_nonfinite is the index of the first (C order) or null")
MASK_KINDS = ("blob", "strokes", "rect")

#: Host run vs device run of the same artifact, per precision (the table and its reasons: runtime_py.tolerances).
DEVICE_TOLERANCES = DEVICE


# ------------------------------------------------------------------------ encoding

def _is_image_tensor(arr: np.ndarray) -> bool:
    """uint8 (H,W), (H,W,C) or (1,H,W,C) with C in {1, 3}: stored as PNG."""
    if arr.dtype != np.uint8:
        return False
    return arr.ndim == 2 or (arr.ndim in (3, 4) and arr.shape[-1] in (1, 3) and (arr.ndim == 3 or arr.shape[0] == 1))


def write_tensor(directory: Path, name: str, arr: np.ndarray) -> Tuple[str, str]:
    """Write ``arr`` as PNG (uint8 HWC / NHWC images) or a raw little-endian buffer; returns (file name, encoding)."""
    import cv2

    arr = np.asarray(arr)
    directory.mkdir(parents=True, exist_ok=True)
    if _is_image_tensor(arr):
        hwc = arr[0] if arr.ndim == 4 else (arr[:, :, None] if arr.ndim == 2 else arr)
        png = hwc[:, :, 0] if hwc.shape[2] == 1 else cv2.cvtColor(np.ascontiguousarray(hwc), cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(".png", np.ascontiguousarray(png))
        if not ok:
            raise RuntimeError(f"PNG encoding of {name} failed")
        (directory / f"{name}.png").write_bytes(data.tobytes())
        return f"{name}.png", "png"
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    (directory / f"{name}.bin").write_bytes(np.ascontiguousarray(le).tobytes())
    return f"{name}.bin", "raw"


def read_tensor(path: Path, entry: dict) -> np.ndarray:
    """Read a tensor written by :func:`write_tensor` (or by a device) as the index entry describes it."""
    import cv2

    shape = tuple(int(s) for s in entry["shape"])
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    if not path.is_file():
        raise FileNotFoundError(str(path))
    if entry["encoding"] == "png":
        img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise UserError(f"{path}: not a readable PNG")
        if img.dtype != np.uint8:
            raise UserError(f"{path}: a {img.dtype.itemsize * 8}-bit PNG; the bundle's PNGs are 8-bit")
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
        else:
            img = img[:, :, None]
        if img.size != int(np.prod(shape)):
            raise UserError(f"{path}: image is {img.shape[1]}x{img.shape[0]}x{img.shape[2]}, expected shape {list(shape)}")
        return img.reshape(shape)
    data = path.read_bytes()
    want = int(np.prod(shape)) * dtype.itemsize
    if len(data) != want:
        raise UserError(f"{path}: {len(data)} bytes, expected {want} ({entry['dtype']} {list(shape)}, little-endian)")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------------ sample inputs

def synthetic_photo(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic photo-like (H,W,3) uint8 RGB image: smooth colour fields, edges and texture."""
    import cv2

    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(xx / (9 + 7 * c) + yy / (13 + 5 * c) + seed) for c in range(3)], -1)
    for _ in range(6):  # a few flat shapes give the model edges to continue
        cy, cx = r.integers(0, height), r.integers(0, width)
        rad = int(r.integers(max(2, min(height, width) // 12), max(3, min(height, width) // 4)))
        cv2.circle(img, (int(cx), int(cy)), rad, tuple(float(v) for v in r.integers(0, 256, 3)), -1)
    img += r.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_case(shape: Tuple[int, int], k: int, seed: int, photos: Sequence[Path] = ()) -> Tuple[np.ndarray, np.ndarray, str]:
    """Case ``k`` at ``shape``: (image (H,W,3) uint8 RGB, hole (H,W) bool, source description)."""
    import cv2

    from .masks import make_mask

    h, w = shape
    if photos:
        src = photos[k % len(photos)]
        data = np.fromfile(str(src), np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise UserError(f"{src}: not a readable image")
        shrinking = bgr.shape[0] * bgr.shape[1] >= h * w
        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
        image, origin = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), src.name
    else:
        image, origin = synthetic_photo(h, w, seed + k), f"synthetic seed {seed + k}"
    kind = MASK_KINDS[k % len(MASK_KINDS)]
    hole = make_mask(kind, h, w, seed + k) > 0
    return image, hole, f"{origin}; {kind} mask seed {seed + k}"


# ------------------------------------------------------------------------ running artifacts

def artifact_folder(file: str) -> str:
    """The bundle folder of an artifact: its file name with '/' and '.' turned into '_' (so that
    ``x_fp16.tflite`` and ``x_fp16.mlpackage`` get different folders, and no folder of the bundle is
    itself named like a Core ML package, which Xcode would try to compile)."""
    return file.replace("/", "_").replace(".", "_")


def _value_range(arr: np.ndarray, declared) -> List[float]:
    if declared:
        return [float(v) for v in declared]
    return [0.0, 255.0] if arr.dtype == np.uint8 else [float(arr.min()), float(arr.max())]


def _tolerance(precision: str, arr: np.ndarray) -> dict:
    t = DEVICE_TOLERANCES.get(precision, DEVICE_TOLERANCES["int8"])
    if arr.dtype == np.uint8:
        return {"max_abs": float(t["max_abs_u8"]), "min_psnr_db": t["min_psnr_db"], "psnr_peak": 255.0}
    return {"max_abs": t["max_abs"], "min_psnr_db": t["min_psnr_db"], "psnr_peak": 2.0}


def _entry(role: str, name: str, arr: np.ndarray, rel_dir: str, file: str, encoding: str, info=None) -> dict:
    return {
        "name": name, "role": role, "file": f"{rel_dir}/{file}", "encoding": encoding,
        "dtype": str(arr.dtype), "shape": list(arr.shape),
        "layout": getattr(info, "layout", "") or ("NHWC" if arr.ndim == 4 and arr.shape[-1] in (1, 3) else "NCHW"),
        "value_range": _value_range(arr, getattr(info, "value_range", None)),
        "channel_order": getattr(info, "channel_order", ""), "mask_polarity": getattr(info, "mask_polarity", ""),
    }


def _artifact_cases(directory: Path, art, digest: Tuple[str, int], root: Path, cases: int, seed: int, photos,
                    threads) -> dict:
    """Run one artifact on ``cases`` sample inputs; ``digest`` is its (sha256, bytes), already checked."""
    from .engines import engine_for_artifact

    sha, size = digest
    engine = engine_for_artifact(directory, art, threads, verify=False).activate()
    folder = artifact_folder(art.file)
    infos = {t.name: t for t in list(art.inputs) + list(art.outputs)}
    out_cases = []
    try:
        for k in range(cases):
            image, hole, origin = sample_case(tuple(art.shape), k, seed, photos)
            feed = engine.make_feed(image, hole)  # in the engine's input order = the file's positional order
            outputs = engine.infer(feed)
            rel = f"{folder}/case{k}"
            case = {"name": f"case{k}", "source": origin, "inputs": [], "expected": []}
            for name, arr in feed.items():
                file, enc = write_tensor(root / rel / "inputs", name, arr)
                role = next((s.role for s in engine.input_specs() if s.name == name), "")
                case["inputs"].append(_entry(role, name, arr, f"{rel}/inputs", file, enc, infos.get(name)))
            for name, arr in outputs.items():
                arr = np.asarray(arr)
                file, enc = write_tensor(root / rel / "expected", name, arr)
                e = _entry("output", name, arr, f"{rel}/expected", file, enc, infos.get(name))
                e["tolerance"] = _tolerance(art.precision, arr)
                case["expected"].append(e)
            out_cases.append(case)
    finally:
        engine.deactivate()
    executor = engine.describe()
    if art.format == "coreml" and not _on_macos():
        from .mil_executor import EXECUTOR_NAME

        executor = f"{EXECUTOR_NAME} ({executor})"
    return {"artifact": art.file, "folder": folder, "sha256": sha, "bytes": size,
            "matches_manifest": sha == art.sha256 and size == art.bytes, "format": art.format,
            "precision": art.precision, "io": art.io, "shape": list(art.shape), "expected_from": executor,
            "cases": out_cases}


def _on_macos() -> bool:
    import platform

    return platform.system() == "Darwin"


def _pipeline_stages(directory: Path, manifest, root: Path, seed: int, photos, verify: bool) -> Optional[dict]:
    """Every stage of one baseline pipeline run over the export's preferred artifact, or None if no engine fits."""
    try:
        from .engines import open_engines
        from .pipeline import Pipeline, PipelineConfig
        from .trace import Trace
    except ImportError:
        return None
    choices = [(k, io) for io in ("tensor", "image")
               for k, fmt in (("tflite", "tflite"), ("coreml", "coreml"), ("onnxruntime", "onnx"))
               if any(a.format == fmt and a.io == io for a in manifest.artifacts)]
    if not choices:
        return None
    kind, io = choices[0]
    engines = open_engines(kind, artifacts=directory, io=io, verify=verify)
    base = engines.base_shape
    image, hole, origin = sample_case((base[0] * 5 // 4, base[1] * 5 // 4), 0, seed + 100, photos)
    config = PipelineConfig(mode="baseline")
    with tempfile.TemporaryDirectory(prefix="golden-trace-") as tmp:
        trace = Trace(tmp)
        try:
            result = Pipeline(engines, config, trace=trace).run(image, hole)
            used = sorted({(e.artifact.file, e.artifact.precision) for e in engines._open.values()})
        finally:
            engines.close()
        trace.finish()
        stages = []
        for st in trace.entries:
            arr = np.load(Path(tmp) / st["npy"])
            if arr.dtype == bool:
                arr = mask_pixels(arr)
            file, enc = write_tensor(root / "pipeline", f"{st['index']:02d}_{st['name']}", arr)
            stages.append({"index": st["index"], "name": st["name"], "file": f"pipeline/{file}", "encoding": enc,
                           "dtype": str(arr.dtype), "shape": list(arr.shape), "note": st.get("note", ""),
                           "layout": "HWC" if arr.ndim == 3 else "HW"})
    file, enc = write_tensor(root / "pipeline", "result", result.image)
    stats = result.stats
    return {"engine": engines.describe(), "artifacts": [f for f, _ in used],
            "precision": "/".join(sorted({p for _, p in used})), "io": io, "mode": config.mode,
            "model_shape": list(base), "crop": config.crop, "crop_window": stats.window, "tiles": config.tiles,
            "tiles_run": stats.tiles_run, "tiles_skipped": stats.tiles_skipped, "passes": stats.passes,
            "mask_threshold": MASK_THRESHOLD, "dilate_px": 0, "source": origin, "stages": stages,
            "result": {"file": f"pipeline/{file}", "encoding": enc, "dtype": "uint8", "shape": list(result.image.shape)},
            "note": f"masks are stored as 0/255 uint8 (255 = hole; a value >= {MASK_THRESHOLD} is hole, "
                    "no dilation); float stages are raw little-endian float32 in [0, 255]"}


def write_bundle(artifacts_dir, out, *, cases: int = 1, seed: int = 0, photos_dir=None, pipeline: bool = True,
                 threads: Optional[int] = None, progress: bool = True, verify: bool = True) -> Path:
    """Write a golden bundle for every artifact in ``artifacts_dir`` (an export directory) to ``out``.

    Each artifact is first checked against its manifest entry (sha256 and size; ``verify=False``
    runs modified files anyway and records their real digest). The bundle is assembled in a
    temporary folder next to ``out`` and renamed into place; a refusal or a model output holding
    NaN/Inf leaves nothing behind.
    """
    from .manifest import MANIFEST_NAME, check_artifact, load_manifest

    directory = Path(artifacts_dir)
    check_output_dir(out, "bundle folder")
    manifest = load_manifest(directory)
    if not manifest.artifacts:
        raise UserError(f"{directory}: the manifest lists no artifacts")
    folders = [artifact_folder(a.file) for a in manifest.artifacts]
    if len(set(folders)) != len(folders):
        raise UserError(f"{directory}: two artifacts of the manifest map to one bundle folder ({folders})")
    photos: List[Path] = []
    if photos_dir is not None:
        if not Path(photos_dir).is_dir():
            raise UserError(f"{photos_dir}: the --photos folder does not exist")
        photos = sorted(p for p in Path(photos_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
        if not photos:
            raise UserError(f"{photos_dir}: no photos here")
    # every file is checked before any work, so a refusal comes at once and leaves nothing behind
    digests = [check_artifact(directory / a.file, a, verify) for a in manifest.artifacts]
    out = Path(out)
    make_output_dir(out.parent, "bundle's parent folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, default_file_mode(directory=True))
    bar = _Progress(len(manifest.artifacts) + int(pipeline), progress)
    try:
        index = {"schema": BUNDLE_SCHEMA, "manifest_sha256": hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest(),
                 "checkpoint_sha256": manifest.checkpoint.get("sha256", ""),
                 "encoding": "png: lossless 8-bit RGB or grayscale, no batch axis; raw: little-endian, C order, shape as listed",
                 "artifacts": [], "pipeline": None}
        for art, digest in zip(manifest.artifacts, digests):
            bar(f"{art.format} {art.precision} {art.io} {art.shape[0]}x{art.shape[1]}")
            index["artifacts"].append(_artifact_cases(directory, art, digest, tmp, cases, seed, photos, threads))
        if pipeline:
            bar("pipeline stages")
            index["pipeline"] = _pipeline_stages(directory, manifest, tmp, seed, photos, verify)
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, allow_nan=False))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _Progress:
    """A progress bar on stderr when it is a terminal (tqdm ``disable=None``), removed when done or failed."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="golden", unit="step", file=sys.stderr, leave=False, disable=None)

    def __call__(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------ comparing

@dataclass
class CompareRow:
    artifact: str
    case: str
    output: str
    max_abs: Optional[float]  # over values finite on both sides; None when nothing was compared
    psnr_db: Optional[float]  # math.inf when identical
    tolerance: dict
    passed: bool
    note: str = ""
    nonfinite: int = 0  # NaN/Inf values in the device output or the expected one
    first_nonfinite: Optional[List[int]] = None  # index (C order) of the first of them


def load_index(bundle: Path) -> dict:
    from .manifest import read_json

    index_path = bundle / INDEX_NAME
    index = read_json(index_path, f"{bundle}: not a golden bundle (no {INDEX_NAME})")
    if not isinstance(index, dict) or index.get("schema") != BUNDLE_SCHEMA:
        schema = index.get("schema") if isinstance(index, dict) else None
        raise UserError(f"{index_path}: bundle schema {schema!r} is not supported (expected {BUNDLE_SCHEMA}); "
                        "write it again with 'gmcnn-mobile golden'")
    return index


def select_artifacts(index: dict, formats: Sequence[str] = (), precisions: Sequence[str] = (),
                     names: Sequence[str] = ()) -> List[dict]:
    """The index's artifacts matching every given filter (format, precision, file-name glob); UserError if none."""
    from fnmatch import fnmatchcase

    arts = index.get("artifacts")
    if not isinstance(arts, list):
        raise UserError(f"{INDEX_NAME}: 'artifacts' is not a list")
    picked = [a for a in arts if isinstance(a, dict)
              and (not formats or a.get("format") in formats)
              and (not precisions or a.get("precision") in precisions)
              and (not names or any(fnmatchcase(str(a.get("artifact", "")), n) for n in names))]
    if not picked:
        have = ", ".join(f"{a.get('artifact')} ({a.get('format')} {a.get('precision')})" for a in arts
                         if isinstance(a, dict)) or "none"
        raise UserError(f"no artifact of the bundle matches the selection; it has: {have}")
    return picked


def _first_index(mask: np.ndarray) -> List[int]:
    return [int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)]


def compare_output(got: np.ndarray, want: np.ndarray, tol: dict):
    """(max_abs, psnr_db, passed, nonfinite, first_nonfinite, note) of one device output against its expected one.

    NaN/Inf on either side fail the output and are counted; the differences are taken over the
    values finite on both sides. Works for any numeric content (empty arrays included)."""
    with np.errstate(all="ignore"):
        g, w = got.astype(np.float64), want.astype(np.float64)
        bad = ~(np.isfinite(g) & np.isfinite(w))
        nonfinite = int(bad.sum())
        diff = np.abs(g[~bad] - w[~bad])
        max_abs = float(diff.max()) if diff.size else None
        mse = float(np.mean(diff ** 2)) if diff.size else None
        peak = float(tol["psnr_peak"])
        psnr = None if mse is None else (math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse))
    note, first = "", None
    if nonfinite:
        first = _first_index(bad)
        dev, exp = int((~np.isfinite(g)).sum()), int((~np.isfinite(w)).sum())
        note = f"{nonfinite} NaN/Inf value(s) (device {dev}, bundle {exp}), first at {first}"
    elif max_abs is None:
        note = "empty output"
    ok = (nonfinite == 0 and max_abs is not None and psnr is not None
          and max_abs <= float(tol["max_abs"]) and psnr >= float(tol["min_psnr_db"]))
    return max_abs, psnr, bool(ok), nonfinite, first, note


def compare_bundle(bundle, device_dir, formats: Sequence[str] = (), precisions: Sequence[str] = (),
                   names: Sequence[str] = ()) -> List[CompareRow]:
    """Compare device outputs with the bundle's expected outputs, one row per expected output of the
    selected artifacts (all of them when no filter is given)."""
    bundle, device_dir = Path(bundle), Path(device_dir)
    index = load_index(bundle)
    if not device_dir.is_dir():
        raise UserError(f"{device_dir}: device output folder does not exist")
    rows = []
    try:
        for art in select_artifacts(index, formats, precisions, names):
            for case in art["cases"]:
                for e in case["expected"]:
                    rows.append(_compare_entry(bundle, device_dir, art["artifact"], case["name"], e))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{bundle / INDEX_NAME}: malformed entry ({type(exc).__name__}: {exc})") from None
    return rows


def _compare_entry(bundle: Path, device_dir: Path, artifact: str, case: str, e: dict) -> CompareRow:
    tol = e["tolerance"]
    for key in ("max_abs", "min_psnr_db", "psnr_peak"):
        float(tol[key])  # a malformed tolerance is a malformed index
    try:
        got = read_tensor(device_dir / e["file"], e)
    except FileNotFoundError:
        return CompareRow(artifact, case, e["name"], None, None, tol, False, f"missing: {e['file']}")
    except UserError as exc:
        return CompareRow(artifact, case, e["name"], None, None, tol, False, str(exc))
    try:
        want = read_tensor(bundle / e["file"], e)
    except (FileNotFoundError, UserError) as exc:
        return CompareRow(artifact, case, e["name"], None, None, tol, False, f"bundle file unusable: {exc}")
    max_abs, psnr, ok, nonfinite, first, note = compare_output(got, want, tol)
    return CompareRow(artifact, case, e["name"], max_abs, psnr, tol, ok, note, nonfinite, first)


def _finite_or_none(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def rows_to_json(rows: List[CompareRow], **header) -> str:
    """The rows as strict JSON (no NaN/Infinity tokens; see ``JSON_NOTE``), with ``header`` fields first."""
    out = []
    for r in rows:
        out.append({
            "artifact": r.artifact, "case": r.case, "output": r.output,
            "max_abs": _finite_or_none(r.max_abs), "psnr_db": _finite_or_none(r.psnr_db),
            "identical": r.psnr_db is not None and math.isinf(r.psnr_db) and r.psnr_db > 0,
            "nonfinite": r.nonfinite, "first_nonfinite": r.first_nonfinite, "passed": r.passed,
            "tolerance": {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in r.tolerance.items()},
            "note": r.note,
        })
    failed = sum(not r.passed for r in rows)
    body = {**header, "outputs": len(rows), "passed": len(rows) - failed, "failed": failed, "note": JSON_NOTE,
            "rows": out}
    return json.dumps(body, indent=2, allow_nan=False)


def _num(x, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return format(x, spec)


def format_table(rows: List[CompareRow]) -> str:
    """timm-style fixed-width table: artifact, case, output, max abs, PSNR, result, the tolerance that would pass."""
    head = ["artifact", "case", "output", "max_abs", "psnr_db", "result", "tolerance", "would_pass_at"]
    lines = []
    for r in rows:
        tol = f"max_abs<={_num(r.tolerance.get('max_abs'), 'g')}, psnr>={_num(r.tolerance.get('min_psnr_db'), 'g')}"
        result = "pass" if r.passed else "FAIL"
        if r.max_abs is None or r.nonfinite:
            lines.append([r.artifact, r.case, r.output, _num(r.max_abs), _num(r.psnr_db, ".2f"), result, tol, r.note])
            continue
        psnr_floor = r.psnr_db if math.isinf(r.psnr_db) else math.floor(r.psnr_db * 100) / 100
        would = f"max_abs<={_num(r.max_abs)}, psnr>={_num(psnr_floor, '.2f')}"
        lines.append([r.artifact, r.case, r.output, _num(r.max_abs), _num(r.psnr_db, ".2f"), result, tol, would])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*map(str, ln)) for ln in lines])
