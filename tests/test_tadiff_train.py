"""tadiff training through the shared Trainer: both loss terms fall, resume is exact, schedules
share their random numbers; evaluation and plots write their files."""
import json

import numpy as np
import pytest
import torch

from dualdiff.experiments.tadiff import (TaDiffConfig, TaDiffDataConfig, build_tadiff_datasets,
                                         evaluate_tadiff, load_tadiff_model, plot_tadiff, train_tadiff)
from dualdiff.models.tadiff import TaDiffModelConfig


def micro(**kw) -> TaDiffConfig:
    cfg = TaDiffConfig.tiny()
    cfg.model = TaDiffModelConfig(image_size=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                                  attention_ds=[], num_heads=1, norm_groups=4)
    cfg.data = TaDiffDataConfig(num_patients=3, val_patients=1, depth=4, sessions=5)
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.warmup_steps = 6, 4, 1, 2
    cfg.eval_batches, cfg.eval_t_points, cfg.sample_cases, cfg.num_samples, cfg.sample_steps = 1, 3, 2, 2, 3
    for k, v in kw.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def test_training_lowers_noise_and_dice_terms(tmp_path):
    cfg = micro()
    cfg.train.steps, cfg.train.lr = 60, 1e-2
    tr = train_tadiff(cfg, tmp_path, verbose=False)
    for key in ("noise_mse", "dice_loss"):
        v = np.array([r[key] for r in tr.history])
        assert len(v) == 60
        assert v[-10:].mean() < 0.9 * v[:10].mean(), (key, v[:10].mean(), v[-10:].mean())


def test_resume_is_exact_with_the_learnable_lambda(tmp_path):
    cfg = micro(schedule="learnable")
    a = train_tadiff(cfg, tmp_path / "a", verbose=False)
    train_tadiff(cfg, tmp_path / "b", verbose=False, until=3)
    b = train_tadiff(cfg, tmp_path / "b", resume=True, verbose=False)
    assert b.resumed_from is not None and b.step == 6
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert any(k.startswith("lam.") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la = [r["loss"] for r in a.history][3:]
    lb = [r["loss"] for r in b.history]
    assert la == lb
    # the log-variances trained with the model (from 0) and λ(t) = λ0·exp(-s) is what loads
    model, loaded = load_tadiff_model(tmp_path / "a")
    s = model.lam.log_var.detach()
    assert s.abs().max() > 0 and torch.equal(s, sa["lam.log_var"])
    tab = model.lam.table()
    assert torch.allclose(tab, loaded.lambda0 * torch.exp(-s[model.lam.bin(torch.arange(loaded.T))]))


def test_schedules_share_initial_weights_and_random_numbers(tmp_path):
    datasets = build_tadiff_datasets(micro(), tmp_path / "data")
    runs = {s: train_tadiff(micro(schedule=s), tmp_path / s, datasets=datasets, verbose=False, until=1)
            for s in ("fixed", "power", "learnable")}
    first = {s: r.history[0] for s, r in runs.items()}
    # step 1's noise term is computed before any update: same weights, batch, targets, t, noise
    assert first["fixed"]["noise_mse"] == first["power"]["noise_mse"] == first["learnable"]["noise_mse"]
    assert first["fixed"]["lambda_mean"] != first["power"]["lambda_mean"]


def test_evaluate_and_plot_write_their_files(tmp_path):
    cfg = micro()
    train_tadiff(cfg, tmp_path, verbose=False)
    res = evaluate_tadiff(tmp_path, verbose=False, overrides=["num_samples=3"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    np.testing.assert_equal(saved["sample"], res["sample"])      # (nan-aware)
    for k in ("dice@0.25", "dice@0.5", "dice@0.75", "ssim", "psnr", "mae"):
        assert np.isfinite(res["sample"][k])
    assert len(res["dice_vs_t"]["t"]) == 3 and res["val"]["loss"] > 0
    s = torch.load(tmp_path / "samples.pt", weights_only=True)["samples"]
    assert s["image"].shape == (2, 3, 3, 16, 16) and s["mask"].shape == (2, 3, 16, 16)
    files = plot_tadiff(tmp_path)
    assert {f.name for f in files} >= {"lambda_schedules.png", "loss_curves.png", "dice_vs_t.png",
                                       "samples_power.png"}
    assert all(f.stat().st_size > 1000 for f in files)


class OracleEps(torch.nn.Module):
    """Returns the exact ε of the true target session (and its true mask as logits)."""

    def __init__(self, x0, label, schedule):
        super().__init__()
        self.x0, self.label, self.ab = x0, label, schedule.alphas_cumprod.float()

    def forward(self, x, t, days, treatments, target):
        B, S = x.shape[0], self.label.shape[1]
        x_t = x.reshape(B, S, 3, *x.shape[-2:])[torch.arange(B), target]
        ab = self.ab[t][:, None, None, None]
        eps = (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return torch.cat([(self.label * 2 - 1) * 20, eps], 1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_with_the_exact_noise_recovers_the_target(sampler):
    from dualdiff.data.tadiff import make_patient
    from dualdiff.experiments.tadiff import build_tadiff_schedule, sample_metrics, sample_target

    cfg = micro(sampler=sampler, num_samples=2, sample_steps=10)
    p = make_patient(0, 0, size=16, depth=4, sessions=4)
    z = int(np.argmax((p.label[-1] > 0).sum((0, 1))))
    batch = {"image": torch.from_numpy(p.image[None, ..., z]), "label": torch.from_numpy((p.label[None, ..., z] > 0).astype(np.float32)),
             "days": torch.from_numpy(p.days[None].astype(np.float32)),
             "treatments": torch.from_numpy(p.treatment[None].astype(np.float32))}
    x0 = (batch["image"][:, -1] * 2 - 1).repeat_interleave(2, 0)
    oracle = OracleEps(x0, batch["label"].repeat_interleave(2, 0), build_tadiff_schedule(cfg))
    s = sample_target(oracle, batch, cfg)
    m = sample_metrics(s, batch)
    assert m["dice@0.5"] == 1.0 and m["ravd"] == 0.0
    assert m["psnr"] > 40 and m["ssim"] > 0.99 and m["mae"] < 0.01, m
