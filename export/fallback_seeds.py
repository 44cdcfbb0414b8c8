"""Fallback seed files: the layers an export's quantized files kept float, kept beside the checkpoint they were
found for, so that the next export of that checkpoint (or of one retrained from it) gates them first.

An earlier export's manifest seeds the fallback only where that export's folder is at hand (``--quant-fallback-
seeds``: by default the manifest a previous run left in the export folder). A fresh clone or a CI runner has none,
and its first full default export searches from scratch: 95-112 minutes on the project's 2-core AVX2 EPYC against
37-38 seeded (docs/EXPORT.md, "Export wall time"). A seed file carries what the seeds need, per (format, shape,
precision), from the first fallback file of that kind in a manifest: the layers kept float (with their inputs or
not), the branches kept float, the phase (whether its inputs were in channel groups), the sensitivity ranking and
the timed price. ``gmcnn-mobile fallback-seeds DIR`` writes one; the export reads
``CHECKPOINT_STEM.fallback-seeds.json`` beside its checkpoint when no earlier manifest seeds it. A seed is never
trusted: every file is gated as converted, and a seed that fails is followed by the file's own search.

File format (JSON, ``schema`` :data:`SCHEMA`, ``version`` :data:`VERSION`)::

    {"schema": ..., "version": 1, "created": the export's time (ISO 8601),
     "checkpoint": {"sha256": ..., "weights_sha256": ...},  # what the export was made from
     "files": [{"file": name, "format": "tflite", "shape": [rows, cols], "precision": "int8",
                "fallback": the manifest's build.quantization.fallback record, fields below only}]}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from runtime_py.errors import UserError

SCHEMA = "gmcnn-mobile fallback seeds"
VERSION = 1
SUFFIX = ".fallback-seeds.json"
# the parts of a manifest's fallback record export.fallback.seeds_from_manifest reads
RECORD_FIELDS = ("phase", "layers_kept_float", "inputs_kept_float", "ranking", "price")


@dataclass
class SeedArtifact:
    """One file's record, shaped as :class:`runtime_py.manifest.Artifact` is where the seeds read it."""
    file: str
    format: str
    shape: List[int]
    precision: str
    build: Dict[str, object]


@dataclass
class SeedSource:
    """A seed file read back, shaped as :class:`runtime_py.manifest.Manifest` is where the seeds read it."""
    path: Path
    created: str
    checkpoint: Dict[str, object]
    artifacts: List[SeedArtifact] = field(default_factory=list)


def seed_file_name(checkpoint: os.PathLike) -> Path:
    """The seed file of the checkpoint file ``checkpoint``: ``STEM.fallback-seeds.json`` beside it."""
    path = Path(checkpoint)
    return path.with_name(path.stem + SUFFIX)


def is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` is one checkpoint file (not a TF checkpoint's ``.index`` or ``.data-*`` part)."""
    return path.is_file() and path.suffix != ".index" and ".data-" not in path.name


def fallback_record(artifact) -> Optional[Dict[str, object]]:
    """A manifest artifact's ``build.quantization.fallback`` record; None for a file the fallback did not make."""
    return ((artifact.build or {}).get("quantization") or {}).get("fallback")


def seed_file_beside(checkpoint: Optional[os.PathLike]) -> Optional[Path]:
    """:func:`seed_file_name` of a checkpoint file (the default model's where ``checkpoint`` is None); None for
    anything else (a generator object, a TF checkpoint's prefix)."""
    from models import default_checkpoint  # the package imports no torch

    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        return None
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    return seed_file_name(path) if is_checkpoint_file(path) else None


def seed_file_content(manifest) -> Dict[str, object]:
    """The seed file of a manifest (:class:`runtime_py.manifest.Manifest`): the first fallback file of each
    (format, shape, precision), as export.fallback.seeds_from_manifest would take it. UserError where no file of the
    manifest went to the fallback."""
    files, kinds = [], set()
    for a in manifest.artifacts:
        record = fallback_record(a)
        kind = (a.format, tuple(a.shape), a.precision)
        if not record or kind in kinds:
            continue
        kinds.add(kind)
        kept = {k: record[k] for k in RECORD_FIELDS if k in record}
        branches = (record.get("branches") or {}).get("kept_float")
        if branches:
            kept["branches"] = {"kept_float": list(branches)}
        files.append({"file": a.file, "format": a.format, "shape": list(a.shape), "precision": a.precision,
                      "fallback": kept})
    if not files:
        raise UserError("no file of this export went to the quantization fallback: there is nothing to seed")
    checkpoint = manifest.checkpoint or {}
    return {"schema": SCHEMA, "version": VERSION, "created": manifest.created,
            "checkpoint": {"sha256": checkpoint.get("sha256"), "weights_sha256": checkpoint.get("weights_sha256")},
            "files": files}


def write_seed_file(manifest, path: os.PathLike) -> Path:
    """Write the seed file of ``manifest`` to ``path`` atomically (a temporary name beside it, then a rename)."""
    content = seed_file_content(manifest)
    target = Path(path)
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such folder")
    tmp = target.with_name(f".partial-{os.getpid()}-{target.name}")
    try:
        tmp.write_text(json.dumps(content, indent=1) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def is_seed_file(path: os.PathLike) -> bool:
    """Whether ``path`` is named as a seed file is (``*.fallback-seeds.json``), whether or not it exists."""
    return Path(path).name.endswith(SUFFIX)


def read_seed_file(path: os.PathLike) -> SeedSource:
    """The seed file at ``path``; UserError (one line, naming the file) when it is not one this code reads."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: no such seed file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not a readable seed file ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"{p}: not a fallback seed file (no schema {SCHEMA!r})")
    if data.get("version") != VERSION:
        raise UserError(f"{p}: seed file version {data.get('version')!r}, this code reads {VERSION}")
    try:
        artifacts = [SeedArtifact(f["file"], f["format"], [int(n) for n in f["shape"]], f["precision"],
                                  {"quantization": {"fallback": dict(f["fallback"])}}) for f in data["files"]]
        return SeedSource(p, str(data["created"]), dict(data["checkpoint"]), artifacts)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{p}: malformed seed file entry ({exc!r})") from None
