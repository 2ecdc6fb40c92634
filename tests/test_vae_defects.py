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
