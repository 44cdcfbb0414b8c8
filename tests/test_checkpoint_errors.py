"""Unusable checkpoints: one clear error each, through the API and the CLI, with nothing left behind."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.checkpoint import CheckpointError, detect_format

from gmcnn_reference import random_tf_weights, reference_torch_gmcnn, write_tf_checkpoint
from helpers import run_cli


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith(f"gmcnn-mobile {command}: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def good_project(tmp_path_factory):
    return models.save_checkpoint(models.build_generator("tf", 4, seed=0),
                                  tmp_path_factory.mktemp("good") / "good.safetensors")


@pytest.fixture(scope="module")
def good_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.pth"
    torch.save(reference_torch_gmcnn(4).state_dict(), path)
    return path


def _truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        models.load_generator(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_truncated_safetensors(good_project, tmp_path):
    assert "safetensors" in _error(_truncated(good_project, tmp_path / "t.safetensors"))
    # cut inside the JSON header too
    assert "safetensors" in _error(_truncated(good_project, tmp_path / "h.safetensors", 0.0005))


def test_project_checkpoint_whose_header_length_starts_like_a_pickle_loads(tmp_path):
    # safetensors begins with its header length (8 bytes, little-endian); a low byte of 0x80 is also how a
    # pickle begins, and the shipped model once hit it after a longer description
    gen = models.build_generator("tf", 4, seed=0)
    path = models.save_checkpoint(gen, tmp_path / "probe.safetensors")
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    gen.meta.description += "x" * ((0x80 - header_len) % 256)
    path = models.save_checkpoint(gen, tmp_path / "m.safetensors")
    assert path.read_bytes()[0] == 0x80
    assert detect_format(path) == "project"
    loaded = models.load_generator(path)
    assert loaded.meta.description == gen.meta.description


def test_truncated_pth(good_pth, tmp_path):
    assert "damaged or truncated" in _error(_truncated(good_pth, tmp_path / "t.pth"))
    legacy = tmp_path / "legacy.pth"
    torch.save(reference_torch_gmcnn(2).state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert "damaged or truncated" in _error(_truncated(legacy, tmp_path / "tl.pth"))


def test_wrong_shapes(tmp_path):
    state = reference_torch_gmcnn(4).state_dict()
    state["EB2.3.weight"] = torch.zeros(16, 8, 5, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    message = _error(path)
    assert "EB2.3.weight" in message and "(16, 8, 5, 3)" in message and "(16, 8, 5, 5)" in message


def test_missing_and_unexpected_keys(tmp_path):
    state = reference_torch_gmcnn(4).state_dict()
    del state["EB3.17.bias"]
    state["EB3.99.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    message = _error(path)
    assert "net.EB3.17.bias" in message and "net.EB3.99.weight" in message


class _RunsCode:
    """Unpickling this calls ``os.system`` to create the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch '{self.sentinel}'",))


@pytest.mark.parametrize("container", ["zip", "legacy-pickle"])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, container):
    sentinel = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    if container == "zip":
        torch.save({"EB1.0.weight": torch.zeros(4, 4, 7, 7), "x": _RunsCode(sentinel)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"EB1.0.weight": 0.0, "x": _RunsCode(sentinel)}, f, protocol=2)
    message = _error(path)
    assert "refused: it calls posix.system" in message
    assert not sentinel.exists(), "loading the checkpoint ran its code"

    rc, _, err = run_cli("convert-checkpoint", path, tmp_path / "out.safetensors")
    assert rc == 2 and "refused" in _one_error_line(err, "convert-checkpoint")
    assert not sentinel.exists()
    assert not (tmp_path / "out.safetensors").exists()

    # Control: the payload is real -- an unrestricted load does run it.
    if container == "zip":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert sentinel.exists()


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Conv2d(1, 1, 1), path)
    assert "refused" in _error(path)


def test_unknown_layout(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "unknown checkpoint layout" in _error(path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "unknown checkpoint layout" in _error(empty)


def test_other_networks_are_named_as_such(tmp_path):
    pth = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, pth)
    assert "not a GMCNN PyTorch generator" in _error(pth)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    assert "not a gmcnn-mobile checkpoint" in _error(plain)
    bad_meta = tmp_path / "bad_meta.safetensors"
    save_file({"w": torch.zeros(2)}, bad_meta, metadata={"gmcnn_mobile": "{not json"})
    assert "not a JSON object" in _error(bad_meta)
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(2)}, newer, metadata={"gmcnn_mobile": '{"variant": "tf", "cnum": 4, "format_version": 99}'})
    assert "newer" in _error(newer)
    no_variant = tmp_path / "no_variant.safetensors"
    save_file({"w": torch.zeros(2)}, no_variant, metadata={"gmcnn_mobile": '{"cnum": 4}'})
    assert "metadata" in _error(no_variant)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a TensorFlow checkpoint" in _error(tmp_path)
    assert "no such checkpoint" in _error(tmp_path / "missing")


def test_tf_checkpoint_missing_generator_variables(tmp_path):
    weights = random_tf_weights(4)
    dropped = ["inpaint_net/b2conv14/kernel", "inpaint_net/mergeconv18/bias"]
    for name in dropped:
        del weights[name]
    write_tf_checkpoint(tmp_path, weights)
    message = _error(tmp_path)
    assert "missing 2" in message and all(name in message for name in dropped)


def test_tf_checkpoint_unexpected_and_misshapen_variables(tmp_path):
    weights = random_tf_weights(4)
    weights["inpaint_net/b4conv1/kernel"] = np.zeros((3, 3, 5, 4), np.float32)
    write_tf_checkpoint(tmp_path / "a", weights)
    assert "unexpected 1: inpaint_net/b4conv1/kernel" in _error(tmp_path / "a")

    weights = random_tf_weights(4)
    weights["inpaint_net/b3conv5/kernel"] = np.zeros((5, 5, 16, 16), np.float32)
    write_tf_checkpoint(tmp_path / "b", weights)
    assert "inpaint_net/b3conv5/kernel has shape (5, 5, 16, 16), expected (3, 3, 16, 16)" in _error(tmp_path / "b")


def test_tf_checkpoint_without_generator(tmp_path):
    write_tf_checkpoint(tmp_path, {"discriminator/conv1/kernel": np.zeros((3, 3, 3, 4), np.float32)}, distractors=False)
    assert "no 'inpaint_net/' generator variables" in _error(tmp_path)


def test_damaged_tf_checkpoint(tmp_path):
    write_tf_checkpoint(tmp_path, random_tf_weights(2))
    index = next(tmp_path.glob("*.index"))
    index.write_bytes(index.read_bytes()[:40])
    assert "unreadable TensorFlow checkpoint" in _error(tmp_path)


def test_tf_checkpoint_state_file_with_foreign_absolute_path(tmp_path):
    """Official checkpoints record the trainer's absolute path; the files beside the state file are used."""
    write_tf_checkpoint(tmp_path, random_tf_weights(2))
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/home/someone/models/snap-0"\n'
                                         'all_model_checkpoint_paths: "/home/someone/models/snap-0"\n')
    assert models.load_generator(tmp_path).meta.cnum == 2
    data_shard = next(tmp_path.glob("*.data-*"))
    assert detect_format(data_shard) == "tf"
    assert models.load_generator(data_shard).meta.cnum == 2


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_cli_convert_bad_input_exit_2_and_nothing_written(good_project, tmp_path, kind):
    src = _truncated(good_project, tmp_path / "bad.safetensors") if kind == "truncated" else tmp_path / "bad.bin"
    if kind == "random":
        src.write_bytes(os.urandom(1000))
    before = src.read_bytes()
    out = tmp_path / "out" / "converted.safetensors"
    rc, stdout, stderr = run_cli("convert-checkpoint", src, out)
    assert rc == 2 and stdout == ""
    _one_error_line(stderr, "convert-checkpoint")
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    assert src.read_bytes() == before


def test_cli_inspect_bad_input(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    rc, stdout, stderr = run_cli("inspect", path)
    assert rc == 2 and stdout == ""
    assert "damaged or truncated" in _one_error_line(stderr, "inspect")
