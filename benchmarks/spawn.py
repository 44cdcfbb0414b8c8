"""Run one measurement spec in a fresh Python process with its thread pools pinned."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in THREAD_ENV:
        env[key] = str(int(threads))
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_in_subprocess(spec: dict, log_dir: Optional[Path] = None, timeout_s: float = 1800) -> dict:
    """Run ``spec`` in ``python -m benchmarks.worker``; returns its result dict (``ok`` False on any failure).

    The worker's stderr goes to ``log_dir/<label>.log`` when ``log_dir`` is given.
    """
    with tempfile.TemporaryDirectory(prefix="gmcnn-bench-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        result_path = Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        log = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.get("label", spec["kind"]))
            log = open(log_dir / f"{safe}.log", "w")
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)],
                                  env=worker_env(int(spec.get("threads", 1))), stdout=log or subprocess.DEVNULL,
                                  stderr=log or subprocess.PIPE, timeout=timeout_s, cwd=str(REPO_ROOT))
        except subprocess.TimeoutExpired:
            return {"spec": spec, "ok": False, "error": f"timed out after {timeout_s:.0f} s"}
        finally:
            if log is not None:
                log.close()
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = (proc.stderr or b"").decode(errors="replace")[-400:] if log is None else "see log"
        return {"spec": spec, "ok": False, "error": f"worker exited {proc.returncode} without a result ({tail})"}
