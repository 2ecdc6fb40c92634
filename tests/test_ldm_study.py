"""`dualdiff ldm study` end to end on a micro configuration: every arm, metric and claim is in
study.md / study.json / study.png with a verdict; the guidance arms share one trained model."""
import json

import pytest

from dualdiff.cli import main
from dualdiff.experiments.ldm_study import LDM_STUDY_PRESETS, LDMStudyConfig, build_ldm_study, study_arms
from dualdiff.study.stats import VERDICTS

MICRO = ["preset=tiny", "seeds=2", "requests=2", "samples_per_request=2", "cond_scales=[1,3]",
         "experiment.data.image_size=16", "experiment.data.num_train=32", "experiment.data.num_test=8",
         "experiment.ae.base_channels=8", "experiment.ae.train.steps=3", "experiment.ae.train.batch_size=8",
         "experiment.model.dim=8", "experiment.model.attn_heads=1", "experiment.model.attn_dim_head=4",
         "experiment.train.steps=3", "experiment.train.batch_size=8", "experiment.sampling_timesteps=2"]


def test_arms_and_claims_of_the_tiny_preset():
    cfg = LDM_STUDY_PRESETS["tiny"]()
    assert cfg.seeds >= 3 and cfg.experiment.data.sampling == "class_balanced"
    arms = study_arms(cfg)
    assert arms == [f"{t}/{s}" for t in ("matched", "seed_mismatch") for s in
                    ("uncond", "scale1", "scale3_phi0", "scale3_phi0.7", "scale6_phi0", "scale6_phi0.7")]
    study = build_ldm_study(cfg, "tiny")
    names = {c.name: c for c in study.claims}
    assert names["guidance < uncond"].baseline == "matched/uncond"
    assert names["matched < seed's mismatch"].arm == "matched/scale6_phi0.7"  # the default sampling
    assert names["matched < seed's mismatch"].baseline == "seed_mismatch/scale6_phi0.7"
    assert names["rescaled_phi does not hurt"].baseline == "matched/scale6_phi0"
    with pytest.raises(ValueError, match="cond_scales must include 1"):
        LDMStudyConfig(cond_scales=[3.0, 6.0])
    with pytest.raises(ValueError, match="no mismatch"):
        LDMStudyConfig(test_balance_p=0.5)


def test_study_end_to_end(tmp_path, capsys, monkeypatch):
    from dualdiff.experiments import ldm

    fits = []
    real = ldm.build_trainer

    def counting(cfg, *a, **kw):
        fits.append((cfg.train.seed, cfg.data.balance_p))
        return real(cfg, *a, **kw)

    monkeypatch.setattr(ldm, "build_trainer", counting)
    out = tmp_path / "study"
    assert main(["ldm", "study", "--out-dir", str(out), *MICRO]) == 0
    # one training per seed per training arm, however many sampling arms
    assert sorted(fits) == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5)]
    rep = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    arms = [f"{t}/{s}" for t in ("matched", "seed_mismatch") for s in
            ("uncond", "scale1", "scale3_phi0", "scale3_phi0.7")]
    assert rep["arms"] == arms and rep["complete"]
    for a in arms:
        assert f"| {a} |" in md
        for m in ("cond_error", "latent_std_ratio"):
            vals = rep["arm_results"][a][m]["values"]
            assert set(vals) == {"0", "1"} and all(v is not None for v in vals.values())
    assert all(0 <= v <= 1 for a in arms for v in rep["arm_results"][a]["cond_error"]["values"].values())
    assert all(m["label"] in md for m in rep["metrics"])
    assert len(rep["claims"]) == 4
    for c in rep["claims"]:
        assert c["verdict"] in VERDICTS and c["text"] in md and f"**{c['verdict']}**" in md
    assert (out / "study.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "guidance < uncond:" in printed and "report:" in printed
    # a rerun finds every run finished and trains nothing
    fits.clear()
    assert main(["ldm", "study", "--out-dir", str(out), *MICRO]) == 0
    assert fits == []
