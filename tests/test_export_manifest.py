"""The manifest schema: documented field for field in docs/MANIFEST.md, validated on load.

A manifest written by a real export is validated in test_export_tflite.py; here the
schema rules themselves are checked on hand-made documents (no conversion)."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from runtime_py import manifest as mf
from runtime_py.errors import UserError

DOC = Path(__file__).resolve().parent.parent / "docs" / "MANIFEST.md"


def _doc_fields(section: str):
    """Names in the first column of the table under ``## section`` (cells like `a`, `b`)."""
    body = DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    names = set()
    for cell in re.findall(r"^\| ([^|]+) \|", body, flags=re.M):
        names |= set(re.findall(r"`([a-z_0-9]+)`", cell))
    return names


@pytest.mark.parametrize("cls,section", [
    (mf.Manifest, "Top level: `Manifest`"),
    (mf.Artifact, "`Artifact`"),
    (mf.TensorInfo, "`TensorInfo`"),
    (mf.ParityResult, "`ParityResult`"),
])
def test_every_field_is_documented(cls, section):
    documented = _doc_fields(section)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields <= documented, f"undocumented {cls.__name__} fields: {sorted(fields - documented)}"


def test_tflite_inventory_keys_are_documented():
    documented = _doc_fields("`op_inventory` of TFLite files")
    produced = {"ops", "op_total", "quantize", "dequantize", "float_compute_ops_in_int8_graph",
                "xnnpack_fallback_ops", "gpu_compatibility", "before_postpass", "postpass"}
    assert produced <= documented


def _doc():
    tensor = {"name": "image", "shape": [1, 64, 96, 3], "dtype": "float32", "layout": "NHWC",
              "value_range": [-1.0, 1.0], "channel_order": "RGB", "mask_polarity": "", "quantization": {},
              "role": "image"}
    art = {"file": "a.tflite", "format": "tflite", "shape": [64, 96], "precision": "fp32", "io": "tensor",
           "sha256": "0" * 64, "bytes": 10, "inputs": [tensor], "outputs": [dict(tensor, name="output", role="output")],
           "op_inventory": {"ops": {"CONV_2D": 1}}, "parity": {"executor": "litert", "passed": True},
           "build": {}, "cache_key": "k"}
    return {"schema_version": mf.SCHEMA_VERSION, "checkpoint": {"sha256": ""}, "tools": {}, "artifacts": [art],
            "created": "", "export": {}}


def test_valid_document_loads_and_finds(tmp_path):
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps(_doc()))
    m = mf.load_manifest(tmp_path)
    assert m.find("tflite", (64, 96), "fp32", "tensor").file == "a.tflite"
    with pytest.raises(UserError, match="no tflite int8"):
        m.find("tflite", (64, 96), "int8", "tensor")


@pytest.mark.parametrize("break_it,words", [
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d["artifacts"][0].update(colour="blue"), "unknown Artifact field"),
    (lambda d: d["artifacts"][0]["inputs"][0].update(stride=2), "unknown TensorInfo field"),
    (lambda d: d["artifacts"][0]["parity"].update(speed=1), "unknown ParityResult field"),
    (lambda d: d["artifacts"][0].pop("sha256"), "malformed"),
])
def test_invalid_documents_are_one_line_errors(break_it, words):
    d = copy.deepcopy(_doc())
    break_it(d)
    with pytest.raises(UserError, match=words):
        mf.manifest_from_dict(d)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(UserError, match="no export manifest"):
        mf.load_manifest(tmp_path)
    (tmp_path / mf.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        mf.load_manifest(tmp_path)
