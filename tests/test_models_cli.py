"""The model subcommands of ``gmcnn-mobile`` and the help of every subcommand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models.checkpoint import read_project_metadata

from gmcnn_reference import reference_torch_gmcnn
from helpers import run_cli as cli

ROOT = Path(__file__).resolve().parents[1]


def subcommands():
    from gmcnn_mobile.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, dict(action.choices)


def test_model_subcommands_registered():
    _, commands = subcommands()
    assert {"init-checkpoint", "convert-checkpoint", "inspect"} <= set(commands)


def test_every_subcommand_help_shows_defaults():
    _, commands = subcommands()
    assert commands
    for name, sub in commands.items():
        rc, out, err = cli(name, "--help")
        assert rc == 0, f"{name} --help failed: {err}"
        assert out.startswith(f"usage: gmcnn-mobile {name}")
        for action in sub._actions:
            if not action.option_strings or action.help in (None, "==SUPPRESS==") or action.dest == "help":
                continue
            assert any(flag in out for flag in action.option_strings)
            assert "_" not in action.option_strings[-1].lstrip("-"), f"{name}: flags are kebab-case"
            if action.default not in (None, "==SUPPRESS==") and "%(default)" not in action.help:
                assert f"(default: {action.default})" in " ".join(out.split()), f"{name} {action.option_strings}"


def test_help_of_model_subcommands():
    rc, out, _ = cli("init-checkpoint", "--help")
    flat = " ".join(out.split())
    assert rc == 0 and "--variant {tf,torch}" in flat and "(default: tf)" in flat and "(default: 32)" in flat
    rc, out, _ = cli("inspect", "--help")
    assert rc == 0 and "--json" in out and "(default: None)" not in out


def test_console_script_help_in_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "gmcnn_mobile", "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0 and "init-checkpoint" in proc.stdout and "convert-checkpoint" in proc.stdout


@pytest.mark.parametrize("variant", ["tf", "torch"])
def test_init_checkpoint(tmp_path, variant):
    out = tmp_path / "nested" / "init.safetensors"
    rc, stdout, _ = cli("init-checkpoint", out, "--variant", variant, "--cnum", 4, "--seed", 3)
    assert rc == 0 and str(out) in stdout
    meta = read_project_metadata(out)
    assert (meta["variant"], meta["cnum"]) == (variant, 4) and "random" in meta["description"]
    again = tmp_path / "again.safetensors"
    assert cli("init-checkpoint", again, "--variant", variant, "--cnum", 4, "--seed", 3)[0] == 0
    a, b = models.load_generator(out).state_dict(), models.load_generator(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, same weights"


@pytest.mark.parametrize("argv,words", [
    (["--cnum", "3"], "cnum"),
    (["--variant", "keras"], None),  # argparse choice error, exit 2
])
def test_init_checkpoint_bad_arguments(tmp_path, argv, words):
    out = tmp_path / "x.safetensors"
    rc, _, err = cli("init-checkpoint", out, *argv)
    assert rc == 2 and not out.exists()
    if words:
        assert words in err and err.count("\n") == 1


def test_init_checkpoint_rejects_other_suffix(tmp_path):
    rc, _, err = cli("init-checkpoint", tmp_path / "x.pth")
    assert rc == 2 and ".safetensors" in err and not (tmp_path / "x.pth").exists()


def test_init_checkpoint_unwritable_target(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = cli("init-checkpoint", blocker / "x.safetensors", "--cnum", 2)
    assert rc == 2 and "cannot write" in err and err.count("\n") == 1


def test_convert_checkpoint_pth(tmp_path):
    src = tmp_path / "latest_net_GM.pth"
    torch.save(reference_torch_gmcnn(4).state_dict(), src)
    out = tmp_path / "converted.safetensors"
    rc, stdout, _ = cli("convert-checkpoint", src, out, "--dtype", "float16")
    assert rc == 0 and str(out) in stdout
    meta = read_project_metadata(out)
    assert meta["weights_dtype"] == "float16" and meta["source"] == str(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.safetensors", "latest_net_GM.pth"]


def test_convert_checkpoint_can_replace_the_description(tmp_path):
    gen = models.build_generator("tf", 2, description="a training run's own words")
    gen.meta.extra = {"step": 7}
    src = models.save_checkpoint(gen, tmp_path / "best.safetensors")
    rc, _, _ = cli("convert-checkpoint", src, tmp_path / "kept.safetensors")
    assert rc == 0 and read_project_metadata(tmp_path / "kept.safetensors")["description"] == "a training run's own words"
    rc, _, _ = cli("convert-checkpoint", src, tmp_path / "shipped.safetensors", "--dtype", "float16",
                   "--description", "default model: NOT the official one")
    meta = read_project_metadata(tmp_path / "shipped.safetensors")
    assert rc == 0 and meta["description"] == "default model: NOT the official one" and meta["extra"] == {"step": 7}


def test_convert_checkpoint_refuses_to_overwrite_source(tmp_path):
    src = models.save_checkpoint(models.build_generator("tf", 2), tmp_path / "m.safetensors")
    before = src.read_bytes()
    rc, _, err = cli("convert-checkpoint", src, src)
    assert rc == 2 and "source" in err and src.read_bytes() == before


def test_inspect_json(tmp_path):
    path = tmp_path / "m.safetensors"
    assert cli("init-checkpoint", path, "--cnum", 8)[0] == 0
    rc, out, _ = cli("inspect", path, "--json")
    assert rc == 0
    info = json.loads(out)
    gen = models.load_generator(path)
    from models.gmcnn import count_macs, count_parameters

    assert info["meta"]["variant"] == "tf" and info["meta"]["cnum"] == 8
    assert info["parameters"] == count_parameters(gen)
    assert info["gmacs"]["512x680"] == round(count_macs(gen, 512, 680) / 1e9, 3)
    assert set(info["gmacs"]) == {"512x680", "1024x1360"}
    import hashlib

    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_text(tmp_path):
    path = tmp_path / "m.safetensors"
    assert cli("init-checkpoint", path, "--variant", "torch", "--cnum", 4)[0] == 0
    rc, out, _ = cli("inspect", path)
    assert rc == 0
    assert "variant      torch" in out and "GMAC @ 512x680" in out and "GMAC @ 1024x1360" in out


def test_inspect_missing_default(tmp_path, monkeypatch):
    monkeypatch.setenv("GMCNN_CHECKPOINT", str(tmp_path / "none.safetensors"))
    rc, out, err = cli("inspect")
    assert rc == 2 and out == "" and "init-checkpoint" in err and err.count("\n") == 1
