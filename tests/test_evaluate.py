"""`gmcnn-mobile evaluate`: the pipeline against Telea per mask kind, and the verdict of issue 14's bar."""
import json

import numpy as np
import pytest

from models.evaluate import evaluate, make_cases, verdict
from helpers import make_checkpoint, run_cli, write_shared_layout


@pytest.fixture(scope="module")
def data_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_shared_layout(root / "data", seed=4)
    return root / "data", make_checkpoint(root / "tiny.safetensors")


def test_evaluate_scores_pipeline_and_telea_per_kind(data_and_checkpoint):
    data, ckpt = data_and_checkpoint
    result = evaluate(ckpt, data, ["Kite.jpg", "lxqt-fog.jpg"], (48, 64), size_classes=["small", "large"],
                      threads=1, progress=False)
    rows = result["cases"]
    assert len(rows) == 2 * 3 * 2 and len({r["seed"] for r in rows}) == len(rows)
    assert all(np.isfinite(r[f"{m}_hole_{q}"]) for r in rows for m in ("model", "telea") for q in ("psnr", "ssim"))
    assert list(result["summary"]) == ["strokes", "rect", "blob", "all"]
    assert result["summary"]["all"]["cases"] == 12 and result["summary"]["blob"]["cases"] == 4
    assert set(result["verdict"]) >= {"model_wins", "kinds_won", "psnr", "ssim"}
    # an untrained network loses to Telea
    assert result["verdict"]["model_wins"] is False


def test_case_seeds_do_not_depend_on_the_subset():
    every = {(c.photo, c.kind, c.size_class): c.seed for c in make_cases(["a", "b"], ["strokes", "rect", "blob"],
                                                                         ["small", "medium", "large"])}
    some = make_cases(["b"], ["blob"], ["large"])
    assert all(every[(c.photo, c.kind, c.size_class)] == c.seed for c in some)


def _summary(kinds, overall):
    s = {k: {"model_hole_psnr": m, "telea_hole_psnr": 20.0, "model_hole_ssim": ss, "telea_hole_ssim": 0.6}
         for k, (m, ss) in kinds.items()}
    s["all"] = {"model_hole_psnr": overall[0], "telea_hole_psnr": 20.0, "model_hole_ssim": overall[1],
                "telea_hole_ssim": 0.6}
    return s


def test_verdict_needs_the_mean_and_two_of_three_kinds_on_both_scores():
    wins = _summary({"strokes": (21, 0.7), "rect": (21, 0.65), "blob": (19, 0.7)}, (20.5, 0.65))
    assert verdict(wins)["model_wins"] and verdict(wins)["kinds_won"] == ["strokes", "rect"]
    one_kind = _summary({"strokes": (23, 0.7), "rect": (21, 0.5), "blob": (19, 0.7)}, (20.5, 0.62))
    assert not verdict(one_kind)["model_wins"]
    ssim_loses = _summary({"strokes": (21, 0.7), "rect": (21, 0.65), "blob": (21, 0.4)}, (21, 0.58))
    assert not verdict(ssim_loses)["model_wins"] and verdict(ssim_loses)["psnr"]


def test_evaluate_cli_prints_the_table_and_verdict(data_and_checkpoint, tmp_path):
    data, ckpt = data_and_checkpoint
    out = tmp_path / "eval.json"
    rc, text, _ = run_cli("evaluate", "--checkpoint", ckpt, "--data", data, "--names", "Path.jpg",
                          "--size", "48x64", "--size-classes", "medium", "--threads", "1", "--out", out)
    assert rc == 0 and "| strokes | 1 |" in text and "model beats Telea: NO" in text
    assert json.loads(out.read_text())["summary"]["all"]["cases"] == 3
    rc, _, err = run_cli("evaluate", "--checkpoint", ckpt, "--data", data, "--names", "Nope.jpg")
    assert rc == 2 and "Nope.jpg" in err
    rc, _, err = run_cli("evaluate", "--checkpoint", ckpt, "--data", data, "--size", "512by680")
    assert rc == 2 and "argument --size: expected ROWSxCOLS such as 512x680, got '512by680'" in err
