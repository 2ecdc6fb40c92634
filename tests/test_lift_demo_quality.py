"""``dualdiff lift demo``'s sample-quality headline: data_vs_samples.png is titled with the offline
proxy's distance per path (named as a proxy), sample_quality.json holds the numbers, and the
report says that with one seed every difference is within noise and points to ``lift study``."""
from __future__ import annotations

import json

import pytest

from dualdiff.cli import main
from dualdiff.metrics.feature_fid import PROXY_NAME, PROXY_SHORT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMO = ["lift.train.steps=3", "lift.train.batch_size=2", "lift.train.log_every=1", "lift.data.num_images=8",
        "lift.model.channels=[8, 16]", "analysis.num_points=3", "analysis.heatmap_samples=2",
        "analysis.probes=1", "analysis.num_steps=3", "analysis.fixed_steps=3", "analysis.max_jump=2",
        "analysis.grid_images=2", "analysis.batch_size=4", "analysis.mse_samples=3", "analysis.num_images=6",
        "analysis.fid_download=false", "proxy.channels=[8]", "proxy.features=4", "proxy.steps=5",
        "proxy.num_images=16", "proxy.batch_size=8"]


def test_demo_headline_and_noise_statement(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALDIFF_NO_DOWNLOAD", "1")
    out = tmp_path / "demo"
    assert main(["lift", "demo", "--out-dir", str(out), "--device", "cpu", *DEMO]) == 0
    q = json.loads((out / "sample_quality.json").read_text())
    report = (out / "report.txt").read_text()
    paths = ["diagonal", "dp_total", "dp_64", "fixed_total"]
    assert list(q["paths"]) == paths and q["proxy"] == PROXY_NAME
    assert (out / "data_vs_samples.png").stat().st_size > 5_000
    assert q["title"].startswith(PROXY_SHORT)
    for k in paths:
        v = q["paths"][k]
        assert v["fd_proxy"] > 0 and v["nn_mse"] > 0 and v["num_samples"] == 6
        assert f"{k} {v['fd_proxy']:.3g}" in q["title"]          # the headline number per path
        assert f"{v['fd_proxy']:.4g}" in report
    assert f"held-out data {q['held_out']['fd_proxy']:.3g}" in q["title"]
    assert PROXY_NAME in report and "not FID" in report
    assert "Within noise: ALL of the differences" in report and "dualdiff lift study" in report
    assert "within noise" in q["title"] and "lift study" in q["title"]
