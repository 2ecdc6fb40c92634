"""``dualdiff vae demo`` ends with one figure (data beside reconstructions, the headline PSNR in
the title) and says which model-vs-baseline differences are within noise."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dualdiff.experiments.vae import VAEConfig, build_vae_data, demo_vae, highpass_error, image_metrics


def test_demo_figure_and_noise_statements(tmp_path):
    cfg = VAEConfig.from_name("demo")
    cfg.model.image_size, cfg.model.small_channels = 32, [8, 16]
    cfg.model.fc_hidden, cfg.model.deep_channels, cfg.model.latent_dim = 16, 8, 4
    cfg.data.num_per_env, cfg.recon_images, cfg.plots = 10, 4, False
    cfg.train = dataclasses.replace(cfg.train, steps=3, batch_size=4, eval_every=0)
    res = demo_vae(tmp_path, cfg)
    fig = res["figure"]
    assert fig == tmp_path / "demo.png" and fig.stat().st_size > 5_000
    comps = res["comparisons"]
    assert set(comps) == {"psnr", "highpass_rel_error", "accuracy"}
    ds, split, _ = build_vae_data(cfg.data, 32)
    t = torch.stack([ds[j][1] for j in split.val])
    mean_img = torch.stack([ds[j][1] for j in split.train]).mean(0, keepdim=True).expand_as(t)
    # the baseline's numbers are recomputed independently: the mean training image
    assert comps["psnr"]["baseline"] == pytest.approx(float(image_metrics(mean_img, t)[0].double().mean()), rel=1e-5)
    assert comps["highpass_rel_error"]["baseline"] == pytest.approx(float(highpass_error(mean_img, t).mean()), rel=1e-5)
    assert comps["psnr"]["model"] == pytest.approx(res["metrics"]["val"]["psnr"], rel=1e-4)
    for c in comps.values():
        iv = c["difference"]
        assert c["n"] == len(split.val) and iv["n"] == len(split.val)
        assert iv["mean"] == pytest.approx(c["model"] - c["baseline"], abs=1e-6)
        assert c["within_noise"] == (iv["low"] <= 0 <= iv["high"])
    labels = np.asarray(ds.labels)[split.val]
    majority = np.bincount(np.asarray(ds.labels)[split.train]).argmax()
    assert comps["accuracy"]["baseline"] == pytest.approx(float(np.mean(labels == majority)))


def test_demo_cli_prints_the_noise_verdicts(tmp_path, capsys):
    from dualdiff.cli import main

    args = ["model.image_size=32", "model.small_channels=[8,16]", "model.fc_hidden=16", "model.deep_channels=8",
            "model.latent_dim=4", "data.num_per_env=10", "recon_images=3", "plots=false", "train.steps=2",
            "train.batch_size=4", "train.eval_every=0"]
    assert main(["vae", "demo", "--out-dir", str(tmp_path / "d"), *args]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "d" / "demo.png").is_file() and "figure:" in out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("psnr:", "highpass_rel_error:", "accuracy:"))]
    assert len(lines) == 3 and all(("within noise" in ln) != ("beyond noise" in ln) for ln in lines)
