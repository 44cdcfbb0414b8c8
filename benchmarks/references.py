"""The PyTorch checkpoint behind an export, and an ONNX file of it for ONNX Runtime.

ONNX is written by the export's own ONNX step (``export.onnx_export``: TorchScript exporter at
opset 17, the ``tensor`` signature, not simplified) at one fixed shape; inputs ``image``
(1,3,H,W) float32 RGB in [-1, 1] and ``mask`` (1,1,H,W) float32 1 = hole, output
(1,3,H,W) float32 RGB in [-1, 1]. Files are cached by checkpoint hash and shape.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence


def resolve_checkpoint(manifest, artifacts_dir: Path, override: Optional[os.PathLike] = None) -> Optional[Path]:
    """The checkpoint to benchmark beside the artifacts: ``override``, else the manifest's recorded path
    (absolute, or relative to the artifacts directory), else the shipped default; None when none exists."""
    candidates = []
    if override:
        candidates.append(Path(override))
    recorded = (manifest.checkpoint or {}).get("path") if manifest is not None else None
    if recorded:
        p = Path(str(recorded))
        candidates += [p, artifacts_dir / p] if not p.is_absolute() else [p]
    if not override:
        from models import default_checkpoint

        candidates.append(default_checkpoint())
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def export_onnx(checkpoint: os.PathLike, shape: Sequence[int], cache_dir: Path) -> Path:
    """ONNX fp32 file of ``checkpoint`` at ``shape`` (rows, cols), reused from ``cache_dir`` when present."""
    h, w = int(shape[0]), int(shape[1])
    from models.checkpoint import sha256_path

    digest = sha256_path(checkpoint)[:16]
    out = Path(cache_dir) / f"gmcnn_{digest}_{h}x{w}.onnx"
    if out.is_file():
        return out
    from export.onnx_export import export_onnx as write_onnx
    from export.wrappers import wrap
    from models import load_generator

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.onnx")
    write_onnx(wrap(load_generator(checkpoint), "tensor"), "tensor", (h, w), tmp, simplify=False)
    os.replace(tmp, out)
    return out


def model_macs(checkpoint: os.PathLike, shape: Sequence[int]) -> int:
    """Convolution multiply-accumulates of one forward pass of ``checkpoint`` at ``shape``."""
    from models import load_generator
    from models.gmcnn import count_macs

    return int(count_macs(load_generator(checkpoint), int(shape[0]), int(shape[1])))
