"""``dualdiff tadiff study`` end to end at a micro size (2 seeds, 2 steps): study.md / json / png
hold every arm, metric and claim with a verdict; the arms share their random numbers; user
mistakes are one error line."""
from __future__ import annotations

import json

import pytest

from dualdiff.cli import main
from dualdiff.experiments.tadiff_study import (ARMS, TADIFF_STUDY_PRESETS, arm_config,
                                               build_tadiff_study)
from dualdiff.study.stats import VERDICT_RULE, VERDICTS

MICRO = ["preset=tiny", "seeds=2", "experiment.train.steps=2", "experiment.train.batch_size=4",
         "experiment.train.warmup_steps=1", "experiment.data.num_patients=3",
         "experiment.data.val_patients=1", "experiment.data.depth=4", "experiment.sample_cases=2",
         "experiment.sample_steps=2", "experiment.eval_t_points=2"]


def test_tadiff_study_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["tadiff", "study", "--out-dir", str(out), "--device", "cpu", *MICRO]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert (out / "study.png").stat().st_size > 10_000
    arms = list(ARMS)
    assert rep["arms"] == arms and rep["seeds"] == [0, 1] and rep["complete"]
    assert len(rep["runs"]) == 12 and all(r["status"] == "done" for r in rep["runs"])
    assert rep["verdict_rule"] == VERDICT_RULE
    for a in arms:
        assert f"| {a} |" in md
        for m in ("dice", "ssim", "psnr"):
            r = rep["arm_results"][a][m]
            assert set(r["values"]) == {"0", "1"} and r["interval"]["n"] == 2
            assert all(v is not None for v in r["values"].values())
    assert [c["name"] for c in rep["claims"]] == [
        "power > fixed Dice", "power > linear Dice", "power > cosine Dice", "power > step Dice",
        "power does not hurt SSIM", "power does not hurt PSNR"]
    for c in rep["claims"]:
        assert c["verdict"] in VERDICTS and c["cited"].startswith("design:")
        assert c["text"] in md and c["name"] in printed
        vals = rep["arm_results"]
        diffs = [vals[c["arm"]][c["metric"]]["values"][s] - vals[c["baseline"]][c["metric"]]["values"][s]
                 for s in ("0", "1")]
        assert c["interval"]["mean"] == pytest.approx(sum(diffs) / 2)
    # the extra numbers of each run are kept beside its metrics
    assert all("val_noise_mse" in r["info"] and "onestep_dice_mean" in r["info"] for r in rep["runs"])


def test_arms_share_seeds_and_differ_only_in_lambda():
    exp = TADIFF_STUDY_PRESETS["tiny"]().experiment
    cfgs = {a: arm_config(exp, a, 7) for a in ARMS}
    for a, c in cfgs.items():
        assert (c.data.seed, c.train.seed, c.eval_seed) == (7, 7, 7)
        assert c.model == exp.model and c.train.steps == exp.train.steps
    assert (cfgs["power"].schedule, cfgs["power"].k) == ("power", 2.0)
    assert (cfgs["linear"].schedule, cfgs["linear"].k) == ("power", 1.0)
    assert {c.schedule for c in cfgs.values()} == {"fixed", "power", "cosine", "step", "learnable"}
    study = build_tadiff_study(TADIFF_STUDY_PRESETS["tiny"]())
    assert study.seeds == [0, 1, 2] and study.arms == list(ARMS)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualdiff: error:"), err
    return err[0]


def test_study_mistakes_are_one_error_line(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert "unknown study arms ['nope']" in _error(capsys, ["tadiff", "study", "--out-dir", out, "arms=fixed,nope"])
    assert "unknown λ schedule" in _error(capsys, ["tadiff", "study", "--out-dir", out,
                                                   "experiment.schedule=linear"])
