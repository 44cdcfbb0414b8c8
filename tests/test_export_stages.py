"""export.stages: each stage's own seconds, the nested stages' taken out (no conversion: synthetic stages)."""
import pytest

from export.stages import OWN_PROCESS, TFLITE_WORKER, Stage, StageLog, kind_table, own_seconds, seconds_by_kind, table


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


def test_own_seconds_are_summed_by_kind_and_shape_each_stage_once():
    """The report's summary: a candidate's gate (``p<phase>[c<n>]k<layers>-``) is not a gate of a file as converted,
    calibration's groups count once with the calibration holding them, each shape has its column and a stage of no
    shape its own; the inference rows (gates, calibration, references) and everything add up."""
    stages = [
        _stage("checkpoint", 0.0, 1.0),
        _stage("onnx + onnxsim 64x96 tensor", 1.0, 2.0),
        _stage("onnx2tf 64x96 tensor", 3.0, 1.5, TFLITE_WORKER),
        _stage("convert tflite 64x96 tensor int8", 4.5, 0.5, TFLITE_WORKER),
        _stage("calibration group 1/2 64x96 tensor int8", 5.0, 3.0, TFLITE_WORKER),
        _stage("calibration group 2/2 64x96 tensor int8", 8.0, 2.0, TFLITE_WORKER),
        _stage("calibration 64x96 tensor int8", 5.0, 5.5, TFLITE_WORKER),
        _stage("reference 64x96", 11.0, 4.0),
        _stage("gate m_64x96_tensor_int8.tflite", 15.0, 2.0),
        _stage("describe m_64x96_tensor_int8.tflite", 17.0, 0.25),
        _stage("gate p4c12k6-m_64x96_tensor_int8.tflite", 18.0, 3.0),
        _stage("gate p0k1-m_128x192_tensor_int8.tflite nudged", 21.0, 6.0),
        _stage("fallback pruning m_64x96_tensor_int8.tflite", 17.5, 4.0),
    ]
    report = {"stages": [dict(vars(s), own_seconds=own) for s, own in zip(stages, own_seconds(stages))]}
    assert seconds_by_kind(report) == {
        "fallback candidates' gates": {"64x96": 3.0, "128x192": 6.0},
        "gates of the files as converted": {"64x96": 2.0},
        "int8 calibration": {"64x96": 5.5},
        "PyTorch references": {"64x96": 4.0},
        "manifest inventory": {"64x96": 0.25},
        "ONNX + onnxsim and onnx2tf": {"64x96": 3.5},
        "conversions": {"64x96": 0.5},
        "fallback search": {"64x96": 1.0},
        "the rest": {"": 1.0},
    }
    lines = {line[:42].strip(): line[42:].split() for line in kind_table(report).splitlines()}
    assert lines["own seconds by kind"] == ["64x96", "128x192", "no", "shape", "all"]
    assert lines["fallback candidates' gates *"] == ["3.0", "6.0", "0.0", "9.0"]
    assert lines["conversions"] == ["0.5", "0.0", "0.0", "0.5"]
    assert lines["* gates, calibration, references"] == ["14.5", "6.0", "0.0", "20.5"]
    assert lines["sum"] == ["19.8", "6.0", "1.0", "26.8"]


def test_the_printed_report_ends_with_the_summary_by_kind():
    log = StageLog()
    with log.stage("reference 64x96"):
        pass
    printed = table(log.finish())
    assert printed.splitlines()[-1].startswith("sum") and "PyTorch references *" in printed


def test_a_written_report_prints_again_and_a_bad_one_is_one_error_line(tmp_path, capsys):
    import json

    from export.stages import REPORT_NAME, main

    log = StageLog()
    with log.stage("gate m_64x96_tensor_fp32.tflite"):
        pass
    (tmp_path / REPORT_NAME).write_text(json.dumps(log.finish()))
    assert main([str(tmp_path), "--kinds"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[-2:] == ["64x96", "all"] and printed[1].startswith("gates of the files as converted *")
    assert main([str(tmp_path / REPORT_NAME)]) == 0 and "whole run" in capsys.readouterr().out
    (tmp_path / "other.json").write_text('{"stages": "none"}')
    for bad in (tmp_path / "missing.json", tmp_path / "other.json"):
        assert main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {bad}: not a readable stage report")


def test_the_report_says_when_the_summed_anonymous_peak_was_and_what_ran(monkeypatch):
    """The budget's verdict is on the processes' summed anonymous peak; the report says when it was sampled, what
    each process held then (processes of one name summed) and which stages ran at that moment -- and says nothing
    when one process's own peak, not a sampled sum, is the run's peak."""
    import types

    import export.stages as stages

    gib = 1 << 30
    held = {"self": (0, 0)}
    monkeypatch.setattr(stages, "resident_of", lambda pids: held.get(pids[0], (0, 0)))
    log = StageLog(budget_bytes=8 * gib)
    log.close()  # sampled by hand below
    log.watch(101, TFLITE_WORKER)
    log.watch(102, "tflite gate process")
    log.watch(103, "tflite gate process")
    for export, worker, gates in ((2, 0, 0), (3, 1.5, 0.25), (2, 1, 0)):  # 2, then 5 (the peak), then 3 GiB
        held.update({"self": (0, int(export * gib)), 101: (0, int(worker * gib)), 102: (0, int(gates * gib)),
                     103: (0, int(gates * gib))})
        log.sample()
        if export == 3:
            peak_at = log.since_start()
    log.add("calibration group 1/2", TFLITE_WORKER, 0.0, peak_at + 60.0, 3 * gib, 2 * gib)
    log.add("gate x.tflite", OWN_PROCESS, peak_at + 30.0, 1.0, 3 * gib, 3 * gib)
    report = log.finish()
    at = report["peak_anon_sampled_at"]
    assert report["peak_anon_bytes"] == 5 * gib and at["seconds"] == pytest.approx(peak_at, abs=0.1)
    assert at["bytes_per_process"] == {OWN_PROCESS: 3 * gib, TFLITE_WORKER: int(1.5 * gib),
                                       "tflite gate process": int(0.5 * gib)}
    assert at["stages"] == ["calibration group 1/2"]
    assert "summed anonymous peak at" in table(report) and (
        "export 3072 + tflite worker 1536 + tflite gate process 512 MiB, during: calibration group 1/2" in table(report))

    alone = StageLog(budget_bytes=8 * gib)
    alone.close()
    held.update({"self": (0, gib), 101: (0, 0), 102: (0, 0), 103: (0, 0)})
    alone.sample()
    alone._own_anon = types.SimpleNamespace(peak=lambda: 7 * gib, observe=lambda value: None)
    report = alone.finish()
    assert report["peak_anon_bytes"] == 7 * gib and "peak_anon_sampled_at" not in report
    assert "summed anonymous peak at" not in table(report)


def test_the_schedule_estimates_for_the_shipped_model_match_what_full_exports_measured():
    """The shipped model (cnum 32): at 512x680 the worker and Core ML fit the default 6 GiB budget together; at
    1024x1360 each fits alone (Core ML's largest stage measured 3.0-4.0 GiB anonymous, the worker's calibration
    4.6 GiB) but not both, so they run one after the other -- and the line does not call Core ML alone over it."""
    from export.api import _resolve_checkpoint
    from export.stages import GIB, activation_values, estimated_peak, side_by_side

    shipped, _ = _resolve_checkpoint(None)
    small, large = activation_values(shipped, [(512, 680)]), activation_values(shipped, [(512, 680), (1024, 1360)])
    assert side_by_side(6 * GIB, small)[0]
    together, why = side_by_side(6 * GIB, large)
    assert not together and "alone over the budget" not in why, why
    assert 3.5 * GIB < estimated_peak("coreml", large) < 4.5 * GIB
    assert 2.0 * GIB < estimated_peak("coreml", small) < 2.5 * GIB


def test_would_exceed_counts_this_process_and_the_watched_ones_against_the_budget(monkeypatch):
    """export.api's inventory block asks before each load whether a load as large as the largest so far would take
    the processes' summed anonymous memory over the budget (and gives back what it holds first where it would)."""
    import export.stages as stages

    gib = 1 << 30
    held = {"self": (0, 3 * gib), 101: (0, 2 * gib)}
    monkeypatch.setattr(stages, "resident_of",
                        lambda pids: tuple(map(sum, zip(*(held.get(pid, (0, 0)) for pid in pids)))))
    log = StageLog(budget_bytes=6 * gib)
    log.close()
    assert not log.would_exceed(3 * gib)  # this process alone: 6 GiB, at the budget
    log.watch(101, TFLITE_WORKER)
    assert log.would_exceed(gib + 1) and not log.would_exceed(gib)
    log.unwatch(101)
    assert not log.would_exceed(3 * gib) and log.would_exceed(3 * gib + 1)
    unbounded = StageLog(budget_bytes=None)
    unbounded.close()
    assert not unbounded.would_exceed(1 << 50)


def test_the_latest_peak_of_a_stage_of_this_process_by_name():
    log = StageLog()
    log.close()
    log.add("describe a.tflite", OWN_PROCESS, 0.0, 1.0, 9, 5)
    log.add("describe a.tflite", TFLITE_WORKER, 1.0, 1.0, 9, 99)  # another process's stage of that name
    log.add("describe b.tflite", OWN_PROCESS, 2.0, 1.0, 9, 6)
    log.add("describe a.tflite", OWN_PROCESS, 3.0, 1.0, 9, 7)
    assert log.last_peak_anon("describe a.tflite") == 7 and log.last_peak_anon("describe b.tflite") == 6
    assert log.last_peak_anon("describe c.tflite") == 0
