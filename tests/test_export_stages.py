"""export.stages: each stage's own seconds, the nested stages' taken out (no conversion: synthetic stages)."""
import pytest

from export.stages import OWN_PROCESS, TFLITE_WORKER, Stage, StageLog, own_seconds, table


def _stage(name, start, seconds, process=OWN_PROCESS):
    return Stage(name, process, start, seconds, 100 << 20)


def test_own_seconds_take_out_what_is_nested_once():
    """The fallback's pruning holds its candidates' gates; a gate holds nothing; the worker's calibration, at the
    same time in another process, holds its groups and is nobody's: per process the own seconds add up to the
    outermost stage's wall, where the plain seconds counted the gates twice."""
    stages = [  # in the order recorded: a nested stage ends, and is recorded, before the one holding it
        _stage("gate p4c1", 10.0, 5.0),
        _stage("gate p4c1 nudged", 15.5, 4.0),
        _stage("gate p4c2", 20.0, 3.0),
        _stage("calibration group 1/2", 0.0, 8.0, TFLITE_WORKER),
        _stage("calibration group 2/2", 8.0, 7.5, TFLITE_WORKER),
        _stage("calibration", 0.0, 15.5, TFLITE_WORKER),
        _stage("fallback pruning", 9.0, 15.0),
    ]
    own = dict(zip((s.name for s in stages), own_seconds(stages)))
    assert own == {"gate p4c1": 5.0, "gate p4c1 nudged": 4.0, "gate p4c2": 3.0, "calibration group 1/2": 8.0,
                   "calibration group 2/2": 7.5, "calibration": 0.0, "fallback pruning": 3.0}
    for process, outermost in ((OWN_PROCESS, 15.0), (TFLITE_WORKER, 15.5)):
        assert sum(v for s, v in zip(stages, own_seconds(stages)) if s.process == process) == pytest.approx(outermost)


def test_a_stage_over_the_same_interval_as_the_one_it_is_nested_in_is_told_apart_by_order():
    """To the 0.01 s kept, a stage holding just one other has its interval: the one recorded first is the nested
    one (it ended first). Deeper nesting is taken out level by level, never twice."""
    stages = [_stage("innermost", 2.0, 1.0), _stage("inner", 1.0, 3.0), _stage("same as outer", 0.0, 6.0),
              _stage("outer", 0.0, 6.0)]
    assert own_seconds(stages) == [1.0, 2.0, 3.0, 0.0]


def test_the_report_records_and_prints_own_seconds():
    log = StageLog()
    with log.stage("fallback pruning x.tflite"):
        with log.stage("gate p4c1-x.tflite"):
            pass
    log.add("calibration", TFLITE_WORKER, 0.0, 3.0, 200 << 20)
    report = log.finish()
    rows = {s["name"]: s for s in report["stages"]}
    outer, gate = rows["fallback pruning x.tflite"], rows["gate p4c1-x.tflite"]
    assert gate["own_seconds"] == gate["seconds"] and rows["calibration"]["own_seconds"] == 3.0
    assert outer["own_seconds"] == pytest.approx(max(outer["seconds"] - gate["seconds"], 0.0), abs=0.011)
    assert "own s" in table(report).splitlines()[0]
