"""``dualdiff vae study`` end to end at a toy size (2 seeds, a few steps): the report files hold
every arm, metric and claim with a verdict; the claims' differences are the per-seed paired
differences; a rerun skips the finished runs; bad study keys are one-line errors."""
from __future__ import annotations

import json

import pytest

from dualdiff.cli import main
from dualdiff.experiments.vae_study import METRICS, SCHEDULES, VAE_STUDY_PRESETS, build_vae_study
from dualdiff.study.stats import VERDICT_RULE, VERDICTS

SMALL = ["preset=tiny", "seeds=2", "experiment.train.steps=3", "experiment.train.batch_size=4",
         "experiment.data.num_per_env=6", "experiment.model.small_channels=[8,8]",
         "experiment.model.fc_hidden=16", "experiment.model.latent_dim=4",
         "experiment.model.deep_channels=8"]


def test_vae_study_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["vae", "study", "--out-dir", str(out), "--device", "cpu", *SMALL]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert (out / "study.png").stat().st_size > 10_000

    arms = [f"{s}/kl{w}" for w in ("0.0001", "0.005") for s in SCHEDULES]
    assert rep["arms"] == arms and rep["seeds"] == [0, 1] and rep["complete"]
    assert len(rep["runs"]) == 12 and all(r["status"] == "done" for r in rep["runs"])
    assert rep["verdict_rule"] == VERDICT_RULE and rep["preset"] == "tiny"
    assert [m["name"] for m in rep["metrics"]] == [m.name for m in METRICS]
    for m in METRICS:
        assert m.label in md
    for a in arms:
        assert f"| {a} |" in md
        for m in METRICS:
            r = rep["arm_results"][a][m.name]
            assert set(r["values"]) == {"0", "1"} and r["interval"]["n"] == 2
    # every run reports its effective β: kl_weight·3·32²/4
    for r in rep["runs"]:
        w = float(r["arm"].split("/kl")[1])
        assert r["info"]["effective_beta"] == pytest.approx(w * 3 * 32 * 32 / 4)
    names = {c["name"] for c in rep["claims"]}
    assert len(rep["claims"]) == 12 and len(names) == 12
    for c in rep["claims"]:
        assert c["verdict"] in VERDICTS and c["baseline"].startswith("none/")
        assert c["text"] in md and c["name"] in printed and f"**{c['verdict']}**" in md
        assert c["metric"] in {"highpass_rel_error", "psnr", "active_units"} and c["cited"]
        vals = rep["arm_results"]
        diffs = [vals[c["arm"]][c["metric"]]["values"][s] - vals[c["baseline"]][c["metric"]]["values"][s]
                 for s in ("0", "1")]
        assert c["interval"]["mean"] == pytest.approx(sum(diffs) / 2)
    for w in ("0.0001", "0.005"):
        for s in ("linear", "cyclical"):
            for m in ("highpass_rel_error", "psnr", "active_units"):
                assert any(c["arm"] == f"{s}/kl{w}" and c["metric"] == m for c in rep["claims"])
    assert "Effective β" in md and "Common random numbers" in md

    # a rerun skips every finished run and reports the same numbers
    assert main(["vae", "study", "--out-dir", str(out), *SMALL]) == 0
    rep2 = json.loads((out / "study.json").read_text())
    assert all(r["cached"] for r in rep2["runs"]) and rep2["arm_results"] == rep["arm_results"]


@pytest.mark.parametrize("args,match", [
    (["kl_weights=[1e-4,1e-4]"], "kl_weights must be distinct"),
    (["threads=0"], "threads must be an int >= 1"),
    (["experiment.anneal_end_frac=2"], r"anneal_end_frac must be in \(0, 1\]"),
])
def test_vae_study_bad_keys(tmp_path, capsys, args, match):
    import re

    rc = main(["vae", "study", "--out-dir", str(tmp_path / "s"), "preset=tiny", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dualdiff: error: ")
    assert re.search(match, err[0])


def test_tiny_preset_anneals_inside_the_run():
    cfg = VAE_STUDY_PRESETS["tiny"]()
    study = build_vae_study(cfg, "tiny")
    assert len(study.seeds) >= 3 and len(study.arms) == 6
    e = cfg.experiment
    lin = e.anneal_kwargs()
    assert lin["end"] <= 0.3 * e.train.steps
    assert "β = 1 from step 75" in " ".join(study.notes)
