"""``dualdiff toy2d study`` end to end at a toy size (2 seeds, a few steps): the report files
exist and hold every arm, every claim with a verdict and the verdict rule; a rerun skips the
finished runs; a run's values do not depend on which other runs share its grid."""
from __future__ import annotations

import json

import pytest

from dualdiff.cli import main
from dualdiff.experiments.toy2d_study import (SEED_KL, TOY2D_STUDY_PRESETS, build_toy2d_study,
                                              run_toy2d_seed)
from dualdiff.study.stats import VERDICT_RULE, VERDICTS

SMALL = ["preset=tiny", "seeds=2", "experiment.train.steps=6", "experiment.data.n_train=128",
         "experiment.train.batch_size=32", "experiment.n_samples=64", "experiment.num_timesteps=8",
         "experiment.data.chunk_steps=3"]


def test_toy2d_study_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["toy2d", "study", "--out-dir", str(out), "--device", "cpu", *SMALL]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert (out / "study.png").stat().st_size > 10_000

    variants = ["baseline", "fixed", "adaptive", "adaptive_deep"]
    datasets = ["circle", "dino", "line", "moons"]
    arms = [f"{v}/{d}" for v in variants for d in datasets]
    assert rep["arms"] == arms and rep["seeds"] == [0, 1] and rep["complete"]
    assert len(rep["runs"]) == 32 and all(r["status"] == "done" for r in rep["runs"])
    assert rep["preset"] == "tiny" and rep["config"]["experiment"]["train"]["steps"] == 6
    assert rep["verdict_rule"] == VERDICT_RULE
    assert " ".join(VERDICT_RULE.split()[:12]) in " ".join(md.split())
    for a in arms:
        assert f"| {a} |" in md
        r = rep["arm_results"][a]["kl_divergence"]
        assert r["interval"]["n"] == 2 and r["interval"]["low"] is not None
        assert set(r["values"]) == {"0", "1"}
        v, d = a.split("/")
        assert r["cited"] == SEED_KL.get((v, d))       # the seed's number beside its arm
    assert [c["name"] for c in rep["claims"]] == [f"adaptive < baseline KL, {d}" for d in datasets]
    for c in rep["claims"]:
        assert c["verdict"] in VERDICTS and c["cited"].startswith("KL ")
        assert c["text"] in md and c["cited"] in md and c["name"] in printed
        assert c["interval"]["n"] == 2
        # the reported difference is the mean of the per-seed paired differences
        diffs = [rep["arm_results"][c["arm"]]["kl_divergence"]["values"][s]
                 - rep["arm_results"][c["baseline"]]["kl_divergence"]["values"][s]
                 for s in ("0", "1")]
        assert c["interval"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert len(rep["comparisons"]) == (3 + 1) * 4 * 2     # 3 variants - baseline, adaptive - fixed

    # a rerun skips every finished run
    assert main(["toy2d", "study", "--out-dir", str(out), *SMALL]) == 0
    rep2 = json.loads((out / "study.json").read_text())
    assert all(r["cached"] for r in rep2["runs"])
    assert rep2["arm_results"] == rep["arm_results"]


def test_toy2d_run_does_not_depend_on_its_grid_companions(tmp_path):
    from dualdiff.config import apply_overrides

    cfg = apply_overrides(TOY2D_STUDY_PRESETS["tiny"](), [s for s in SMALL if "=" in s and
                                                         not s.startswith("preset")])
    both = run_toy2d_seed(cfg, 3, ["baseline/moons", "adaptive/moons", "adaptive/line"],
                          tmp_path / "a")
    alone = run_toy2d_seed(cfg, 3, ["adaptive/moons"], tmp_path / "b")
    for k in ("kl_divergence", "eval_loss"):
        assert alone["adaptive/moons"][k] == pytest.approx(both["adaptive/moons"][k], rel=1e-4)
    # and the seed matters
    other = run_toy2d_seed(cfg, 4, ["adaptive/moons"], tmp_path / "c")
    assert other["adaptive/moons"]["eval_loss"] != alone["adaptive/moons"]["eval_loss"]
    study = build_toy2d_study(cfg)
    assert study.seeds == [0, 1] and len(study.arms) == 16
