"""The vae experiment: KL annealing, the loss in both conventions (and legacy = the original),
metrics, a tiny training run, exact resume, conv_kl wiring and CLI errors."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualdiff.errors import ConfigError
from dualdiff.experiments.vae import (LEGACY_WEIGHT, VAEConfig, VAELoss, active_units, highpass_error,
                                      image_metrics, kl_anneal_weight, load_vae_model, train_vae)


# ----------------------------------------------------------------------------- annealing
def frange_cycle_linear(n_iter, start=0.0, stop=1.0, n_cycle=4, ratio=0.5):
    """The cyclical-annealing paper's schedule, as published (haofuml/cyclical_annealing)."""
    L = np.ones(n_iter) * stop
    period = n_iter / n_cycle
    step = (stop - start) / (period * ratio)
    for c in range(n_cycle):
        v, i = start, 0
        while v <= stop and (int(i + c * period) < n_iter):
            L[int(i + c * period)] = v
            v += step
            i += 1
    return L


def test_anneal_none_and_linear_boundaries():
    assert kl_anneal_weight(0, schedule="none") == 1.0
    assert kl_anneal_weight(10**6, schedule="none") == 1.0
    lin = dict(schedule="linear", start=100, end=300)
    assert kl_anneal_weight(0, **lin) == 0.0
    assert kl_anneal_weight(99, **lin) == 0.0
    assert kl_anneal_weight(100, **lin) == 0.0
    assert kl_anneal_weight(101, **lin) == pytest.approx(1 / 200)
    assert kl_anneal_weight(200, **lin) == pytest.approx(0.5)
    assert kl_anneal_weight(299, **lin) == pytest.approx(199 / 200)
    assert kl_anneal_weight(300, **lin) == 1.0
    assert kl_anneal_weight(5000, **lin) == 1.0
    assert kl_anneal_weight(2500, schedule="linear") == 0.5  # seed defaults: 0 -> 5000
    assert [kl_anneal_weight(s, schedule="linear", start=5, end=5) for s in (4, 5, 6)] == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("n,cycles,ratio", [(100, 4, 0.5), (10, 3, 0.7), (37, 5, 0.25), (50, 1, 1.0), (23, 2, 1.0)])
def test_cyclical_matches_frange_cycle_linear(n, cycles, ratio):
    ref = frange_cycle_linear(n, n_cycle=cycles, ratio=ratio)
    ours = [kl_anneal_weight(s, schedule="cyclical", total_steps=n, cycles=cycles, ratio=ratio) for s in range(n)]
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    # an offset start shifts the schedule; before it β = 0, after the last cycle β = 1
    shifted = [kl_anneal_weight(s + 7, schedule="cyclical", start=7, total_steps=n, cycles=cycles, ratio=ratio)
               for s in range(n)]
    np.testing.assert_allclose(shifted, ref, atol=1e-9)
    assert kl_anneal_weight(3, schedule="cyclical", start=7, total_steps=n, cycles=cycles, ratio=ratio) == 0.0
    assert kl_anneal_weight(7 + n, schedule="cyclical", start=7, total_steps=n, cycles=cycles, ratio=ratio) == 1.0


def test_cyclical_by_hand():
    # 100 steps, 4 cycles of 25, ramp over 12.5 steps: 0, 0.08, ..., 0.96, then 1 until the restart
    got = [kl_anneal_weight(s, schedule="cyclical", end=100) for s in (0, 1, 12, 13, 24, 25, 26, 99)]
    assert got == pytest.approx([0.0, 0.08, 0.96, 1.0, 1.0, 0.0, 0.08, 1.0])


@pytest.mark.parametrize("kw,match", [
    (dict(schedule="cosine"), "schedule must be one of"),
    (dict(schedule="linear", start=10, end=5), r"end \(5\) must be >= start \(10\)"),
    (dict(schedule="linear", start=-1), "start must be >= 0"),
    (dict(schedule="cyclical", cycles=0), "cycles must be >= 1"),
    (dict(schedule="cyclical", ratio=0.0), "ratio must be in"),
    (dict(schedule="cyclical", start=5, end=5), "needs total_steps"),
])
def test_anneal_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        kl_anneal_weight(0, **kw)


# ----------------------------------------------------------------------------- loss
def _outputs(b=4, d=6, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 3, s, s, generator=g) * 2
    target = torch.rand(b, 3, s, s, generator=g)
    x = (target - 0.45) / 0.225
    mu, logvar = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g) * 0.5
    y_logits, y = torch.randn(b, 5, generator=g), torch.randint(0, 5, (b,), generator=g)
    return logits, x, target, mu, logvar, y_logits, y


def _seed_kld(mu, logvar):
    """The seed's KLD: a mean over batch AND latent dims."""
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_fixed_loss_is_the_formula(recon):
    cfg = VAEConfig.from_name("tiny")
    cfg.recon, cfg.kl_weight, cfg.y_weight = recon, 0.3, 0.7
    logits, x, target, mu, logvar, y_logits, y = _outputs()
    beta = 0.4
    total, parts = VAELoss(cfg).terms(logits, x, target, mu, logvar, y_logits, y, beta)
    p = torch.sigmoid(logits)
    rec = F.binary_cross_entropy(p, target) if recon == "bce" else F.mse_loss(p, target)
    ce = F.cross_entropy(y_logits, y)
    kld = _seed_kld(mu, logvar)
    assert parts["recon"].item() == pytest.approx(rec.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kld.item(), rel=1e-5)  # vae_loss's sum-over-latent KL / D
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["beta"].item() == pytest.approx(beta)
    assert total.item() == pytest.approx((rec + beta * 0.3 * kld + 0.7 * ce).item(), rel=1e-5)


def test_legacy_loss_is_the_original():
    cfg = VAEConfig.from_name("tiny")
    cfg.loss, cfg.anneal = "legacy", "none"
    logits, x, target, mu, logvar, y_logits, y = _outputs(seed=1)
    total, parts = VAELoss(cfg).terms(logits, x, target, mu, logvar, y_logits, y, 1.0)
    # VAE-DG: F.binary_cross_entropy(sigmoid(out), x, 'sum') against the normalised x (current torch
    # refuses such targets, so its formula is written out, logs clamped at -100 as torch does)
    p = torch.sigmoid(logits.double())
    xd = x.double()
    bce = -(xd * p.log().clamp(min=-100) + (1 - xd) * (1 - p).log().clamp(min=-100)).sum()
    orig = bce + LEGACY_WEIGHT * _seed_kld(mu.double(), logvar.double()) \
        + LEGACY_WEIGHT * F.cross_entropy(y_logits.double(), y, reduction="sum")
    assert total.item() == pytest.approx(orig.item(), rel=1e-5)
    assert parts["recon"].item() == pytest.approx(bce.item(), rel=1e-5)


def test_conv_kl_loss_uses_the_spatial_latent():
    cfg = VAEConfig.from_name("tiny")
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mu, logvar = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    total, parts = VAELoss(cfg).terms(logits, target, target, mu.flatten(1), logvar.flatten(1), None,
                                      torch.zeros(2, dtype=torch.long), 1.0)
    kld = _seed_kld(mu, logvar)
    assert parts["ce"].item() == 0.0
    assert total.item() == pytest.approx((F.binary_cross_entropy(torch.sigmoid(logits), target)
                                          + cfg.kl_weight * kld).item(), rel=1e-5)


# ----------------------------------------------------------------------------- metrics
def test_image_metrics_match_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 3, 16, 16, generator=g)
    p = (t + 0.1 * torch.randn(2, 3, 16, 16, generator=g)).clamp(0, 1)
    ps, ss = image_metrics(p, t)
    for i in range(2):
        a, b = t[i].permute(1, 2, 0).double().numpy(), p[i].permute(1, 2, 0).double().numpy()
        assert ps[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-4)
        assert ss[i].item() == pytest.approx(structural_similarity(a, b, data_range=1.0, channel_axis=-1), abs=1e-4)
        assert ps[i].item() == pytest.approx(-10 * math.log10(F.mse_loss(p[i], t[i]).item()), rel=1e-4)


def test_highpass_error_and_active_units():
    t = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.all(highpass_error(t, t) == 0)
    smooth = F.avg_pool2d(F.avg_pool2d(t, 4), 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.all(highpass_error(smooth, t) > 0.5)  # a blurry reconstruction loses the band
    mu = torch.zeros(50, 5)
    mu[:, :3] = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    mu[:, 3] = 0.05 * torch.randn(50, generator=torch.Generator().manual_seed(2))  # var 0.0025 < 0.01
    assert active_units(mu) == 3


# ----------------------------------------------------------------------------- training
def _small(tmp_path, plots=False, **train):
    cfg = VAEConfig.from_name("tiny")
    cfg.plots = plots
    cfg.model.image_size = 32
    cfg.model.small_channels = [16, 32, 32]
    cfg.model.fc_hidden, cfg.model.deep_channels = 64, 32
    cfg.data.num_per_env = 10
    cfg.anneal_end = 20
    cfg.eval_images = 16
    cfg.recon_images = 4
    cfg.train = dataclasses.replace(cfg.train, **{"steps": 30, "batch_size": 8, "eval_every": 0,
                                                  "log_every": 1, "lr": 2e-3, **train})
    return cfg


def test_tiny_run_lowers_recon_and_writes_outputs(tmp_path):
    res = train_vae(_small(tmp_path, plots=True), tmp_path)
    hist = [r for r in res["trainer"].history if "recon" in r]
    first, last = np.mean([r["recon"] for r in hist[:5]]), np.mean([r["recon"] for r in hist[-5:]])
    assert last < first - 0.02
    assert [r["beta"] for r in hist[:3]] == pytest.approx([0.0, 0.05, 0.10])  # β(step) with step = 0, 1, 2
    assert all(k in hist[-1] for k in ("loss", "recon", "kl", "ce", "beta", "lr"))
    assert (tmp_path / "recon_final" / "grid.png").is_file() and (tmp_path / "training.png").is_file()
    val = res["metrics"]["val"]
    assert set(val["accuracy_per_env"]) == {"warm", "dark", "bright", "blurry"}
    assert 0 <= val["active_units"] <= val["latent_dim"] == 32


def test_resume_is_exact(tmp_path):
    whole = train_vae(_small(tmp_path, steps=6, checkpoint_every=3), tmp_path / "a")["trainer"]
    train_vae(_small(tmp_path, steps=3, checkpoint_every=3), tmp_path / "b")
    resumed = train_vae(_small(tmp_path, steps=6, checkpoint_every=3), tmp_path / "b", resume="auto")["trainer"]
    assert resumed.resumed_from is not None
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history[-1]["beta"] == pytest.approx(whole.history[-1]["beta"])


def test_conv_kl_trains_through_the_experiment(tmp_path):
    from dualdiff.data.fundus import DomainSplit, SyntheticFundus

    cfg = _small(tmp_path, steps=3, batch_size=2)
    cfg.model.arch, cfg.model.base_channels, cfg.model.channel_mults = "conv_kl", 8, [1, 2]
    cfg.model.downsample_factor = 4
    ds = SyntheticFundus(6, 32, environments=["warm"], seed=1)  # prebuilt data, as ldm passes its tiles
    res = train_vae(cfg, tmp_path, data=(ds, DomainSplit(train=[0, 1, 2, 3], val=[4, 5], test=[]), None))
    assert res["metrics"]["train_images"] == 4 and res["metrics"]["val"]["n"] == 2
    val = res["metrics"]["val"]
    assert val["latent_dim"] == 4 * 8 * 8 and "accuracy" not in val
    assert all(r["ce"] == 0.0 for r in res["trainer"].history if "ce" in r)
    # the trained autoencoder reloads from the run folder (how ldm picks it up)
    model, cfg2 = load_vae_model(tmp_path)
    assert type(model).__name__ == "ConvKLAutoencoder" and cfg2.model.arch == "conv_kl"
    trained = res["trainer"].model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # vae eval rebuilds data from the config: it refuses a run trained on data given in Python
    from dualdiff.experiments.vae import evaluate_vae_run

    with pytest.raises(ConfigError, match=r"trained on data passed to train_vae\(data=...\)"):
        evaluate_vae_run(tmp_path)


# ----------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("args,match", [
    (["anneal=cosine"], "anneal must be one of"),
    (["anneal_start=10", "anneal_end=5"], r"anneal_end \(5\) must be >= anneal_start \(10\)"),
    (["data.subset_size=100"], "subset_size=100 is larger than an environment"),
    (["data.source=folder", "data.path={empty}"], "has no images"),
    (["data.source=folder", "data.path={tree}", "data.subset_size=5"], "subset_size=5 is larger than environment 'a'"),
])
def test_cli_bad_input(tmp_path, capsys, args, match):
    import re

    from dualdiff.cli import main

    (tmp_path / "empty" / "env" / "cls").mkdir(parents=True)
    from PIL import Image
    for c in ("0", "1"):
        (tmp_path / "tree" / "a" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "tree" / "a" / c / "x.png")
    args = [a.format(empty=tmp_path / "empty", tree=tmp_path / "tree") for a in args]
    rc = main(["vae", "train", "--out-dir", str(tmp_path / "out"), "preset=tiny", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dualdiff: error: ")
    assert re.search(match, err[0])


def test_cli_loo_sweep_and_plot(tmp_path, capsys):
    import json

    from dualdiff.cli import main

    small = ["preset=tiny", "model.image_size=32", "model.small_channels=[16,32,32]", "model.fc_hidden=32",
             "model.deep_channels=32", "data.num_per_env=10", "data.environments=[warm,dark]", "train.steps=2",
             "train.batch_size=4", "train.eval_every=0", "eval_images=8", "plots=false"]
    assert main(["vae", "loo", "--out-dir", str(tmp_path / "loo"), *small]) == 0
    loo = json.loads((tmp_path / "loo" / "loo.json").read_text())
    assert set(loo) == {"warm", "dark"} and all(0 <= v["test_accuracy"] <= 1 for v in loo.values())
    assert (tmp_path / "loo" / "dark" / "recon_final" / "grid.png").is_file()
    assert main(["vae", "sweep", "--out-dir", str(tmp_path / "sweep"), "--kl-weights", "1e-4,5e-4", *small]) == 0
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(sweep) == {"0.0001", "0.0005"} and (tmp_path / "sweep" / "sweep.png").is_file()
    assert main(["vae", "plot", "--out-dir", str(tmp_path / "loo")]) == 0
    assert (tmp_path / "loo" / "loo.png").is_file()
    assert "held out" in capsys.readouterr().out


# ----------------------------------------------------------------------------- vae eval
def test_eval_scores_the_run_again(tmp_path, capsys):
    import json

    from dualdiff.cli import main
    from dualdiff.experiments.vae import evaluate_vae_run

    cfg = _small(tmp_path, steps=3)
    cfg.data.test_env = "dark"
    cfg.eval_images = 4  # the run scores a stratified subset
    res = train_vae(cfg, tmp_path / "run")
    # the stored config: the same images and weights give the same numbers as the run's own
    again = evaluate_vae_run(tmp_path / "run")
    for split in ("val", "test"):
        got, want = again[split], res["metrics"][split]
        assert got.keys() == want.keys() and got["n"] == want["n"] == 4, split
        assert got["accuracy_per_env"] == pytest.approx(want["accuracy_per_env"])
        for k in set(want) - {"accuracy_per_env"}:
            assert got[k] == pytest.approx(want[k]), (split, k)
    assert again["test_env"] == "dark" and again["step"] == 3
    assert (tmp_path / "run" / "eval.json").is_file()
    assert (tmp_path / "run" / "eval_recon" / "grid.png").is_file()
    # eval_images=0: every held-out image, through the CLI, into another folder
    rc = main(["vae", "eval", "--checkpoint", str(tmp_path / "run"), "--out-dir", str(tmp_path / "ev"),
               "eval_images=0"])
    assert rc == 0
    full = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert full["eval_images"] == 0
    assert full["val"]["n"] == full["val"]["n_available"] == 6  # 20 % of 10 images x 3 environments
    assert full["test"]["n"] == full["test"]["n_available"] == 10  # all of the held-out environment
    assert "validation image(s) scored" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["kl_weight=1e-3"], "kl_weight cannot change"),
    (["data.test_env=warm"], "data.test_env cannot change"),
    (["data.holdout_fraction=0.5"], "data.holdout_fraction cannot change"),
    (["model.latent_dim=8"], "model.latent_dim cannot change"),
    (["train.lr=1e-3"], r"train.lr is not used by this command .*train.batch_size, train.device"),
    (["preset=tiny"], "preset= does not apply here"),
])
def test_eval_refuses_keys_it_would_ignore(tmp_path, capsys, args, match):
    import re

    from dualdiff.cli import main

    train_vae(_small(tmp_path, steps=1), tmp_path / "run")
    capsys.readouterr()
    rc = main(["vae", "eval", "--checkpoint", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dualdiff: error: "), err
    assert re.search(match, err[0]), err[0]
    assert not (tmp_path / "run" / "eval.json").exists()


def test_eval_refuses_data_that_is_not_the_runs(tmp_path, capsys):
    import json

    from dualdiff.cli import main

    train_vae(_small(tmp_path, steps=1), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert info["data"] == "config" and info["train_images"] == 32  # 4 environments x 8 (80 % of 10)
    info["train_images"] = 31  # as if files under data.path had changed since training
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["vae", "eval", "--checkpoint", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 32 training images, but the run trained on 31" in err[0]


def test_eval_needs_a_run(tmp_path, capsys):
    from dualdiff.cli import main

    assert main(["vae", "eval"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert main(["vae", "eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
