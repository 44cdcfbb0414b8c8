"""How the suite shares out CPU cores when it runs in parallel (``make test``: pytest-xdist, ``-n auto --dist
loadscope``; ``--dist loadgroup`` gets the same units). A plain ``pytest`` run, or a parallel one with another
``--dist``, gets only the last point.

* One unit of work per test module, so that a module-scoped fixture (a tiny export: tens of seconds) is built in
  one worker, once; modules that share something built once per process (:data:`SHARED`) form one unit.
* The most expensive units start first (:data:`EXPENSIVE_FIRST`), so that the cheap ones fill in around them.
* Each worker runs torch on its share of the cores (two workers on two cores: one thread each), so that the
  workers do not fight over cores. Engines and exports that name a thread count still use it.
* In every run, OpenMP threads (torch's CPU kernels) that wait for work sleep instead of spinning
  (``OMP_WAIT_POLICY=PASSIVE``), in this process and the ones it starts.
* Each test process converts TFLite files with one TensorFlow worker (:func:`one_tflite_worker`).
* Under coverage (``--cov``), third-party imports and coremltools' conversions run untraced (tests/untraced.py):
  a set trace function slows every Python line, measured or not, ~2x.

A module missing from these lists still runs correctly, only slower (its shared work done twice, or started late).
"""
from __future__ import annotations

import os

import pytest

import untraced

# On a machine with more runnable threads than cores (two workers, other jobs), spinning OpenMP threads burn CPU
# while they wait for one that is not running. The cnum-4 generator's forward pass at 64x96 with 2 torch threads,
# load ~9 on 2 cores: 0.44-0.69 s of CPU spinning, 0.035 s passive (1 thread: 0.026 s). Results are the same.
# It must be set before torch loads OpenMP, which reads it once: conftest.py is imported before any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

untraced.install()

#: Most workers `-n auto` starts: past ~4 the longest group of tests sets the time, and each worker holds up
#: to ~2 GiB (torch, TensorFlow and coremltools imported).
MAX_AUTO_WORKERS = 4


def _usable_cores() -> int:
    """The cores this process may run on (the affinity mask where the OS has one, as on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where it is not installed
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: the cores this process may use (not the machine's: a container may get fewer), at most
    :data:`MAX_AUTO_WORKERS`."""
    return max(1, min(MAX_AUTO_WORKERS, _usable_cores()))


def _workers() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))


def _third_party_asserts_as_written(config) -> None:
    """pytest rewrites the asserts of every module of a package that provides a pytest plugin, hypothesis'
    73 modules included (no assert of theirs runs in a test here): 1.6 s of CPU to import hypothesis, 0.3 s
    without, in each xdist worker. Not where pytest's assert state has no rewriting hook (``--assert=plain``) or
    keeps its marked names elsewhere (another pytest version)."""
    from _pytest.assertion.rewrite import assertstate_key

    state = config.stash.get(assertstate_key, None)
    marked = getattr(getattr(state, "hook", None), "_must_rewrite", None)
    if isinstance(marked, set):
        marked.discard("hypothesis")


def pytest_configure(config):
    _third_party_asserts_as_written(config)
    if _workers():
        try:
            import torch
        except ImportError:  # a runtime-only install: no torch to share out
            return
        torch.set_num_threads(max(1, _usable_cores() // _workers()))


#: Modules that share what is built once per test process (a session fixture, a module-level cache) run in the
#: same worker: unit name -> modules.
SHARED = {
    "tiny_mixed_export": ("tests/test_export_reference.py", "tests/test_export_tflite.py"),  # the fixture below
    "coreml_fixtures": ("tests/test_coreml_export.py", "tests/test_golden.py",  # coreml_fixtures.tiny_artifact's
                        "tests/test_artifact_check.py",                         # conversions, and coremltools'
                        "tests/test_mil_executor.py"),                          # import (~10 s of CPU)
}
_UNIT_OF_MODULE = {module: unit for unit, modules in SHARED.items() for module in modules}

#: Units by CPU time, the most expensive first (measured 2 Dec 2026 with coverage; 2 workers): ~200 s for the
#: Core ML unit, 50-80 s for the next five, 30-40 s for the rest; every other module takes under 20 s.
EXPENSIVE_FIRST = ("coreml_fixtures", "tiny_mixed_export", "tests/test_train.py", "tests/test_export_quant_fallback.py",
                   "tests/test_bench_quick.py", "tests/test_export_torch_variant.py", "tests/test_bench_units.py",
                   "tests/test_faithfulness.py", "tests/test_export_activations.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (or ``loadgroup``) with the units and the order above. Without this, xdist's own
    ``loadgroup`` makes every test its own unit (no test here has an ``xdist_group`` mark), so a module's fixtures
    and the shared conversions are built once in every worker that draws one of its tests."""
    if config.getvalue("dist") not in ("loadscope", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return _UNIT_OF_MODULE.get(module, module)

        def _assign_work_unit(self, node) -> None:
            rank = {unit: i for i, unit in enumerate(EXPENSIVE_FIRST)}
            first = min(self.workqueue, key=lambda unit: rank.get(unit, len(rank)))  # ties: queue order
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return ModuleUnits(config, log)


@pytest.fixture(scope="session", autouse=True)
def one_tflite_worker():
    """Every TFLite conversion of a test process goes to one TensorFlow worker (export.tflite.kept_worker), closed
    at the end of the session: a worker per conversion spent ~7 s of CPU importing TensorFlow and onnx2tf each
    time. tests/test_export_reference.py's pinned digests hold for files converted after others in it."""
    from export import tflite

    with tflite.kept_worker():
        yield


@pytest.fixture(scope="session")
def tiny_mixed_export(tmp_path_factory):
    """Folder of tests/test_export_reference.py's ``defaults`` export (helpers.TINY_EXPORTS), made once per test
    process: every TFLite precision x I/O and Core ML fp16 (tensor and image) of the cnum-4 lively generator at
    64x96, with the work folder ``.work`` kept (the converter's own files, before the post-pass). Read-only:
    tests copy it before changing anything."""
    pytest.importorskip("coremltools", reason="the shared tiny export includes Core ML (the export extra)")
    from helpers import export_tiny

    out = tmp_path_factory.mktemp("tiny_mixed_export")
    export_tiny(out, "defaults", keep_work=True)
    return out
