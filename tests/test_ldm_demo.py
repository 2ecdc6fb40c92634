"""`dualdiff ldm demo`'s answer: one figure (requested distribution beside samples per guidance
scale, headline in the title) and a report saying which differences are within noise."""
import json

import pytest
import torch

from dualdiff.experiments.ldm import LDMConfig, demo_report


def _metrics(uncond, by_setting, n=4):
    rows = [{"cond_scale": float(k.split("/")[0]), "rescaled_phi": float(k.split("/")[1]),
             "cond_error": sum(v) / len(v)} for k, v in by_setting.items()]
    return {"cond_error": rows, "cond_error_per_sample": {"unconditional": uncond, **by_setting},
            "requests": [[0.2] * 5] * (len(uncond) // n), "samples_per_request": n,
            "cond_error_ae_roundtrip": 0.03}


def test_report_separates_real_differences_from_noise():
    g = torch.Generator().manual_seed(0)
    uncond = (0.6 + 0.05 * torch.randn(16, generator=g)).tolist()
    noise = (0.05 * torch.randn(16, generator=g)).tolist()
    s6 = [0.2 + e for e in noise]
    s6_phi = [v + 0.01 * e for v, e in zip(s6, torch.randn(16, generator=g).tolist())]  # ~ the same
    cfg = LDMConfig()  # cond_scale 6, rescaled_phi 0.7
    rep = demo_report(_metrics(uncond, {"1/0": uncond[::-1], "6/0": s6, "6/0.7": s6_phi}), cfg)
    d = {(x["setting"], x["baseline"]): x for x in rep["differences"]}
    assert d[("6/0.7", "unconditional")]["outside_noise"] and d[("6/0.7", "unconditional")]["high"] < 0
    assert not d[("6/0.7", "6/0")]["outside_noise"]  # phi changed nothing beyond noise
    assert not d[("1/0", "unconditional")]["outside_noise"]  # a permutation of the same values
    assert "cond_scale 6, phi 0.7" in rep["headline"] and f"{sum(s6_phi) / 16:.2f}" in rep["headline"]
    md = rep["markdown"]
    assert "Within noise (the 95 % interval contains 0): " in md and "6/0.7 vs 6/0" in md
    assert md.count("**outside noise**") == sum(x["outside_noise"] for x in rep["differences"])


@pytest.mark.slow  # ~40 s on the loaded 2-core machine; `pytest -m slow tests/test_ldm_demo.py`
def test_demo_end_to_end_writes_the_figure_and_report(tmp_path, capsys):
    from dualdiff.cli import main

    out = tmp_path / "demo"
    micro = ["data.image_size=16", "data.num_train=32", "data.num_test=8", "ae.base_channels=8", "model.dim=8",
             "model.attn_heads=1", "model.attn_dim_head=4", "sampling_timesteps=2", "eval_requests=2",
             "eval_samples=2", "num_samples=2", "eval_loss_batches=1", "eval_cond_scales=[1,6]",
             "ae.train.steps=3", "ae.train.batch_size=8", "train.steps=3", "train.batch_size=8"]
    assert main(["ldm", "demo", "--out-dir", str(out), *micro]) == 0
    summary = json.loads((out / "demo.json").read_text())
    md = (out / "demo.md").read_text()
    assert summary["headline"] in md and "within noise" in md.lower()
    assert {(d["setting"], d["baseline"]) for d in summary["differences"]} >= {
        ("6/0.7", "unconditional"), ("6/0.7", "6/0"), ("6/0", "1/0")}
    assert (out / "demo.png").stat().st_size > 5_000
    assert "ldm demo" in capsys.readouterr().out
