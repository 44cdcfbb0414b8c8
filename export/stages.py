"""Where an export's time and memory go: wall seconds and peak memory of every stage, and the memory budget.

:class:`StageLog` records each stage of one export (ONNX + simplify, onnx2tf, calibration, each
conversion, the PyTorch reference, each gate, the fallback's sensitivity, candidates and price, Core ML
conversion and gates): its wall seconds, the process it ran in (``export``: the command's own process;
``tflite worker``: the TensorFlow child process) and two peaks of that process during the stage:

* resident memory, its high-water mark (``VmHWM``), restarted at the start of each stage
  (:func:`runtime_py.memory.reset_peak_rss`);
* anonymous resident memory (``RssAnon``: what the system cannot reclaim without swap, unlike the pages
  of shared libraries and memory-mapped files that the RSS also counts), sampled every
  :data:`SAMPLE_SECONDS` and at the stage's ends (:class:`runtime_py.memory.AnonPeak`).

The TFLite worker measures its own stages the same way and reports them with its events. The whole run's
peaks are the largest sums of the processes' resident and anonymous sizes, sampled every
:data:`SAMPLE_SECONDS` while the export runs (the worker between its conversions too), and never less than
any one process's peak; where the summed anonymous peak is a sampled sum, the report says when it was sampled, what
each process held then and which stages ran (``peak_anon_sampled_at``). The report is printed at the end of the run
and written beside the manifest (:data:`REPORT_NAME`); a run that made nothing (every file reused) records itself
inside the report of the run that made the files instead of replacing it (:func:`write_report`).

The budget (``--memory-budget-gib``, :attr:`export.options.ExportOptions.memory_budget_gib`) is of
anonymous memory, summed over the processes: it decides what may run side by side -- the TFLite worker
(conversion and calibration, a child process) and the Core ML conversions and gates (this process) run at
the same time only when their estimated anonymous peaks (:func:`estimated_peak`) fit in it together;
otherwise one after the other -- and the report's verdict compares the run's summed anonymous peak with it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from runtime_py.memory import AnonPeak, mib, peak_rss_bytes, reset_peak_rss, resident_of
from runtime_py.memory import give_back as _give_back  # the stage() argument takes the name

REPORT_NAME = "export_stages.json"
SAMPLE_SECONDS = 0.2
GIB = 1 << 30
OWN_PROCESS = "export"
TFLITE_WORKER = "tflite worker"


@dataclass
class Stage:
    """One stage: ``name`` (e.g. ``gate gmcnn_tf_c32_512x680_tensor_int8.tflite``), ``process`` (where it ran),
    ``start`` (seconds after the export started), ``seconds`` (wall), ``peak_rss_bytes`` and ``peak_anon_bytes``
    (that process's resident and anonymous resident peaks during the stage)."""

    name: str
    process: str
    start: float
    seconds: float
    peak_rss_bytes: int
    peak_anon_bytes: int = 0


#: How far apart (seconds) two recorded times may be and still count as the same instant: starts and walls are
#: kept to 0.01 s.
_SAME_INSTANT = 0.011


def own_seconds(stages: List[Stage]) -> List[float]:
    """Each stage's own wall seconds: its ``seconds`` less those of the stages nested directly in it -- in the same
    process, inside its interval (the fallback's pruning holds its candidates' conversions and gates, calibration
    its groups). Summing ``seconds`` over stages counts a nested stage's time twice; summing these counts it once,
    so per process they add up to at most its busy time. ``stages`` in the order they were recorded: a stage and one
    nested in it over the same interval (to the 0.01 s kept) are told apart by that order, the nested one ending,
    and so recorded, first."""
    def inside(i: int, j: int) -> bool:  # is stage i nested in stage j
        a, b = stages[i], stages[j]
        return (i != j and a.process == b.process and a.start >= b.start - _SAME_INSTANT
                and a.start + a.seconds <= b.start + b.seconds + _SAME_INSTANT
                and (a.seconds < b.seconds or (a.seconds == b.seconds and i < j)))

    own = [s.seconds for s in stages]
    for i in range(len(stages)):
        holders = [j for j in range(len(stages)) if inside(i, j)]
        if holders:
            parent = min(holders, key=lambda j: (stages[j].seconds, j))  # the innermost holder
            own[parent] -= stages[i].seconds
    return [round(max(v, 0.0), 2) for v in own]


class StageLog:
    """The stages of one export and the sampled peaks of all its processes together (see the module docstring)."""

    def __init__(self, budget_bytes: Optional[int] = None):
        self.t0 = time.time()
        self.budget_bytes = budget_bytes
        self.stages: List[Stage] = []
        self.schedule: Dict[str, str] = {}
        self.peaks: Dict[str, int] = {}  # process -> its resident peak over the run
        self.anon_peaks: Dict[str, int] = {}  # process -> its anonymous peak over the run
        self.total_peak = 0
        self.total_anon_peak = 0
        self._total_anon_peak_at: Optional[Tuple[float, Dict[str, int]]] = None  # (seconds, anonymous by process)
        self._children: Dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._own_anon = AnonPeak(every=None)  # observed by the sampler below
        reset_peak_rss()
        self._sampler = threading.Thread(target=self._sample, name="export-memory-sampler", daemon=True)
        self._sampler.start()

    # ------------------------------------------------------------------ measuring
    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def sample(self) -> None:
        """Read every process's resident and anonymous size now, into the sums' and each process's peaks."""
        with self._lock:
            children = dict(self._children)
        own = resident_of(["self"])
        readings = [(OWN_PROCESS, own)] + [(process, resident_of([pid])) for pid, process in children.items()]
        self._own_anon.observe(own[1])
        summed = sum(anon for _, (_, anon) in readings)
        with self._lock:
            self.total_peak = max(self.total_peak, sum(rss for _, (rss, _) in readings))
            if summed > self.total_anon_peak:
                by_process: Dict[str, int] = {}
                for process, (_, anon) in readings:
                    by_process[process] = by_process.get(process, 0) + anon
                self.total_anon_peak, self._total_anon_peak_at = summed, (time.time() - self.t0, by_process)
            for process, (_, anon) in readings:
                self.anon_peaks[process] = max(self.anon_peaks.get(process, 0), anon)

    def _fold_own_peak(self) -> Tuple[int, int]:
        peak, anon = peak_rss_bytes(), self._own_anon.peak()
        with self._lock:
            self.peaks[OWN_PROCESS] = max(self.peaks.get(OWN_PROCESS, 0), peak)
            self.anon_peaks[OWN_PROCESS] = max(self.anon_peaks.get(OWN_PROCESS, 0), anon)
        return peak, anon

    @contextlib.contextmanager
    def stage(self, name: str, give_back: bool = False):
        """Time ``name`` in this process and record its peaks (the block's resident high-water mark, and its
        anonymous peak as sampled). ``give_back``: after it, return to the system what the stage freed
        (:func:`runtime_py.memory.give_back`; the heavy stages: ONNX export, PyTorch reference, conversions, gates),
        so that the next stage does not start above what the process holds."""
        self._fold_own_peak()
        reset_peak_rss()
        self._own_anon.reset()
        start = time.time()
        try:
            yield
        finally:
            peak, anon = self._fold_own_peak()
            if give_back:
                _give_back()
            self.add(name, OWN_PROCESS, start - self.t0, time.time() - start, peak, anon)

    def add(self, name: str, process: str, start: float, seconds: float, peak: int, anon: int = 0) -> None:
        """Record a stage measured elsewhere (the TFLite worker's events): resident peak ``peak``, anonymous
        peak ``anon`` (bytes)."""
        with self._lock:
            self.stages.append(Stage(name, process, round(start, 2), round(seconds, 2), int(peak), int(anon)))
            self.peaks[process] = max(self.peaks.get(process, 0), int(peak))
            self.anon_peaks[process] = max(self.anon_peaks.get(process, 0), int(anon))

    def watch(self, pid: int, process: str) -> None:
        """Count child process ``pid`` in the sampled sums while it runs."""
        with self._lock:
            self._children[int(pid)] = process

    def unwatch(self, pid: int) -> None:
        with self._lock:
            self._children.pop(int(pid), None)

    def since_start(self) -> float:
        return time.time() - self.t0

    def would_exceed(self, extra_bytes: int) -> bool:
        """Whether ``extra_bytes`` more anonymous memory in this process would take the processes' summed anonymous
        memory (this one's and the watched children's, now) over the budget; False without a budget."""
        if self.budget_bytes is None:
            return False
        with self._lock:
            pids = ["self"] + list(self._children)
        return resident_of(pids)[1] + int(extra_bytes) > self.budget_bytes

    def last_peak_anon(self, name: str) -> int:
        """The anonymous peak (bytes) of this process's latest stage called ``name``; 0 if there is none."""
        with self._lock:
            return next((s.peak_anon_bytes for s in reversed(self.stages)
                         if s.name == name and s.process == OWN_PROCESS), 0)

    # ------------------------------------------------------------------ the report
    def close(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join(timeout=2 * SAMPLE_SECONDS + 1)

    def finish(self, artifacts: Optional[Dict[str, int]] = None) -> dict:
        """Stop sampling; the report (JSON-ready). The budget's verdict is on the summed anonymous peak.
        ``artifacts``: the run's counts of files made, reused and failed, recorded as they are."""
        self.close()
        self.sample()
        self._fold_own_peak()
        with self._lock:
            total = max([self.total_peak] + list(self.peaks.values()))
            anon = max([self.total_anon_peak] + list(self.anon_peaks.values()))
            own = own_seconds(self.stages)  # in the order recorded, which tells nested stages of equal intervals apart
            when = {}
            if self._total_anon_peak_at is not None and anon == self.total_anon_peak:  # the sum, not one process's
                at, by_process = self._total_anon_peak_at
                when = {"peak_anon_sampled_at": {
                    "seconds": round(at, 1), "bytes_per_process": dict(by_process),
                    "stages": [s.name for s in self.stages if s.start <= at <= s.start + s.seconds]}}
            return {
                "seconds": round(time.time() - self.t0, 2),
                **({"artifacts": dict(artifacts)} if artifacts is not None else {}),
                "peak_rss_bytes": int(total),
                "peak_rss_bytes_per_process": dict(self.peaks),
                "peak_anon_bytes": int(anon),
                "peak_anon_bytes_per_process": dict(self.anon_peaks),
                **when,
                "memory_budget_bytes": self.budget_bytes,
                "within_budget": None if self.budget_bytes is None else bool(anon <= self.budget_bytes),
                "schedule": dict(self.schedule),
                "sampled_every_seconds": SAMPLE_SECONDS,
                "stages": sorted((dict(asdict(s), own_seconds=own) for s, own in zip(self.stages, own)),
                                 key=lambda row: row["start"]),
            }


#: The kinds of stage the report sums own seconds by (:func:`seconds_by_kind`), tried in this order on the stage's
#: name: a fallback candidate's gate names its file ``p<phase>[c<n>]k<layers>-...``; the stages of the fallback's
#: own (sensitivity, simulations, price and the pruning's share outside its candidates) are one kind.
STAGE_KINDS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("fallback candidates' gates", re.compile(r"gate p\d+\w*k\d+-")),
    ("gates of the files as converted", re.compile(r"gate ")),
    ("int8 calibration", re.compile(r"calibration")),
    ("PyTorch references", re.compile(r"reference ")),
    ("manifest inventory", re.compile(r"describe ")),
    ("ONNX + onnxsim and onnx2tf", re.compile(r"onnx")),
    ("conversions", re.compile(r"convert ")),
    ("fallback search", re.compile(r"fallback |input channel ranges|bias correction|weight rounding")),
)
#: The kinds that are model inference on the held-out or calibration samples: what the checks are made of
INFERENCE_KINDS = ("fallback candidates' gates", "gates of the files as converted", "int8 calibration",
                   "PyTorch references")
OTHER_KIND = "the rest"
_SHAPE = re.compile(r"(\d+)x(\d+)")


def stage_kind(name: str) -> str:
    """The kind of :data:`STAGE_KINDS` a stage's name is of (:data:`OTHER_KIND` when none)."""
    return next((kind for kind, pattern in STAGE_KINDS if pattern.match(name)), OTHER_KIND)


def seconds_by_kind(report: dict) -> Dict[str, Dict[str, float]]:
    """Own seconds of the report's stages summed per kind (:func:`stage_kind`) and per model shape named in the
    stage's name (``"512x680"``; ``""`` for a stage of no shape): {kind: {shape: seconds}}, the kinds in
    :data:`STAGE_KINDS`' order, then :data:`OTHER_KIND`, only those that ran. Own seconds, so a nested stage counts
    once (:func:`own_seconds`)."""
    order = [kind for kind, _ in STAGE_KINDS] + [OTHER_KIND]
    sums: Dict[str, Dict[str, float]] = {}
    for s in report["stages"]:
        found = _SHAPE.search(s["name"])
        shape = f"{found.group(1)}x{found.group(2)}" if found else ""
        per_shape = sums.setdefault(stage_kind(s["name"]), {})
        per_shape[shape] = round(per_shape.get(shape, 0.0) + s.get("own_seconds", s["seconds"]), 2)
    return {kind: sums[kind] for kind in order if kind in sums}


def kind_table(report: dict) -> str:
    """:func:`seconds_by_kind` as a text table: a column per model shape (and one for stages of none), a row per
    kind (model inference on the samples, :data:`INFERENCE_KINDS`, marked ``*``), then their sum and the whole sum."""
    by_kind = seconds_by_kind(report)
    shapes = sorted({shape for per in by_kind.values() for shape in per if shape},
                    key=lambda shape: tuple(int(v) for v in shape.split("x")))
    columns = shapes + ([""] if any("" in per for per in by_kind.values()) else [])

    def row(label: str, per: Dict[str, float]) -> str:
        return f"{label:<42}" + "".join(f" {per.get(c, 0.0):>10.1f}" for c in columns) + f" {sum(per.values()):>10.1f}"

    def summed(kinds) -> Dict[str, float]:
        return {c: sum(by_kind[k].get(c, 0.0) for k in kinds if k in by_kind) for c in columns}

    lines = [f"{'own seconds by kind':<42}" + "".join(f" {c or 'no shape':>10}" for c in columns) + f" {'all':>10}"]
    lines += [row(f"{kind} *" if kind in INFERENCE_KINDS else kind, per) for kind, per in by_kind.items()]
    lines += [row("* gates, calibration, references", summed(INFERENCE_KINDS)), row("sum", summed(by_kind))]
    return "\n".join(lines)


def table(report: dict) -> str:
    """The report as a text table: one row per stage, then the whole run."""
    rows = [f"{'stage':<64} {'process':<13} {'start s':>8} {'wall s':>8} {'own s':>8} {'peak MiB':>9} {'anon MiB':>9}"]
    for s in report["stages"]:
        own = s.get("own_seconds", s["seconds"])  # a report written before own seconds were recorded
        rows.append(f"{s['name'][:64]:<64} {s['process']:<13} {s['start']:8.1f} {s['seconds']:8.1f} {own:8.1f} "
                    f"{mib(s['peak_rss_bytes']):9.0f} {mib(s.get('peak_anon_bytes', 0)):9.0f}")
    budget = report.get("memory_budget_bytes")
    verdict = ""
    if budget:
        verdict = f" (anonymous, budget {budget / GIB:.1f} GiB: {'within' if report['within_budget'] else 'OVER'})"
    rows.append(f"{'whole run (processes summed)':<64} {'all':<13} {0.0:8.1f} {report['seconds']:8.1f} {'':>8} "
                f"{mib(report['peak_rss_bytes']):9.0f} {mib(report.get('peak_anon_bytes', 0)):9.0f}{verdict}")
    anon = report.get("peak_anon_bytes_per_process", {})
    per = ", ".join(f"{p} {mib(v):.0f} MiB ({mib(anon.get(p, 0)):.0f} anonymous)"
                    for p, v in report["peak_rss_bytes_per_process"].items())
    if per:
        rows.append(f"peak per process: {per}")
    at = report.get("peak_anon_sampled_at")
    if at:
        parts = " + ".join(f"{p} {mib(v):.0f}" for p, v in at["bytes_per_process"].items())
        during = "; ".join(at["stages"]) or "no stage"
        rows.append(f"summed anonymous peak at {at['seconds']:.1f} s: {parts} MiB, during: {during}")
    for what, how in report.get("schedule", {}).items():
        rows.append(f"schedule: {what}: {how}")
    return "\n".join(rows + [kind_table(report)])


def write_report(report: dict, out: Path, partial_prefix: str, reused_only: bool = False) -> Path:
    """``out/export_stages.json``, atomically (temporary name in the same folder, then rename).

    ``reused_only``: the run made nothing and failed nothing (every file reused). It keeps the report of the run
    that made the files: its own report goes into that one under ``last_reuse`` (replacing an earlier re-run's),
    the rest left as it was; it is the file itself only when there is no earlier report to keep."""
    target = Path(out) / REPORT_NAME
    if reused_only:
        try:
            previous = json.loads(target.read_text())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and isinstance(previous.get("stages"), list):
            report = {**{k: v for k, v in previous.items() if k != "last_reuse"}, "last_reuse": report}
    tmp = Path(out) / f"{partial_prefix}{os.getpid()}-{REPORT_NAME}"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------- the budget

# Peak anonymous memory of a group of stages: fixed + the larger of per_value x (the values all convolutions of one
# forward pass output, models.gmcnn.conv_layers) and per_pixel x (pixels of the shape).
# * TFLite worker: fixed 270 MiB (its anonymous peak in the tiny cnum-4 export at 64x96: TensorFlow's own);
#   per value from int8 calibration of the default model (cnum 32) at 1024x1360, its largest stage: 4,730 MiB
#   anonymous with the calibration passes on transient indirection buffers (2026-12-03, the stage report of
#   `export --formats tflite --precisions int8 --io tensor --shapes 1024x1360`, sampled every 0.2 s; 6,947 MiB
#   before them), 6.2 B per value above the fixed part, rounded up to 6.4; onnx2tf, with its validation
#   outputs on disk, needs less (1,089 MiB at 512x680, 2,711 MiB at 1024x1360).
#   That is calibration in one pass: under a budget it would exceed, calibration measures the graph in groups that
#   fit what the budget leaves (export.tflite_calibration.calibration_groups), so this figure is the worker's peak
#   when nothing bounds it, an upper bound otherwise.
#   per_pixel: calibration of the cnum-4 model grows with the pixels (1,500 MiB resident at 512x680, the resident
#   figure: an upper bound).
# * Core ML in this process (conversion, the PyTorch reference its gates need, gates in the executor with the model
#   core shared by both signatures): the default model's largest of these stages in full default exports of
#   2026-12-07 (`DIR_O`, `DIR_OT`; docs/EXPORT.md "Export wall time"), anonymous: at 512x680 the gates, 2,177 MiB;
#   at 1024x1360 the reference (inside the freed-memory block), 3,128-4,091 MiB, above the gates' 3,022 MiB. The
#   line through 2,177 MiB and 4,091 MiB: 1,540 MiB + 3.6 B per value. The fixed part is the cnum-32 export
#   process's (the tiny cnum-4 export's was 516 MiB anonymous): an upper bound for small models. It replaced
#   975 MiB + 11 B per value, fitted to an older executor's resident peaks, which put Core ML alone at 8.6 GiB.
MIB = 1 << 20
PEAK_MODEL: Dict[str, Tuple[float, float, float]] = {  # group: (fixed bytes, bytes per value, bytes per pixel)
    TFLITE_WORKER: (270 * MIB, 6.4, 2600.0),
    "coreml": (1540 * MIB, 3.6, 0.0),
}


def activation_values(generator, shapes: Iterable[Tuple[int, int]]) -> Tuple[int, int]:
    """(values all convolutions of one forward pass output, pixels) at the largest of ``shapes``."""
    from models.gmcnn import conv_layers

    sizes = [(sum(layer["out_channels"] * layer["out_hw"][0] * layer["out_hw"][1]
                  for layer in conv_layers(generator, rows, cols)), rows * cols) for rows, cols in shapes]
    return max(sizes, default=(0, 0))


def estimated_peak(group: str, size: Tuple[int, int]) -> int:
    """Estimated peak resident bytes of ``group`` (a key of :data:`PEAK_MODEL`) for ``size`` = (values, pixels)."""
    fixed, per_value, per_pixel = PEAK_MODEL[group]
    values, pixels = size
    return int(fixed + max(per_value * values, per_pixel * pixels))


def side_by_side(budget_bytes: Optional[int], size: Tuple[int, int]) -> Tuple[bool, str]:
    """Whether the TFLite worker may convert while this process converts and gates Core ML, and why
    (``size``: :func:`activation_values`)."""
    worker, coreml = estimated_peak(TFLITE_WORKER, size), estimated_peak("coreml", size)
    estimate = f"estimated peaks: TFLite worker {worker / GIB:.1f} GiB, Core ML {coreml / GIB:.1f} GiB"
    if budget_bytes is None:
        return True, f"side by side ({estimate}; no budget)"
    over = [name for name, peak in (("the TFLite worker", worker), ("Core ML", coreml)) if peak > budget_bytes]
    alone = f"; {' and '.join(over)} alone over the budget" if over else ""
    if worker + coreml <= budget_bytes:
        return True, f"side by side ({estimate}, together within the budget of {budget_bytes / GIB:.1f} GiB)"
    return False, (f"one after the other ({estimate}, together over the budget of {budget_bytes / GIB:.1f} GiB"
                   f"{alone})")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m export.stages DIR/export_stages.json``: the report as the export printed it, stage rows and the
    summary by kind; ``--kinds``: the summary alone."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m export.stages", description=main.__doc__.split(";")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("report", help=f"an export's stage report ({REPORT_NAME}) or the folder holding it")
    parser.add_argument("--kinds", action="store_true", help="print only the own seconds by kind and shape")
    args = parser.parse_args(argv)
    path = Path(args.report)
    path = path / REPORT_NAME if path.is_dir() else path
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not isinstance(report.get("stages"), list):
            raise ValueError("no list of stages")
        print(kind_table(report) if args.kinds else table(report))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {path}: not a readable stage report ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
