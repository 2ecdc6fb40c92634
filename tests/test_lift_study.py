"""``dualdiff lift study`` end to end at a toy size (2 seeds, a few training steps, 16x16 images):
the report files hold every arm, metric and claim with a verdict, the proxy by name; arms that
share a seed share the model and the sampling noise (two arms with the same path give identical
numbers); not-applicable metrics are None; a rerun skips finished runs; a bad fid_weights is one
error line, exit 2."""
from __future__ import annotations

import json

import pytest

from dualdiff.cli import main
from dualdiff.experiments.lift_study import HELD_OUT_ARM, MSE_ARMS, STUDY_PATHS
from dualdiff.metrics.feature_fid import PROXY_NAME, PROXY_SHORT
from dualdiff.study.stats import VERDICT_RULE, VERDICTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 16x16 (+ 8x8) images, 4 training steps, a 3x3 heatmap, 3 sampling points (= the fixed path's
# 2 moves + 1, so diagonal and diagonal_fixed are the same path), 8 samples per path
SMALL = ["preset=tiny", "seeds=2", "experiment.lift.model.image_size=16", "experiment.lift.data.image_size=16",
         "experiment.lift.model.channels=[8, 16]", "experiment.lift.data.num_images=24",
         "experiment.lift.train.steps=4", "experiment.lift.train.batch_size=4", "experiment.lift.train.ema_warmup=0",
         "experiment.analysis.num_points=3", "experiment.analysis.heatmap_samples=2", "experiment.analysis.probes=1",
         "experiment.analysis.num_steps=3", "experiment.analysis.fixed_steps=2", "experiment.analysis.max_jump=2",
         "experiment.analysis.num_images=8", "experiment.analysis.batch_size=8", "experiment.analysis.mse_samples=4",
         "experiment.analysis.grid_images=4", "reference_images=16",
         "experiment.proxy.channels=[8]", "experiment.proxy.features=4", "experiment.proxy.steps=5",
         "experiment.proxy.num_images=16", "experiment.proxy.batch_size=8"]


def test_lift_study_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["lift", "study", "--out-dir", str(out), "--device", "cpu", *SMALL]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert (out / "study.png").stat().st_size > 10_000
    assert (out / "work" / "feature_proxy.pt").is_file()

    arms = [f"mse/{k}" for k in MSE_ARMS] + [f"path/{p}" for p in STUDY_PATHS] + [HELD_OUT_ARM]
    metrics = ["mse_64", "mse_32", "fd_proxy", "nn_mse"]
    assert rep["arms"] == arms and rep["seeds"] == [0, 1] and rep["complete"]
    assert [m["name"] for m in rep["metrics"]] == metrics
    assert len(rep["runs"]) == 2 * len(arms) and all(r["status"] == "done" for r in rep["runs"])
    assert rep["verdict_rule"] == VERDICT_RULE and rep["preset"] == "tiny"
    for a in arms:
        assert f"| {a} |" in md
    for m in rep["metrics"]:
        assert m["label"] in md
    assert PROXY_NAME in md and PROXY_SHORT in md and "not FID" in md
    for a in arms:
        for m in metrics:
            vals = rep["arm_results"][a][m]["values"]
            applies = (m.startswith("mse") and a.startswith("mse/")) or (not m.startswith("mse") and not a.startswith("mse/"))
            if applies:
                assert all(isinstance(vals[s], float) for s in ("0", "1")), (a, m, vals)
            else:
                assert all(vals[s] is None for s in ("0", "1")), (a, m, vals)
    # common random numbers: same seed -> same model and noise; diagonal_fixed is the same path here
    for m in ("fd_proxy", "nn_mse"):
        assert rep["arm_results"]["path/diagonal"][m]["values"] == rep["arm_results"]["path/diagonal_fixed"][m]["values"]
    # ... and different seeds give different models
    v = rep["arm_results"]["path/dp_total"]["fd_proxy"]["values"]
    assert v["0"] != v["1"]
    names = [c["name"] for c in rep["claims"]]
    assert names == ["clean 32 lowers MSE 64", "clean 64 lowers MSE 32", "DP total < diagonal", "DP 64-only < diagonal"]
    for c in rep["claims"]:
        assert c["verdict"] in VERDICTS and c["cited"] and c["cited"] in md and c["text"] in md
        assert c["name"] in printed and f"**{c['verdict']}**" in md
        assert c["interval"]["n"] == 2
        diffs = [rep["arm_results"][c["arm"]][c["metric"]]["values"][s]
                 - rep["arm_results"][c["baseline"]][c["metric"]]["values"][s] for s in ("0", "1")]
        assert c["interval"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert {c["metric"] for c in rep["claims"] if c["name"].startswith("DP")} == {"fd_proxy"}
    run = next(r for r in rep["runs"] if r["arm"] == "path/fixed_total")
    assert run["info"]["sampling_steps"] == 3 and run["info"]["train_steps"] == 4

    # a rerun skips every finished run
    assert main(["lift", "study", "--out-dir", str(out), *SMALL]) == 0
    rep2 = json.loads((out / "study.json").read_text())
    assert all(r["cached"] for r in rep2["runs"]) and rep2["arm_results"] == rep["arm_results"]


def test_lift_study_user_errors(tmp_path, capsys):
    for bad, word in (("fid_weights=" + str(tmp_path / "missing.pth"), "fid_weights"),
                      ("paths=[diagonal, zigzag]", "paths"),
                      ("experiment.proxy.steps=0", "proxy.steps")):
        assert main(["lift", "study", "--out-dir", str(tmp_path / "s"), "preset=tiny", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dualdiff: error:") and word in err[0], err
