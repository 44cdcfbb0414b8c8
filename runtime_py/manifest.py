"""Export manifest (``DIR/manifest.json``): plain dataclasses, readable without heavy imports.

The export writes it; the runtime's engines read it to learn each artifact's fixed
shape, layout, I/O signature and quantization. The schema is documented in
docs/MANIFEST.md; ``SCHEMA_VERSION`` changes whenever a field changes meaning.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

from .errors import UserError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class TensorInfo:
    """One input or output tensor of an artifact.

    layout: ``NHWC`` (TFLite) or ``NCHW`` (Core ML tensor I/O) or ``HWC`` (Core ML image I/O).
    value_range: [lo, hi] of the float values, or [0, 255] for uint8 images.
    channel_order: ``RGB`` for images, ``mask`` for the mask tensor.
    mask_polarity: for masks, ``1=hole`` (float tensors) or ``255=hole`` (uint8), else "".
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
    precision: str  # fp32 | fp16 | int8-dynamic | int8 (TFLite); fp16 | w8 | palettized (Core ML)
    io: str  # tensor | image
    sha256: str
    bytes: int
    inputs: List[TensorInfo]
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
        raise UserError(f"manifest: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
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


def load_manifest(directory_or_file) -> Manifest:
    p = Path(directory_or_file)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise UserError(f"{p}: no export manifest here (run 'gmcnn-mobile export' first)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not valid JSON ({exc})") from None
    return manifest_from_dict(data)
