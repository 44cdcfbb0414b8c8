"""The bad-input matrix: every command of the CLI, given bad or hostile input, answers with one
clear line on stderr and a non-zero exit, leaves nothing behind and changes none of its inputs.

Each case builds its inputs in a fresh folder (tiny models and generated files only), records the
sha256 of every file there and in the shared fixtures, runs the command with that folder as the
working directory and checks

* the exit status (2 for a refusal, 1 where ``compare`` reports failing outputs);
* stderr: exactly one line, ``gmcnn-mobile COMMAND: error: ...`` (or compare's failure line), no
  traceback, with the words the user needs -- Python warnings and what native libraries write to
  file descriptor 2 count as lines too;
* the case folder afterwards holds exactly the paths it held before (no output, no partial or
  temporary file, no empty folder) and every input is byte-identical.

Most cases call ``gmcnn_mobile.cli.main`` in-process (fd-level capture, warnings recorded as they
would be printed); a case runs in a subprocess where only a fresh interpreter shows the behaviour
(torch's pickle-protocol warning, LiteRT's once-per-process delegate notice), and the
unwritable-folder case runs the CLI as uid 65534.

The numbers in ``test_…[defectN-…]`` ids are the defects of issue 15.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import pytest

from helpers import (exif_payload, make_checkpoint, photo, png_chunk, png_with_exif, run_cli, write_photos,
                     write_shared_layout)

ROOT = Path(__file__).resolve().parents[1]
TOY_TFLITE = ROOT / "tests" / "data" / "runtime_tflite" / "tensor.tflite"  # 16x24, output = image*(1-m)+0.5m
DEMO_DIR = ROOT / "runtime_py" / "demo"
NOBODY = 65534


# --------------------------------------------------------------------------- generated files

def png_bytes(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose IHDR claims ``width`` x ``height`` RGB pixels and whose
    IDAT holds almost nothing: what a decompression bomb's header looks like."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 8x8 JPEG with its SOF0 size patched to ``width`` x ``height``."""
    data = bytearray(cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A real lossless 8x8 WebP wrapped in an extended (VP8X) header whose canvas is ``width`` x ``height``."""
    simple = cv2.imencode(".webp", np.full((8, 8, 3), 128, np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + simple[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian TIFF whose IFD0 states ``width`` x ``height`` 8-bit grey pixels in one strip of 64 bytes."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 4, height), (279, 4, 64)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8 + 64) + b"\x00" * 64 + ifd


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP whose BITMAPINFOHEADER states ``width`` x ``height`` 24-bit pixels, followed by 64 bytes of them."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 14 + 40) + info + b"\x00" * 64


def webp_with_exif(pixels: np.ndarray, orientation: int) -> bytes:
    """A lossless WebP of ``pixels`` (BGR) in the extended format with an ``EXIF`` chunk."""
    simple = cv2.imencode(".webp", pixels, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    h, w = pixels.shape[:2]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    exif = exif_payload(orientation)
    exif_chunk = b"EXIF" + struct.pack("<I", len(exif)) + exif + (b"\x00" if len(exif) % 2 else b"")
    body = b"WEBP" + vp8x + simple[12:] + exif_chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


class RunsCode:
    """Unpickling this calls ``os.system`` to create the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch '{self.sentinel}'",))


def plain_pickle_that_runs_code(path: Path, sentinel: Path) -> Path:
    """A legacy (non-zip) pickle, protocol 4: torch's weights-only loader warns about the protocol."""
    with open(path, "wb") as f:
        pickle.dump({"EB1.0.weight": 0.0, "x": RunsCode(sentinel)}, f, protocol=4)
    return path


def zip_pickle_that_runs_code(path: Path, sentinel: Path) -> Path:
    import torch

    torch.save({"EB1.0.weight": torch.zeros(4, 4, 7, 7), "x": RunsCode(sentinel)}, path)
    return path


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# ----------------------------------------------------------------------------- shared inputs

@dataclass
class Shared:
    """Inputs several cases read (never write): built once per module, hashed around every case."""

    root: Path
    ckpt: Path        # tiny tf generator, cnum 4
    export: Path      # export folder: the 16x24 toy TFLite model + a manifest describing it
    bundle: Path      # golden bundle of that export
    photo: Path       # 60x90 RGB PNG
    mask: Path        # 60x90 mask PNG with one rectangle

    def roots(self) -> List[Path]:
        return [self.root, DEMO_DIR]


def _toy_manifest(directory: Path) -> None:
    from runtime_py.manifest import SCHEMA_VERSION, artifact_digest

    sha256, size = artifact_digest(directory / "tensor.tflite")
    tensor = {"dtype": "float32", "layout": "NHWC", "value_range": [-1, 1]}
    art = {"file": "tensor.tflite", "format": "tflite", "shape": [16, 24], "precision": "fp32", "io": "tensor",
           "sha256": sha256, "bytes": size,
           "inputs": [{"name": "image", "shape": [1, 16, 24, 3], "role": "image", **tensor},
                      {"name": "mask", "shape": [1, 16, 24, 1], "role": "mask", "channel_order": "mask", **tensor}],
           "outputs": [{"name": "output", "shape": [1, 16, 24, 3], "role": "output", **tensor}]}
    manifest = {"schema_version": SCHEMA_VERSION, "checkpoint": {}, "tools": {}, "artifacts": [art]}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    ckpt = make_checkpoint(root / "tiny.safetensors")
    export = root / "export"
    export.mkdir()
    shutil.copy(TOY_TFLITE, export / "tensor.tflite")
    _toy_manifest(export)
    image = write(root / "photo.png", png_bytes(photo(60, 90)[:, :, ::-1]))
    hole = np.zeros((60, 90), np.uint8)
    hole[20:40, 30:60] = 255
    mask = write(root / "mask.png", png_bytes(hole))
    bundle = root / "bundle"
    rc, err = run_in_process(["golden", "--artifacts", export, "--out", bundle], root)
    assert rc == 0, err
    return Shared(root, ckpt, export, bundle, image, mask)


# --------------------------------------------------------------------------------- runners

def _visible(line: str) -> str:
    """A line as a terminal shows it: each carriage return starts overwriting from column 0 (how
    a progress bar redraws itself, and how tqdm's ``leave=False`` erases it with spaces)."""
    shown: List[str] = []
    for part in line.split("\r"):
        shown[: len(part)] = part
    return "".join(shown)


def _lines(text: str) -> List[str]:
    """The non-blank lines of ``text`` as a terminal shows them."""
    return [v for v in (_visible(line) for line in text.split("\n")) if v.strip()]


@contextlib.contextmanager
def _fd2_captured():
    """Everything written to file descriptor 2 (Python and native code alike) while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        box = {}
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            box["text"] = sink.read().decode(errors="replace")


def run_in_process(argv: Sequence, cwd: Path):
    """(exit status, stderr) of ``gmcnn-mobile ARGV`` run in this process in ``cwd``.

    stderr holds what Python code printed, what native code wrote to descriptor 2, and each warning
    that Python's default filters would print (pytest records warnings instead of printing them).
    An exception escaping ``main`` is returned as its traceback, so the case fails on it.
    """
    import traceback

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    here = os.getcwd()
    err = io.StringIO()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings(record=True) as caught, _fd2_captured() as native:
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
            try:
                rc, _, printed = run_cli(*argv)
                err.write(printed)
            except BaseException:  # noqa: BLE001 -- the case reports it as a traceback on stderr
                err.write(traceback.format_exc())
                rc = "exception"
    finally:
        os.chdir(here)
        for s, h in handlers.items():
            signal.signal(s, h)
    shown = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return rc, native["text"] + err.getvalue() + shown


def run_subprocess(argv: Sequence, cwd: Path):
    """(exit status, stderr) of the CLI in a fresh interpreter (what a user's shell shows)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
           "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "")}
    r = subprocess.run([sys.executable, "-m", "gmcnn_mobile", *map(str, argv)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


def run_as_nobody(argv: Sequence, cwd: Path):
    """(exit status, stderr) of the CLI run by uid 65534 in a forked child of this process.

    The tests run as root, for whom every folder is writable, so a permission problem can only be
    seen by another user. The interpreter lives under /root (unreadable to others), so the child is
    a fork that already has the code it needs imported, not a new interpreter. Not root: this user
    is already unprivileged and the case runs in-process.
    """
    if os.geteuid() != 0:
        return run_in_process(argv, cwd)
    import export.api  # noqa: F401 -- everything the child runs must be imported before it drops root
    from gmcnn_mobile.cli import build_parser, main

    build_parser()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        rc = 70
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            os.dup2(write_end, 1)
            sys.stderr = sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(write_end), "wb"), line_buffering=True)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except PermissionError:
                os._exit(77)
            os.chdir(cwd)
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(rc if isinstance(rc, int) else 70)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        text = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc == 77:
        pytest.skip("this machine does not let root switch to uid 65534")
    return rc, text


RUNNERS = {"in-process": run_in_process, "subprocess": run_subprocess, "nobody": run_as_nobody}


# ------------------------------------------------------------------------------ snapshots

def snapshot(roots: Sequence[Path]) -> Dict[str, str]:
    """Every path under ``roots`` (hidden ones included) -> sha256 of a file, 'dir' or 'link'."""
    seen = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                seen[os.path.join(dirpath, name)] = "dir"
            for name in filenames:
                p = os.path.join(dirpath, name)
                if os.path.islink(p):
                    seen[p] = "link"
                else:
                    with open(p, "rb") as f:
                        seen[p] = hashlib.sha256(f.read()).hexdigest()
    return seen


# ---------------------------------------------------------------------------------- cases

@dataclass
class Case:
    """``build(d, shared)`` makes the case's inputs in folder ``d`` and returns the argv."""

    id: str
    build: Callable[[Path, Shared], List]
    match: str                      # regex the error line must contain
    rc: int = 2
    runner: str = "in-process"
    line: str = r"gmcnn-mobile {command}: error: "  # how the one line starts
    outputs: Sequence[str] = ()     # paths (relative to d) the command may create: expected outputs
    check: Optional[Callable[[Path], None]] = None  # extra assertion on d afterwards
    marks: Sequence = field(default_factory=tuple)


def _ck(s: Shared) -> List:
    return ["--checkpoint", s.ckpt]


def _inpaint(s: Shared, image, mask, out="out.png", *extra) -> List:
    return ["inpaint", image, mask, "-o", out, *_ck(s), "--model-shape", "64x88", "--threads", "1", "--quiet", *extra]


def _sentinel_absent(d: Path) -> None:
    assert not (d / "code_ran").exists(), "loading the checkpoint ran its code"


def _rotated_pair(d: Path, maker, ext: str) -> List[Path]:
    """An image stored 30x20 (cols x rows) whose EXIF orientation 6 makes it 20x30 upright, and a mask of the
    stored size: refused only if the orientation is honoured."""
    stored = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = write(d / f"rotated{ext}", maker(stored, 6))
    mask = write(d / "stored_size_mask.png", png_bytes(np.full((20, 30), 255, np.uint8)))
    return [image, mask]


def _bomb_case(name: str, data_fn, role: str = "image") -> Callable:
    def build(d: Path, s: Shared) -> List:
        bomb = write(d / name, data_fn())
        return _inpaint(s, bomb, s.mask) if role == "image" else _inpaint(s, s.photo, bomb)
    return build


def _inpaint_tflite(d: Path, s: Shared, export: Path, *extra) -> List:
    return ["inpaint", s.photo, s.mask, "-o", d / "o.png", "--engine", "tflite", "--artifacts", export, "--crop", "off",
            "--quiet", *extra]


def _train(d: Path, photos: Path, *extra) -> List:
    return ["train", "--photos", photos, "--out", d / "run", "--cnum", "4", "--crop", "32", "--val-size", "32x32",
            "--val-masks-per-photo", "1", "--max-steps", "1", "--device", "cpu", *extra]


def _train_photos(d: Path, bad: Sequence[str] = ()) -> Path:
    """Two 48x48 photos, p0.png and p1.png, and undecodable files named ``bad``."""
    folder = write_photos(d / "photos", [(48, 48)] * 2, names=["p0.png", "p1.png"])
    for name in bad:
        write(folder / name, b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    return folder


def _file(d: Path, name: str = "a_file") -> Path:
    return write(d / name, b"a user's file\n")


def _unwritable(d: Path) -> Path:
    folder = d / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _device_copy(d: Path, s: Shared) -> Path:
    """Device outputs exactly as the bundle expects them (a copy of its expected files)."""
    dev = d / "device"
    shutil.copytree(s.bundle, dev)
    return dev


def _with_nan(folder: Path) -> Path:
    """``folder`` (a bundle or device outputs) with NaN in the first value of its first float32 expected output."""
    raw = sorted(folder.rglob("expected/*.bin"))[0]
    data = bytearray(raw.read_bytes())
    data[:4] = struct.pack("<f", float("nan"))
    raw.write_bytes(bytes(data))
    return folder


def _changed_export(d: Path, s: Shared, fill: float) -> Path:
    """A copy of the toy export whose one 0.5 constant (output = image*(1-mask) + 0.5*mask) is now ``fill``:
    a weight edited in place, same size, the manifest untouched."""
    export = d / "export"
    shutil.copytree(s.export, export)
    model = export / "tensor.tflite"
    data = model.read_bytes()
    assert data.count(struct.pack("<f", 0.5)) == 1
    model.write_bytes(data.replace(struct.pack("<f", 0.5), struct.pack("<f", fill)))
    return export


def _strict_json_rows(d: Path) -> None:
    """compare --json is written even when outputs fail, and is strict JSON (no NaN/Infinity tokens)."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads((d / "rows.json").read_text(), parse_constant=refuse)


#: torch's weights-only unpickler stops a protocol-4 pickle at its first FRAME, before reaching the callable
REFUSED_PICKLE = r"evil\.pth: refused: it holds objects other than tensors, which would run code"

CASES: List[Case] = [
    # ---------------------------------------------------------------------------- inspect
    Case("inspect-missing-file", lambda d, s: ["inspect", d / "nope.safetensors"], r"nope\.safetensors"),
    Case("inspect-random-bytes", lambda d, s: ["inspect", write(d / "x.safetensors", np.random.default_rng(0).bytes(4096))],
         r"x\.safetensors"),
    Case("inspect-truncated-checkpoint",
         lambda d, s: ["inspect", write(d / "half.safetensors", s.ckpt.read_bytes()[: s.ckpt.stat().st_size // 2])],
         r"half\.safetensors"),
    Case("inspect-folder-that-is-no-checkpoint", lambda d, s: ["inspect", (d / "empty_dir").mkdir() or d / "empty_dir"],
         r"empty_dir"),
    Case("defect9-inspect-plain-pickle-that-runs-code",
         lambda d, s: ["inspect", plain_pickle_that_runs_code(d / "evil.pth", d / "code_ran")],
         REFUSED_PICKLE, runner="subprocess", check=_sentinel_absent),
    # ------------------------------------------------------------------ convert-checkpoint
    Case("convert-zip-pickle-that-runs-code",
         lambda d, s: ["convert-checkpoint", zip_pickle_that_runs_code(d / "evil.pth", d / "code_ran"),
                       d / "out.safetensors"],
         r"refused", check=_sentinel_absent),
    Case("defect9-convert-plain-pickle-in-process",
         lambda d, s: ["convert-checkpoint", plain_pickle_that_runs_code(d / "evil.pth", d / "code_ran"),
                       d / "out.safetensors"],
         REFUSED_PICKLE, check=_sentinel_absent),
    Case("convert-output-is-the-source",
         lambda d, s: ["convert-checkpoint", shutil.copy(s.ckpt, d / "m.safetensors"), d / "m.safetensors"],
         r"source checkpoint"),
    Case("convert-output-not-safetensors", lambda d, s: ["convert-checkpoint", s.ckpt, d / "out.pth"],
         r"\.safetensors file"),
    Case("convert-output-under-a-file", lambda d, s: ["convert-checkpoint", s.ckpt, _file(d) / "out.safetensors"],
         r"a_file is a file, not a folder"),
    # --------------------------------------------------------------------- init-checkpoint
    Case("init-output-is-a-folder",
         lambda d, s: ["init-checkpoint", (d / "x.safetensors").mkdir() or d / "x.safetensors", "--cnum", "4"],
         r"names a folder"),
    Case("init-cnum-not-a-multiple", lambda d, s: ["init-checkpoint", d / "x.safetensors", "--cnum", "3"], r"cnum"),
    Case("init-unknown-variant", lambda d, s: ["init-checkpoint", d / "x.safetensors", "--variant", "keras"],
         r"invalid choice: 'keras'"),
    # ------------------------------------------------------------------------------- train
    Case("defect8-train-empty-photo-folder",
         lambda d, s: _train(d, (d / "photos").mkdir() or d / "photos"), r"no photos"),
    Case("train-photo-folder-missing", lambda d, s: _train(d, d / "nowhere"), r"not a directory of photos"),
    Case("train-undecodable-photo",
         lambda d, s: _train(d, _train_photos(d, bad=["broken.jpg"]), "--val-photos", "p0.png"),
         r"broken\.jpg: not a readable image"),
    Case("train-out-is-a-file",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png")[:3] + ["--out", _file(d)],
         r"names an existing file"),
    Case("train-crop-not-a-multiple-of-4",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png", "--crop", "30"), r"multiple of 4"),
    Case("train-resume-without-a-run",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png", "--resume"), r"last\.pt does not exist"),
    # ---------------------------------------------------------------------------- evaluate
    Case("train-validation-photo-also-held-out",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png", "--exclude-photos", "p0.png"),
         r"both held out and validated on: p0\.png"),
    Case("train-whole-size-not-a-multiple-of-4",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png", "--whole-fraction", "0.5",
                             "--whole-size", "30x40"), r"multiple of 4"),
    Case("train-hole-fraction-out-of-range",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png", "--max-hole", "1.5"),
         r"--max-hole and --hole-start must be fractions"),
    Case("train-peak-samples-not-an-npz",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png", "--peak-samples", _file(d)),
         r"a_file: not a samples file"),
    Case("train-init-from-missing-checkpoint",
         lambda d, s: _train(d, _train_photos(d), "--val-photos", "p0.png", "--init-from", d / "nope.safetensors"),
         r"nope\.safetensors"),
    # ---------------------------------------------------------------------------- evaluate
    Case("evaluate-photo-not-found",
         lambda d, s: ["evaluate", *_ck(s), "--data", s.root, "--names", "absent.jpg", "--size", "64x64"],
         r"not found in .*: absent\.jpg"),
    Case("evaluate-bad-size-text",
         lambda d, s: ["evaluate", *_ck(s), "--data", s.root, "--names", "photo.png", "--size", "64by64"],
         r"argument --size: expected ROWSxCOLS"),
    Case("evaluate-out-under-a-file",
         lambda d, s: ["evaluate", *_ck(s), "--data", s.root, "--names", "photo.png", "--size", "64x64",
                       "--out", _file(d) / "eval.json"],
         r"a_file is a file, not a folder"),
    Case("evaluate-garbage-checkpoint",
         lambda d, s: ["evaluate", "--checkpoint", write(d / "g.safetensors", b"\x00" * 100), "--data", s.root,
                       "--names", "photo.png", "--size", "64x64"],
         r"g\.safetensors"),
    # ------------------------------------------------------------------------- pack-photos
    Case("pack-photos-data-missing",
         lambda d, s: ["pack-photos", "--data", d / "nowhere", "--out", d / "packed", "--tree-mib", "0"],
         r"nowhere: not a directory of photos"),
    Case("pack-photos-without-the-validation-photos",
         lambda d, s: ["pack-photos", "--data", s.root, "--out", d / "packed", "--tree-mib", "0"],
         r"validation photos not in the folder"),
    Case("pack-photos-out-is-someone-elses-folder",
         lambda d, s: ["pack-photos", "--data", write_shared_layout(d / "data"), "--out",
                       _file(d / "mine", "keep.txt").parent, "--tree-mib", "0", "--long-side", "64"],
         r"mine exists and is not a packed photo folder"),
    Case("pack-photos-tree-over-the-limit",
         lambda d, s: ["pack-photos", "--data", s.root, "--out", d / "packed", "--tree-mib", "70"],
         r"nothing is left of the 64 MiB"),
    # ------------------------------------------------------------------------------ export
    Case("defect4-export-out-is-a-file", lambda d, s: ["export", *_ck(s), "--out", _file(d), "--formats", "tflite"],
         r"export folder names an existing file"),
    Case("defect4-export-out-under-a-file",
         lambda d, s: ["export", *_ck(s), "--out", _file(d) / "sub", "--formats", "tflite"],
         r"a_file is a file, not a folder"),
    Case("defect4-export-out-unwritable-as-non-root",
         lambda d, s: ["export", *_ck(s), "--out", _unwritable(d), "--formats", "tflite"],
         r"read_only: the export folder is not writable", runner="nobody"),
    Case("defect6-export-coreml-without-its-precisions",
         lambda d, s: ["export", *_ck(s), "--out", d / "exp", "--shapes", "64x96", "--formats", "tflite,coreml",
                       "--precisions", "fp32,int8"],
         r"no artifact for coreml .*coreml makes fp16, w8"),
    Case("export-shape-not-a-multiple-of-4",
         lambda d, s: ["export", *_ck(s), "--out", d / "exp", "--shapes", "63x96", "--formats", "tflite"],
         r"multiple of 4"),
    Case("export-unknown-precision",
         lambda d, s: ["export", *_ck(s), "--out", d / "exp", "--formats", "tflite", "--precisions", "int4"],
         r"unknown precision\(s\) int4"),
    Case("export-missing-checkpoint",
         lambda d, s: ["export", "--checkpoint", d / "nope.safetensors", "--out", d / "exp", "--formats", "tflite"],
         r"nope\.safetensors"),
    Case("export-bad-min-hole-psnr",
         lambda d, s: ["export", *_ck(s), "--out", d / "exp", "--formats", "tflite", "--min-hole-psnr", "fp32=20"],
         r"only int8-dynamic, int8 can be changed"),
    Case("export-memory-budget-not-positive",
         lambda d, s: ["export", *_ck(s), "--out", d / "exp", "--formats", "tflite", "--memory-budget-gib", "0"],
         r"--memory-budget-gib: must be a positive number"),
    # ----------------------------------------------------------------------------- fallback-seeds
    Case("fallback-seeds-export-folder-missing",
         lambda d, s: ["fallback-seeds", d / "nowhere", "--out", d / "m.fallback-seeds.json"], r"no export manifest"),
    Case("fallback-seeds-export-without-a-fallback-file",
         lambda d, s: ["fallback-seeds", s.export, "--out", d / "m.fallback-seeds.json"], r"nothing to seed"),
    Case("fallback-seeds-out-not-named-as-a-seed-file",
         lambda d, s: ["fallback-seeds", s.export, "--out", d / "seeds.json"], r"ends with \.fallback-seeds\.json"),
    Case("fallback-seeds-export-not-made-from-a-checkpoint-file", lambda d, s: ["fallback-seeds", s.export],
         r"not made from a checkpoint file; name the seed file with --out"),
    # ----------------------------------------------------------------------------- inpaint
    Case("defect3-inpaint-png-claiming-100000x100000", _bomb_case("bomb.png", lambda: png_claiming(100000, 100000)),
         r"header claims 100000x100000 pixels"),
    Case("defect3-inpaint-png-claiming-20000x20000", _bomb_case("bomb.png", lambda: png_claiming(20000, 20000)),
         r"header claims 20000x20000 pixels"),  # under OpenCV's own limit (2^30): only ours stops it
    Case("defect3-inpaint-jpeg-claiming-65000x65000", _bomb_case("bomb.jpg", lambda: jpeg_claiming(65000, 65000)),
         r"header claims 65000x65000 pixels"),
    Case("defect3-inpaint-webp-claiming-100000x100000", _bomb_case("bomb.webp", lambda: webp_claiming(100000, 100000)),
         r"header claims 100000x100000 pixels"),
    Case("defect3-inpaint-tiff-claiming-100000x100000", _bomb_case("bomb.tif", lambda: tiff_claiming(100000, 100000)),
         r"header claims 100000x100000 pixels"),
    Case("defect3-inpaint-bmp-claiming-100000x100000", _bomb_case("bomb.bmp", lambda: bmp_claiming(100000, 100000)),
         r"header claims 100000x100000 pixels"),
    Case("defect3-inpaint-mask-claiming-100000x100000",
         _bomb_case("bomb_mask.png", lambda: png_claiming(100000, 100000), role="mask"),
         r"mask's header claims 100000x100000"),
    Case("inpaint-truncated-png",
         lambda d, s: _inpaint(s, write(d / "half.png", s.photo.read_bytes()[: s.photo.stat().st_size // 2]), s.mask),
         r"half\.png: cannot decode the image"),  # libpng writes its own line to fd 2 unless silenced
    Case("inpaint-empty-image-file", lambda d, s: _inpaint(s, write(d / "zero.png", b""), s.mask), r"empty \(0 bytes\)"),
    Case("defect5-inpaint-summary-json-is-a-folder",
         lambda d, s: _inpaint(s, s.photo, s.mask, d / "out.png", "--summary-json", (d / "sj").mkdir() or d / "sj"),
         r"--summary-json file names a folder"),
    Case("defect7-inpaint-png-exif-orientation-honoured",
         lambda d, s: _inpaint(s, *_rotated_pair(d, png_with_exif, ".png")),
         r"mask is 30x20 but the image is 20x30 \(after EXIF orientation\)"),
    Case("defect7-inpaint-webp-exif-orientation-honoured",
         lambda d, s: _inpaint(s, *_rotated_pair(d, webp_with_exif, ".webp")),
         r"mask is 30x20 but the image is 20x30 \(after EXIF orientation\)"),
    Case("inpaint-output-is-a-folder",
         lambda d, s: _inpaint(s, s.photo, s.mask, (d / "o.png").mkdir() or d / "o.png"), r"names a folder"),
    Case("inpaint-output-would-overwrite-the-image",
         lambda d, s: _inpaint(s, shutil.copy(s.photo, d / "p.png"), s.mask, d / "p.png"), r"would overwrite the input"),
    Case("inpaint-output-under-a-file", lambda d, s: _inpaint(s, s.photo, s.mask, _file(d) / "o.png"),
         r"cannot write the output: .*a_file is a file, not a folder"),
    Case("inpaint-mask-of-another-size",
         lambda d, s: _inpaint(s, s.photo, write(d / "small.png", png_bytes(np.zeros((10, 10), np.uint8)))),
         r"must be the same size"),
    Case("inpaint-checkpoint-that-runs-code",
         lambda d, s: ["inpaint", s.photo, s.mask, "-o", d / "o.png", "--checkpoint",
                       plain_pickle_that_runs_code(d / "evil.pth", d / "code_ran"), "--quiet"],
         REFUSED_PICKLE, check=_sentinel_absent),
    Case("defect1-inpaint-changed-artifact",
         lambda d, s: _inpaint_tflite(d, s, _changed_export(d, s, 0.25)),
         r"tensor\.tflite: not the artifact the manifest describes: sha256 [0-9a-f]{64}"),
    Case("defect1-inpaint-nan-weights-with-the-check-skipped",
         lambda d, s: _inpaint_tflite(d, s, _changed_export(d, s, float("nan")), "--allow-modified-artifacts"),
         r"tflite engine: .*tensor\.tflite: output '\w+' has \d+ NaN/Inf value",
         runner="subprocess"),  # LiteRT announces its delegate on fd 2 once per process: only a fresh one shows it
    Case("inpaint-tflite-engine-without-artifacts",
         lambda d, s: ["inpaint", s.photo, s.mask, "-o", d / "o.png", "--engine", "tflite"], r"needs --artifacts DIR"),
    Case("inpaint-tflite-precision-not-exported",
         lambda d, s: ["inpaint", s.photo, s.mask, "-o", d / "o.png", "--engine", "tflite", "--artifacts", s.export,
                       "--precision", "int8"],
         r"no tflite tensor artifact at precision int8"),
    Case("inpaint-bad-model-shape-text", lambda d, s: _inpaint(s, s.photo, s.mask, d / "o.png", "--model-shape", "64"),
         r"expected ROWSxCOLS"),
    # -------------------------------------------------------------------------------- demo
    Case("defect4-demo-out-dir-is-a-file", lambda d, s: ["demo", *_ck(s), "--out-dir", _file(d)],
         r"--out-dir folder names an existing file"),
    Case("defect4-demo-out-dir-under-a-file", lambda d, s: ["demo", *_ck(s), "--out-dir", _file(d) / "sub"],
         r"a_file is a file, not a folder"),
    Case("demo-missing-checkpoint-leaves-no-folder",
         lambda d, s: ["demo", "--checkpoint", d / "nope.safetensors", "--out-dir", d / "new" / "demo_out", "--quiet"],
         r"nope\.safetensors"),
    # ------------------------------------------------------------------------------ golden
    Case("golden-folder-without-manifest",
         lambda d, s: ["golden", "--artifacts", (d / "exp").mkdir() or d / "exp", "--out", d / "b"],
         r"no export manifest here"),
    Case("golden-out-is-a-file", lambda d, s: ["golden", "--artifacts", s.export, "--out", _file(d)],
         r"bundle folder names an existing file"),
    Case("golden-zero-cases", lambda d, s: ["golden", "--artifacts", s.export, "--out", d / "b", "--cases", "0"],
         r"argument --cases: must be at least 1"),
    Case("golden-photos-folder-missing",
         lambda d, s: ["golden", "--artifacts", s.export, "--out", d / "b", "--photos", d / "nowhere"],
         r"--photos folder does not exist"),
    Case("defect1-golden-changed-artifact",
         lambda d, s: ["golden", "--artifacts", _changed_export(d, s, 0.25), "--out", d / "b"],
         r"tensor\.tflite: not the artifact the manifest describes"),
    Case("golden-corrupt-manifest",
         lambda d, s: ["golden", "--artifacts", write(d / "exp" / "manifest.json", "{not json").parent, "--out", d / "b"],
         r"not valid JSON"),
    # ----------------------------------------------------------------------------- compare
    Case("compare-folder-without-index", lambda d, s: ["compare", d, _device_copy(d, s)], r"not a golden bundle"),
    Case("compare-device-folder-missing", lambda d, s: ["compare", s.bundle, d / "nowhere"],
         r"device output folder does not exist"),
    Case("defect2-compare-nan-in-device-outputs",
         lambda d, s: ["compare", s.bundle, _with_nan(_device_copy(d, s)), "--json", d / "rows.json"],
         r"1 output\(s\) failed", rc=1, line=r"gmcnn-mobile compare: ", outputs=["rows.json"], check=_strict_json_rows),
    Case("defect2-compare-nan-in-the-bundle",
         lambda d, s: ["compare", _with_nan(shutil.copytree(s.bundle, d / "bundle")), _device_copy(d, s),
                       "--json", d / "rows.json"],
         r"1 output\(s\) failed", rc=1, line=r"gmcnn-mobile compare: ", outputs=["rows.json"], check=_strict_json_rows),
    Case("compare-json-under-a-file",
         lambda d, s: ["compare", s.bundle, _device_copy(d, s), "--json", _file(d) / "rows.json"],
         r"cannot write the --json file: .*a_file is a file, not a folder"),
    # ------------------------------------------------------------------------------- bench
    Case("defect1-bench-changed-artifact",
         lambda d, s: ["bench", "--artifacts", _changed_export(d, s, 0.25), "--out", d / "br", "--sections", "latency"],
         r"tensor\.tflite: not the artifact the manifest describes"),  # before any measurement or output folder
    Case("bench-folder-without-manifest",
         lambda d, s: ["bench", "--artifacts", (d / "exp").mkdir() or d / "exp", "--out", d / "br", "--sections", "latency"],
         r"no export manifest here"),
    Case("bench-out-is-a-file",
         lambda d, s: ["bench", "--artifacts", s.export, "--out", _file(d), "--sections", "latency"],
         r"--out folder names an existing file"),
    Case("bench-unknown-section",
         lambda d, s: ["bench", "--artifacts", s.export, "--out", d / "br", "--sections", "speed"],
         r"argument --sections: speed: choose from latency, pipeline, quality"),
    Case("bench-zero-runs",
         lambda d, s: ["bench", "--artifacts", s.export, "--out", d / "br", "--sections", "latency", "--runs", "0"],
         r"argument --runs: must be at least 1"),
]


def _command(argv: Sequence) -> str:
    return str(argv[0])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, shared: Shared, tmp_path: Path):
    d = tmp_path / "case"
    d.mkdir()
    if case.runner == "nobody":  # uid 65534 must reach the folder: pytest's own tmp folders are private to root
        d = Path(tempfile.mkdtemp(prefix="gmcnn-bad-input-"))
        d.chmod(0o755)
    try:
        argv = case.build(d, shared)
        before = snapshot([d, *shared.roots()])
        rc, err = RUNNERS[case.runner](argv, d)
        after = snapshot([d, *shared.roots()])
    finally:
        if case.runner == "nobody":
            shutil.rmtree(d, ignore_errors=True)

    lines = _lines(err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert re.match(case.line.format(command=re.escape(_command(argv))), line), line
    assert re.search(case.match, line), f"{case.match!r} not in {line!r}"
    assert rc == case.rc, f"exit status {rc}, expected {case.rc}: {line}"

    allowed = {str(d / o) for o in case.outputs}
    new = sorted(p for p in set(after) - set(before) if p not in allowed)
    assert not new, f"left behind: {new}"
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"inputs changed or removed: {changed}"
    if case.check is not None:
        case.check(d)


def _command_of_id(case_id: str) -> str:
    """Case ids are ``COMMAND-what`` or ``defectN-COMMAND-what``."""
    word = case_id.split("-")[1] if case_id.startswith("defect") else case_id.split("-")[0]
    return {"init": "init-checkpoint", "convert": "convert-checkpoint", "pack": "pack-photos",
            "fallback": "fallback-seeds"}.get(word, word)


def test_the_matrix_covers_every_command():
    from gmcnn_mobile.cli import build_parser

    parser = build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "command").choices)
    covered = {_command_of_id(c.id) for c in CASES}
    assert covered <= commands, f"case ids naming no command: {sorted(covered - commands)}"
    assert commands <= covered, f"commands without a bad-input case: {sorted(commands - covered)}"
    assert len(CASES) >= 40
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
