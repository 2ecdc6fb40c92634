"""Issue 20's vae defects: held-out metrics scored on a class- and environment-stratified
selection (not the first N indices), and annealing that ends inside the run by default."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from dualdiff.data.fundus import DomainFolder, domain_split
from dualdiff.experiments.vae import eval_selection, evaluate_vae


class _AlwaysGradeZero(nn.Module):
    """A stand-in model: reconstructs the input's mean colour, predicts class 0 for every image,
    and a latent that varies with the image (so active units are defined)."""

    def forward(self, x, sample=True):
        b = x.shape[0]
        logits = torch.zeros_like(x)
        mu = torch.stack([x.mean((1, 2, 3)), x[:, 0].mean((1, 2))], 1)
        y_logits = torch.zeros(b, 3)
        y_logits[:, 0] = 1.0
        return logits, mu, torch.zeros_like(mu), y_logits


def _class_ordered_tree(root, envs=("a", "b", "c"), classes=("0", "1", "2"), per=4):
    """root/<env>/<class>/<k>.png, tiny images whose colour depends on (env, class, k)."""
    from PIL import Image

    for ei, e in enumerate(envs):
        for ci, c in enumerate(classes):
            d = root / e / c
            d.mkdir(parents=True)
            for k in range(per):
                Image.new("RGB", (8, 8), (40 * ei + 10 * k, 60 * ci, 30)).save(d / f"{k}.png")
    return root


def test_held_out_scores_cover_every_class_and_environment(tmp_path):
    ds = DomainFolder(_class_ordered_tree(tmp_path / "tree"), 16)
    # test environment 'c' whole (12 images, in class-folder order: 4 x grade 0 first)
    split = domain_split(ds.env_labels, [2], holdout_fraction=0.5, seed=0, environments=ds.environments)
    assert [int(ds.labels[i]) for i in split.test[:4]] == [0, 0, 0, 0]
    model = _AlwaysGradeZero()
    # capped at 6 of 12: stratified -> 2 images per class; always-grade-0 scores exactly 1/3
    # (the old first-6 selection saw 4 grade-0 images of 6 and scored 2/3)
    test = evaluate_vae(model, ds, split.test, max_images=6, seed=0)
    assert test["n"] == 6 and test["n_available"] == 12
    assert test["accuracy"] == pytest.approx(1 / 3)
    assert evaluate_vae(model, ds, split.test)["accuracy"] == pytest.approx(1 / 3)  # all 12
    # validation: 2 per (class, env) of environments a and b, sorted -> env a first
    assert sorted(split.val) == split.val and len(split.val) == 12
    val = evaluate_vae(model, ds, split.val, max_images=6, seed=0)
    assert set(val["accuracy_per_env"]) == {"a", "b"}  # the old first-6 covered 'a' only
    pick = eval_selection(ds, split.val, 6, seed=0)
    assert Counter(int(ds.env_labels[i]) for i in pick) == {0: 3, 1: 3}  # each env its share
    for e, name in enumerate(ds.environments[:2]):
        grade0 = [ds.labels[i] == 0 for i in pick if ds.env_labels[i] == e]
        assert val["accuracy_per_env"][name] == pytest.approx(np.mean(grade0))


def test_eval_selection_is_stratified_seeded_and_whole_when_uncapped(tmp_path):
    ds = DomainFolder(_class_ordered_tree(tmp_path / "tree", per=5), 16)
    every = list(range(len(ds)))                      # 45 images, 9 (class, env) groups of 5
    assert eval_selection(ds, every, 0) == every
    assert eval_selection(ds, every[::-1], 45) == every
    pick = eval_selection(ds, every, 18, seed=3)
    groups = Counter((int(ds.labels[i]), int(ds.env_labels[i])) for i in pick)
    assert len(pick) == 18 and len(set(pick)) == 18 and set(groups.values()) == {2}
    assert pick == eval_selection(ds, every, 18, seed=3)
    assert pick != eval_selection(ds, every, 18, seed=4)
    # unequal groups: proportional shares (largest remainder), the total exact
    some = [i for i in every if not (ds.labels[i] == 0 and ds.env_labels[i] == 0)] + [0]
    pick = eval_selection(ds, some, 10, seed=0)
    assert len(pick) == 10 and set(pick) <= set(some)
    counts = Counter((int(ds.labels[i]), int(ds.env_labels[i])) for i in pick)
    assert counts[(0, 0)] <= 1 and max(counts.values()) <= 2
    # without labels: a seeded uniform subset
    plain = torch.utils.data.TensorDataset(torch.zeros(20, 1))
    sub = eval_selection(plain, list(range(20)), 5, seed=1)
    assert len(sub) == 5 and sub != list(range(5)) and sub == sorted(sub)


# ----------------------------------------------------------------------------- annealing defaults
from dualdiff.experiments.vae import VAE_PRESETS, VAEConfig, VAELoss, kl_anneal_weight  # noqa: E402


def _frange_cycle_linear(n_iter, n_cycle=4, ratio=0.5):
    """The cyclical-annealing paper's schedule (haofuml/cyclical_annealing), start 0, stop 1."""
    L = np.ones(n_iter)
    period = n_iter / n_cycle
    step = 1.0 / (period * ratio)
    for c in range(n_cycle):
        v, i = 0.0, 0
        while v <= 1.0 and int(i + c * period) < n_iter:
            L[int(i + c * period)] = v
            v += step
            i += 1
    return L


def _betas(cfg):
    kw = cfg.anneal_kwargs()
    return np.array([kl_anneal_weight(s, **kw) for s in range(cfg.train.steps)])


@pytest.mark.parametrize("preset", sorted(VAE_PRESETS))
def test_every_preset_reaches_beta_one_at_a_quarter_of_the_run(preset):
    cfg = VAEConfig.from_name(preset)
    assert cfg.anneal == "linear" and cfg.anneal_end is None and cfg.anneal_end_frac is None
    n = cfg.train.steps
    b = _betas(cfg)
    first_one = int(np.argmax(b >= 1.0))
    assert b[-1] == 1.0 and first_one == round(0.25 * n)        # the default preset: 1250 of 5000
    assert 0.1 * n <= first_one <= 0.3 * n and b[0] == 0.0


def test_anneal_fractions_and_absolute_steps():
    cfg = VAEConfig.from_name("tiny")                          # 200 steps
    cfg.anneal_end_frac = 0.1
    assert cfg.anneal_kwargs()["end"] == 20 and int(np.argmax(_betas(cfg) >= 1)) == 20
    cfg.anneal_end_frac, cfg.anneal_end = None, 30             # the absolute key
    assert cfg.anneal_kwargs()["end"] == 30
    # cyclical: by default frange_cycle_linear over the whole run, cycles and ratio as given
    cfg = VAEConfig.from_name("tiny")
    cfg.anneal, cfg.anneal_cycles, cfg.anneal_ratio = "cyclical", 3, 0.4
    np.testing.assert_allclose(_betas(cfg), _frange_cycle_linear(200, 3, 0.4), atol=1e-9)
    cfg.anneal_total_frac = 0.5                                # the first half, then β = 1
    b = _betas(cfg)
    np.testing.assert_allclose(b[:100], _frange_cycle_linear(100, 3, 0.4), atol=1e-9)
    assert (b[100:] == 1.0).all()
    cfg.anneal_total_frac, cfg.anneal_total_steps = None, 80
    np.testing.assert_allclose(_betas(cfg)[:80], _frange_cycle_linear(80, 3, 0.4), atol=1e-9)


@pytest.mark.parametrize("args,match", [
    (["anneal_end=100", "anneal_end_frac=0.2"], "anneal_end=100 and anneal_end_frac=0.2 conflict"),
    (["anneal=cyclical", "anneal_total_steps=50", "anneal_total_frac=0.5"], "conflict: give one"),
    (["anneal_end_frac=1.5"], r"anneal_end_frac must be in \(0, 1\]"),
    (["anneal_total_frac=0.5"], "apply to anneal=cyclical only"),
    (["anneal=none", "anneal_end=10"], "do not apply to anneal=none"),
    (["anneal_start=100"], r"anneal_start \(100\) is after the ramp's end \(50 = 0.25 x"),
])
def test_cli_anneal_key_errors(tmp_path, capsys, args, match):
    import re

    from dualdiff.cli import main

    rc = main(["vae", "train", "--out-dir", str(tmp_path / "out"), "preset=tiny", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dualdiff: error: ")
    assert re.search(match, err[0])


@pytest.mark.parametrize("size,latent", [(16, 8), (32, 5)])
def test_effective_beta_is_the_weight_of_the_summed_convention(size, latent):
    """total·3S² == Σ_pixels BCE + effective_beta · Σ_latent KL (batch means), the usual β."""
    cfg = VAEConfig.from_name("tiny")
    cfg.model.image_size, cfg.model.latent_dim, cfg.kl_weight, cfg.y_weight = size, latent, 3e-3, 0.0
    g = torch.Generator().manual_seed(size)
    b = 4
    logits, t = torch.randn(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    mu, logvar = torch.randn(b, latent, generator=g), 0.5 * torch.randn(b, latent, generator=g)
    total, _ = VAELoss(cfg).terms(logits, t, t, mu, logvar, None, torch.zeros(b, dtype=torch.long), 1.0)
    bce_sum = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.double(), t.double(), reduction="none").flatten(1).sum(1).mean()
    kl_sum = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp())).double().sum(1).mean()
    beta = cfg.effective_beta()
    assert beta == pytest.approx(3e-3 * 3 * size * size / latent)
    assert (total.double() * 3 * size * size).item() == pytest.approx((bce_sum + beta * kl_sum).item(), rel=2e-5)
    assert VAEConfig().effective_beta() == pytest.approx(1e-4 * 3 * 224 ** 2 / 256)  # 0.0588
