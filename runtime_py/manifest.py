"""Export manifest (``DIR/manifest.json``): plain dataclasses, readable without heavy imports.

The export writes it; the runtime's engines read it to learn each artifact's fixed
shape, layout, I/O signature and quantization, and check each file against its entry
(:func:`check_artifact`) before running it. The schema is documented in docs/MANIFEST.md;
``SCHEMA_VERSION`` changes whenever a field changes meaning.

:func:`artifact_digest` is the one definition of an artifact's ``sha256`` and ``bytes``
(a file's plain sha256; for an ``.mlpackage`` directory a digest of a ``sha256sum``-style
listing of its files), used by the export that writes the manifest and by every reader.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import UserError

# 2: an .mlpackage's sha256 is the documented listing digest (1 had two undocumented recipes),
#    and inputs/outputs are listed in the file's own positional order.
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
MASK_POLARITY_FLOAT = "1=hole"  # float32 mask tensors: 1 = hole, 0 = known
MASK_POLARITY_U8 = "255=hole (>=128)"  # uint8 masks: 255 = hole; any value from 128 up counts as hole
SKIP_CHECK_FLAG = "--allow-modified-artifacts"


@dataclass
class TensorInfo:
    """One input or output tensor of an artifact.

    layout: ``NHWC`` (TFLite) or ``NCHW`` (Core ML tensor I/O) or ``HWC`` (Core ML image I/O).
    value_range: [lo, hi] of the float values, or [0, 255] for uint8 images.
    channel_order: ``RGB`` for images, ``mask`` for the mask tensor.
    mask_polarity: for masks, ``MASK_POLARITY_FLOAT`` (float tensors) or ``MASK_POLARITY_U8`` (uint8), else "".
    quantization: {"scale": float, "zero_point": int} for quantized tensors, else {}.
    """

    name: str
    shape: List[int]
    dtype: str
    layout: str
    value_range: List[float]
    channel_order: str = "RGB"
    mask_polarity: str = ""
    quantization: Dict[str, float] = field(default_factory=dict)
    role: str = ""  # image | mask | output


@dataclass
class ParityResult:
    """How an artifact compared with PyTorch fp32 at the same shape, on held-out photos."""

    executor: str  # e.g. "litert-2.1.0 (xnnpack, 2 threads)", "coreml-reference-executor", "structural-only"
    samples: int = 0
    max_abs: Optional[float] = None
    mean_abs: Optional[float] = None
    hole_psnr_db: Optional[float] = None
    composite_psnr_db: Optional[float] = None
    tolerance: Dict[str, float] = field(default_factory=dict)
    passed: bool = False
    note: str = ""
    details: Dict[str, object] = field(default_factory=dict)  # per-sample PSNRs, known pixels changed, ...


@dataclass
class Artifact:
    """One exported file (or .mlpackage directory)."""

    file: str  # relative to the manifest's directory
    format: str  # tflite | coreml
    shape: List[int]  # [rows, cols]
    precision: str  # fp32 | fp16 | int8-dynamic | int8 | int16x8 (TFLite); fp16 | w8 | palettized | w8a8 (Core ML)
    io: str  # tensor | image
    sha256: str  # artifact_digest(file)[0]
    bytes: int  # artifact_digest(file)[1]
    inputs: List[TensorInfo]  # in the file's positional input order (inputs[i] is input i)
    outputs: List[TensorInfo]
    op_inventory: Dict[str, object] = field(default_factory=dict)
    parity: Optional[ParityResult] = None
    build: Dict[str, object] = field(default_factory=dict)  # pad_mode, calibration, conversion seconds, ...
    cache_key: str = ""  # content hash of everything the file depends on; equal key -> file reused

    @property
    def height(self) -> int:
        return int(self.shape[0])

    @property
    def width(self) -> int:
        return int(self.shape[1])


@dataclass
class Manifest:
    schema_version: int
    checkpoint: Dict[str, object]  # path, sha256, meta (GeneratorMeta as dict), parameters
    tools: Dict[str, str]
    artifacts: List[Artifact] = field(default_factory=list)
    created: str = ""
    export: Dict[str, object] = field(default_factory=dict)  # options and timing of the run that wrote it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def find(self, fmt: str, shape, precision: str, io: str = "tensor") -> Artifact:
        want = [int(shape[0]), int(shape[1])]
        for a in self.artifacts:
            if a.format == fmt and a.shape == want and a.precision == precision and a.io == io:
                return a
        raise UserError(f"no {fmt} {precision} {io} artifact at {want[0]}x{want[1]} in the manifest")


def _build(cls, data):
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise UserError(f"manifest: unknown {cls.__name__} field(s) {sorted(unknown)}")
    return cls(**data)


def manifest_from_dict(data: dict) -> Manifest:
    """Validate and build a Manifest; raises UserError naming the first problem."""
    if not isinstance(data, dict):
        raise UserError("manifest: top level is not an object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"manifest: schema_version {version!r} is not supported (expected {SCHEMA_VERSION}); "
                        "re-run 'gmcnn-mobile export' to rewrite it")
    try:
        arts = []
        for a in data.get("artifacts", []):
            a = dict(a)
            a["inputs"] = [_build(TensorInfo, t) for t in a["inputs"]]
            a["outputs"] = [_build(TensorInfo, t) for t in a["outputs"]]
            if a.get("parity") is not None:
                a["parity"] = _build(ParityResult, a["parity"])
            arts.append(_build(Artifact, a))
        body = {k: v for k, v in data.items() if k != "artifacts"}
        m = _build(Manifest, body)
    except (KeyError, TypeError) as exc:
        raise UserError(f"manifest: malformed entry ({exc})") from None
    m.artifacts = arts
    return m


def read_json(path: Path, missing: str):
    """The JSON document in ``path`` (a manifest, a bundle index); UserError ``missing`` when there is no such
    file, and one naming the file when it is not JSON."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def load_manifest(directory_or_file) -> Manifest:
    p = Path(directory_or_file)
    if p.is_dir():
        p = p / MANIFEST_NAME
    return manifest_from_dict(read_json(p, f"{p}: no export manifest here (run 'gmcnn-mobile export' first)"))


# ------------------------------------------------------------------------ artifact hash

def _listing_path(root: Path, f: Path) -> str:
    rel = f.relative_to(root).as_posix()
    if "\n" in rel or "\\" in rel:
        raise UserError(f"{root}: file name {rel!r} holds a newline or backslash, which the artifact hash does not allow")
    return rel


def artifact_digest(path: os.PathLike) -> Tuple[str, int]:
    """(sha256 hex, bytes) of an artifact: the recipe docs/MANIFEST.md ("Artifact hash") states.

    A file: the sha256 of its bytes, and its size. A directory (``.mlpackage``): every regular
    file below it, named by its path relative to the directory with ``/`` separators (UTF-8),
    sorted by those UTF-8 bytes; the listing ``"<sha256 hex of the file>  <path>\\n"`` per file
    (the format of ``sha256sum``, two spaces) is hashed, and ``bytes`` is the sum of the file
    sizes. Empty directories add nothing; a symbolic link inside a package is refused.
    """
    p = Path(path)
    if p.is_file():
        h = hashlib.sha256()
        size = 0
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                size += len(block)
        return h.hexdigest(), size
    if not p.is_dir():
        raise UserError(f"{p}: artifact not found")
    entries = []
    for dirpath, dirnames, filenames in os.walk(p):
        for name in dirnames + filenames:
            f = Path(dirpath) / name
            if f.is_symlink():
                raise UserError(f"{f}: a symbolic link inside an artifact package is not allowed")
        for name in filenames:
            f = Path(dirpath) / name
            entries.append((_listing_path(p, f).encode("utf-8"), f))
    listing = hashlib.sha256()
    size = 0
    for rel, f in sorted(entries, key=lambda e: e[0]):
        digest, n = artifact_digest(f)
        listing.update(digest.encode("ascii") + b"  " + rel + b"\n")
        size += n
    return listing.hexdigest(), size


class ArtifactMismatch(UserError):
    """An artifact file is not the one its manifest entry describes."""


def check_artifact(path: os.PathLike, art: Artifact, verify: bool = True) -> Tuple[str, int]:
    """Digest ``path`` and, when ``verify``, refuse it unless sha256 and size equal ``art``'s.

    Returns the file's (sha256, bytes). Raises UserError when the file is missing and
    :class:`ArtifactMismatch` (one line naming the file and both digests) when it differs.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: artifact listed in the manifest is missing")
    sha, size = artifact_digest(p)
    if verify and (sha != art.sha256 or size != art.bytes):
        raise ArtifactMismatch(
            f"{p}: not the artifact the manifest describes: sha256 {sha} ({size} bytes), manifest {art.sha256} "
            f"({art.bytes} bytes); re-export it, or pass {SKIP_CHECK_FLAG} to use it anyway")
    return sha, size
