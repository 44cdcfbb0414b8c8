"""Checkpoint formats: the project's own, and import of the official ones.

* project format: one ``.safetensors`` file; weights in the generator's own
  parameter names, JSON metadata (:class:`GeneratorMeta`) in the header under
  ``gmcnn_mobile``. Weights may be stored as float16; they load as float32.
* official TF checkpoint: a directory with a ``checkpoint`` file, or a prefix
  (``snap-0`` with ``snap-0.index`` and ``snap-0.data-*``). ``inpaint_net/...``
  variables map by name onto the ``tf`` variant; discriminator and optimizer
  variables are ignored. Read with TensorFlow's checkpoint reader.
* official PyTorch generator ``.pth``: a state dict (``EB1.0.weight`` ...),
  loaded with ``weights_only=True`` so a checkpoint can never run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from runtime_py.errors import MissingDependencyError, UserError

from .gmcnn import GeneratorMeta, GMCNNGenerator, tf_layer_specs, tf_variable_scope

METADATA_KEY = "gmcnn_mobile"
FORMAT_VERSION = 1
TF_SCOPE = "inpaint_net"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def sha256_file(path: os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the artifact hash's recipe for a file, runtime_py.manifest)."""
    from runtime_py.manifest import artifact_digest

    return artifact_digest(path)[0]


def sha256_path(path: os.PathLike) -> str:
    """sha256 of a file, or of a TF checkpoint's files (index + data shards, in name order).

    A TF checkpoint hashes the same whether given as directory, prefix, ``.index`` or data shard.
    """
    p = Path(path)
    if p.is_file() and p.suffix != ".index" and ".data-" not in p.name:
        return sha256_file(p)
    prefix = resolve_tf_prefix(p)
    h = hashlib.sha256()
    for f in sorted(Path(prefix).parent.glob(Path(prefix).name + ".*")):
        if f.suffix == ".index" or ".data-" in f.name:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


# --------------------------------------------------------------------------- detection

def detect_format(path: os.PathLike) -> str:
    """``project``, ``tf`` or ``pth``; raises CheckpointError for anything else."""
    p = Path(path)
    if p.is_dir():
        if (p / "checkpoint").is_file() or any(p.glob("*.index")):
            return "tf"
        raise CheckpointError(f"{p}: a directory but not a TensorFlow checkpoint (no 'checkpoint' or '*.index' file)")
    if not p.exists():
        if Path(str(p) + ".index").is_file():
            return "tf"
        raise CheckpointError(f"{p}: no such checkpoint")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if p.suffix == ".index" or ".data-" in p.name:
        return "tf"
    # safetensors first: its header starts with an 8-byte little-endian length whose low byte may be 0x80,
    # the byte a pickle starts with (a legacy torch.save pickle has its magic number at byte 8, never '{')
    if len(head) >= 9 and head[8:9] == b"{":
        return "project"
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pth"  # zip-based torch.save, or a legacy pickle
    raise CheckpointError(
        f"{p}: unknown checkpoint layout (expected project .safetensors, TF checkpoint dir/prefix, or PyTorch .pth)"
    )


# ----------------------------------------------------------------------- project format

def save_checkpoint(gen: GMCNNGenerator, path: os.PathLike, dtype: str = "float32") -> Path:
    """Write ``gen`` in the project format, atomically. ``dtype``: float32 or float16."""
    import torch
    from safetensors.torch import save_file

    from runtime_py.imageio import default_file_mode

    target = {"float32": torch.float32, "float16": torch.float16}[dtype]
    tensors = {k: v.detach().to("cpu", target).contiguous() for k, v in gen.state_dict().items()}
    meta = gen.meta.to_dict()
    meta["format_version"] = FORMAT_VERSION
    meta["weights_dtype"] = dtype
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.chmod(tmp, default_file_mode())  # safetensors writes 0600 files; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_project_metadata(path: os.PathLike) -> dict:
    """The JSON metadata of a project checkpoint, without loading its weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without '{METADATA_KEY}' metadata: not a gmcnn-mobile checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata is not a JSON object")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this gmcnn-mobile reads ({FORMAT_VERSION})"
        )
    return meta


def _load_project(path: Path) -> Tuple[GeneratorMeta, Dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    raw_meta = read_project_metadata(path)
    try:
        meta = GeneratorMeta.from_dict(raw_meta)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete or invalid '{METADATA_KEY}' metadata ({exc})") from None
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: damaged safetensors file ({_first_line(exc)})") from None
    return meta, tensors


# --------------------------------------------------------------------------- TF import

def resolve_tf_prefix(path: os.PathLike) -> str:
    """The checkpoint prefix (``DIR/snap-0``) of a TF checkpoint directory, prefix or ``.index`` file.

    The ``checkpoint`` state file often records an absolute path from the machine
    that trained the model; the files in the directory the user gave win over it.
    """
    p = Path(path)
    if p.is_dir():
        state = p / "checkpoint"
        if state.is_file():
            m = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"))
            if m:
                recorded = Path(m.group(1))
                local = p / recorded.name
                if Path(str(local) + ".index").is_file():
                    return str(local)
                if recorded.is_absolute() and Path(str(recorded) + ".index").is_file():
                    return str(recorded)
                if not recorded.is_absolute():
                    return str(p / recorded)
        indexes = sorted(p.glob("*.index"))
        if not indexes:
            raise CheckpointError(f"{p}: no TensorFlow checkpoint in this directory")
        latest = max(indexes, key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)])
        return str(latest)[: -len(".index")]
    if p.suffix == ".index":
        return str(p)[: -len(".index")]
    if ".data-" in p.name:
        return str(p.parent / p.name[: p.name.index(".data-")])
    return str(p)


def _load_tf(path: Path) -> Tuple[GeneratorMeta, Dict[str, np.ndarray]]:
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingDependencyError("tensorflow", "export", "reading TensorFlow checkpoints") from None
    prefix = resolve_tf_prefix(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable TensorFlow checkpoint ({_first_line(exc)})") from None
    gen_vars = {k: v for k, v in shapes.items() if k.startswith(TF_SCOPE + "/") and "/Adam" not in k}
    if not gen_vars:
        raise CheckpointError(f"{path}: no '{TF_SCOPE}/' generator variables: not a GMCNN TF checkpoint")
    first_kernel = gen_vars.get(f"{TF_SCOPE}/b1conv1/kernel")
    if first_kernel is None or len(first_kernel) != 4:
        raise CheckpointError(f"{path}: missing generator variable {TF_SCOPE}/b1conv1/kernel")
    cnum = int(first_kernel[3])
    expected = {}
    for branch in tf_layer_specs(cnum).values():
        for s in branch:
            base = f"{TF_SCOPE}/{tf_variable_scope(s.name)}"
            expected[f"{base}/kernel"] = (f"{s.name}.weight", (s.kernel, s.kernel, s.in_channels, s.out_channels))
            expected[f"{base}/bias"] = (f"{s.name}.bias", (s.out_channels,))
    missing = sorted(set(expected) - set(gen_vars))
    unexpected = sorted(set(gen_vars) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{path}: generator variables do not match the tf variant at cnum {cnum} ({'; '.join(parts)})")
    tensors = {}
    for var, (key, shape) in expected.items():
        if tuple(gen_vars[var]) != shape:
            raise CheckpointError(f"{path}: {var} has shape {tuple(gen_vars[var])}, expected {shape} for cnum {cnum}")
        value = reader.get_tensor(var).astype(np.float32)
        tensors[f"net.layers.{key}"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    meta = GeneratorMeta(
        variant="tf", cnum=cnum, channel_order="bgr", train_size=(256, 256),
        source=str(path), description="imported from an official GMCNN TensorFlow checkpoint",
    )
    return meta, tensors


# -------------------------------------------------------------------------- pth import

def _load_pth(path: Path) -> Tuple[GeneratorMeta, Dict[str, np.ndarray]]:
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols other than 2 before it reads (and maybe refuses) the file;
            # the refusal below is the one line the user needs
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:  # e.g. "pickle data was truncated"
            raise CheckpointError(f"{path}: damaged or truncated PyTorch checkpoint ({_first_line(exc)})") from None
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"it calls {found.group(1)}" if found else "it holds objects other than tensors"
        raise CheckpointError(
            f"{path}: refused: {what}, which would run code when unpickled; "
            "only plain state dicts of tensors are loaded (weights_only=True)"
        ) from None
    except Exception as exc:  # zip, EOF, storage and stream errors of damaged files
        raise CheckpointError(f"{path}: damaged or truncated PyTorch checkpoint ({_first_line(exc)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors: unknown checkpoint layout")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    if "EB1.0.weight" not in state:
        raise CheckpointError(f"{path}: no 'EB1.0.weight': not a GMCNN PyTorch generator checkpoint")
    w = state["EB1.0.weight"]
    cnum, in_ch = int(w.shape[0]), int(w.shape[1])
    if in_ch != 4:
        raise CheckpointError(f"{path}: EB1.0.weight takes {in_ch} input channels; the torch variant takes 4")
    tensors = {f"net.{k}": v.float().numpy() for k, v in state.items()}
    meta = GeneratorMeta(
        variant="torch", cnum=cnum, channel_order="rgb", train_size=(256, 256),
        source=str(path), description="imported from an official GMCNN PyTorch checkpoint",
    )
    return meta, tensors


# ----------------------------------------------------------------------------- loading

def read_checkpoint(path: os.PathLike) -> Tuple[GeneratorMeta, Dict[str, np.ndarray]]:
    """(metadata, float32 weights keyed by GMCNNGenerator state-dict names) of any supported checkpoint."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "project":
        meta, tensors = _load_project(p)
    elif fmt == "tf":
        meta, tensors = _load_tf(p)
    else:
        meta, tensors = _load_pth(p)
    return meta, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def generator_from_weights(meta: GeneratorMeta, tensors: Dict[str, np.ndarray], origin: str = "") -> GMCNNGenerator:
    import torch

    try:
        gen = GMCNNGenerator(meta)
    except ValueError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None
    expected = gen.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{origin}: weights do not match the {meta.variant} variant at cnum {meta.cnum} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{origin}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    gen.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    return gen.eval()


def convert_checkpoint(src: os.PathLike, out: os.PathLike, dtype: str = "float32",
                       description: Optional[str] = None) -> Path:
    """Convert an official (or project) checkpoint into the project format (``description`` replaces the
    metadata's description when given, e.g. when a trained checkpoint becomes the shipped model)."""
    meta, tensors = read_checkpoint(src)
    meta.source = str(src)
    meta.source_sha256 = sha256_path(src)
    if description is not None:
        meta.description = description
    gen = generator_from_weights(meta, tensors, origin=str(src))
    return save_checkpoint(gen, out, dtype=dtype)
