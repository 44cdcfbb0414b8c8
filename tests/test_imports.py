"""runtime_py is the on-device reference pipeline: importing it must not pull in the export stack; and the
import rules of pyproject.toml (import-linter contracts) hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tensorflow", "coremltools", "onnx2tf", "keras", "tf_keras")

PROBE = """
import importlib, json, pkgutil, sys
import runtime_py
names = ["runtime_py"]
failed = {}
for info in pkgutil.walk_packages(runtime_py.__path__, "runtime_py."):
    try:
        importlib.import_module(info.name)
        names.append(info.name)
    except Exception as exc:  # reported, not hidden
        failed[info.name] = f"{type(exc).__name__}: {exc}"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
# Building the CLI (what `gmcnn-mobile --help` does) registers every subcommand module.
from gmcnn_mobile.cli import build_parser
build_parser()
heavy_cli = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"imported": names, "failed": failed, "heavy": heavy, "heavy_cli": heavy_cli}))
"""


def test_runtime_py_imports_without_heavy_frameworks():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"runtime_py.cli", "runtime_py.errors", "runtime_py.manifest"} <= set(report["imported"])
    assert report["failed"] == {}, report["failed"]
    assert report["heavy"] == [], f"importing runtime_py loaded {report['heavy']}"
    assert report["heavy_cli"] == [], f"building the CLI parser loaded {report['heavy_cli']}"


def test_probe_detects_a_heavy_import(tmp_path):
    """Control: the same probe notices a module named torch once something imports it (a stand-in, for speed)."""
    (tmp_path / "torch.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"HEAVY = {HEAVY!r}\nimport torch\nassert torch.__file__.startswith({str(tmp_path)!r})\n{PROBE}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert "torch" in json.loads(proc.stdout.strip().splitlines()[-1])["heavy"]


def test_import_contracts_hold():
    """The import-linter contracts of pyproject.toml (layers, no cycles, runtime_py light), as `make test` runs
    them: a broken one names the offending import."""
    pytest.importorskip("importlinter", reason="import-linter comes with the dev extra (make setup)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           "--no-cache"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


LAYERS = ("gmcnn_mobile", "benchmarks", "export", "models", "runtime_py")


def module_names_run_or_loaded(path: Path):
    """(line, module name) of every module ``path`` loads or starts by name: ``importlib.import_module``,
    ``__import__``, ``runpy.run_module`` with a literal name, and ``"-m", "NAME"`` in a command list."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("import_module", "__import__", "run_module"):
                found.append((node.lineno, node.args[0].value))
        if isinstance(node, (ast.List, ast.Tuple)):
            items = node.elts
            for flag, name in zip(items, items[1:]):
                if isinstance(flag, ast.Constant) and flag.value == "-m" and isinstance(name, ast.Constant):
                    found.append((name.lineno, name.value))
    return found


def upward_module_names(layer: str):
    """Modules of a layer above ``layer`` that its code starts (``python -m benchmarks.worker``) or loads by
    name: what import-linter, which reads import statements, cannot see."""
    above = LAYERS[:LAYERS.index(layer)]
    return [f"{path.relative_to(ROOT)}:{line}: {name!r}" for path in sorted((ROOT / layer).rglob("*.py"))
            for line, name in module_names_run_or_loaded(path)
            if isinstance(name, str) and name.split(".")[0] in above]


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_no_part_starts_or_loads_a_part_above_it_by_name(layer):
    """Export never starts benchmarks (``python -m benchmarks.worker`` was export/measure.py's); no part
    imports a part above it by name either."""
    assert upward_module_names(layer) == []


def test_upward_name_check_catches_a_subprocess_target(tmp_path, monkeypatch):
    """Control: a module of export that runs ``python -m benchmarks.worker`` is reported."""
    fake_root = tmp_path / "repo"
    (fake_root / "export").mkdir(parents=True)
    (fake_root / "export" / "measure.py").write_text(
        'import subprocess, sys\nsubprocess.run([sys.executable, "-m", "benchmarks.worker"])\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert upward_module_names("export") == ["export/measure.py:2: 'benchmarks.worker'"]


#: The constructors that open a model for inference, and the only files allowed to call them: the engines and
#: the Core ML reference executor they wrap (which reads an ML program with ``MLModel(skip_model_load=True)``,
#: and whose fast path runs each convolution as a one-node ONNX model in an onnxruntime session).
RUNNER_CONSTRUCTORS = ("Interpreter", "InferenceSession", "MLModel")
RUNNER_HOMES = ("runtime_py/engines/", "runtime_py/mil_executor.py", "runtime_py/mil_kernels.py")


def runner_constructions(root: Path):
    """``path:line: Name(`` of every call to a runner constructor in the parts' code outside the engines."""
    import ast

    found = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(RUNNER_HOMES):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if func in RUNNER_CONSTRUCTORS:
                        found.append(f"{rel}:{node.lineno}: {func}(")
    return found


def test_only_the_engines_open_models_for_inference():
    """One runner layer: the parity gate, calibration, golden bundles and benchmarks run models through
    runtime_py/engines; no other module of a part constructs an interpreter, a session or a Core ML model."""
    assert runner_constructions(ROOT) == []


def test_runner_check_catches_an_interpreter(tmp_path):
    """Control: an export module that opens a LiteRT interpreter itself is reported."""
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "export" / "calibrate.py").write_text(
        "from ai_edge_litert.interpreter import Interpreter\nit = Interpreter(model_content=b'')\n")
    (tmp_path / "runtime_py" / "engines").mkdir()
    (tmp_path / "runtime_py" / "engines" / "tflite_engine.py").write_text("it = Interpreter(model_path='x')\n")
    assert runner_constructions(tmp_path) == ["export/calibrate.py:2: Interpreter("]
