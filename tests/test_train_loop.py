"""dualdiff.train loop: learning, exact resume, NaN guard, schedulers/LR logging, EMA,
gradient accumulation, compile, debug logging, metric files."""
from __future__ import annotations

import csv
import logging
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from dualdiff.train import EMA, NonFiniteLossError, TrainConfig, Trainer, read_jsonl


def _dataset(n=64, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    return torch.utils.data.TensorDataset(x, torch.tanh(0.5 * x @ w))


def _mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Dropout(dropout), nn.Linear(32, 1))


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _cfg(tmp_path, **kw):
    base = dict(steps=20, batch_size=16, lr=1e-2, out_dir=str(tmp_path), progress=False,
                keep_last=0)
    base.update(kw)
    return TrainConfig(**base)


def _losses(trainer):
    return [r["loss"] for r in trainer.history]


def test_loss_falls(tmp_path):
    tr = Trainer(_mlp(), mse, _dataset(256), _cfg(tmp_path, steps=80, scheduler="cosine",
                                                  warmup_steps=5, grad_clip=1.0))
    tr.fit()
    losses = _losses(tr)
    assert len(losses) == 80
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:5])
    # metrics written on every step, also to CSV with the same values
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 81))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and float(rows[-1]["loss"]) == pytest.approx(recs[-1]["loss"])
    assert {"lr", "grad_norm", "samples_per_s"} <= set(rows[0])


def test_bf16_autocast_on_cpu_trains(tmp_path):
    tr = Trainer(_mlp(), mse, _dataset(256), _cfg(tmp_path, steps=40, amp="bf16"))
    assert tr.amp_dtype == torch.bfloat16
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return ((out.float() - batch[1]) ** 2).mean()

    tr.loss_fn = loss_fn
    tr.fit()
    assert seen[0] == torch.bfloat16
    losses = _losses(tr)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def _noisy_loss(model, batch):
    """Uses every RNG the checkpoint must restore: torch (dropout, randn), numpy, python."""
    x, y = batch
    jitter = 1.0 + 0.01 * np.random.rand() + 0.01 * random.random()
    x = x + 0.01 * torch.randn_like(x)
    return ((model(x) - y) ** 2).mean() * jitter


@pytest.mark.parametrize("data_kind", ["dataset", "function"])
def test_resume_equals_uninterrupted_run_bitwise(tmp_path, data_kind):
    ds = _dataset(48)

    def batch_fn(index, g):
        idx = torch.randint(0, 48, (16,), generator=g)
        return ds.tensors[0][idx], ds.tensors[1][idx]

    data = ds if data_kind == "dataset" else batch_fn
    kw = dict(steps=20, checkpoint_every=10, scheduler="onecycle", ema_decay=0.9,
              ema_warmup=3, grad_clip=0.5, optimizer="adamw", weight_decay=0.01)
    straight = Trainer(_mlp(dropout=0.2), _noisy_loss, data, _cfg(tmp_path / "a", **kw))
    straight.fit()

    first = Trainer(_mlp(dropout=0.2), _noisy_loss, data, _cfg(tmp_path / "b", **kw))
    first.fit(until=13)  # run past the step-10 checkpoint, then "crash"
    assert (tmp_path / "b/checkpoints/step_00000010.pt").exists()
    # a fresh process: different initial weights and RNG state, restored from the checkpoint
    resumed = Trainer(_mlp(seed=123, dropout=0.2), _noisy_loss, data,
                      _cfg(tmp_path / "b", resume="latest", **kw))
    assert resumed.step == 13 and resumed.resumed_from.name == "step_00000013.pt"
    # resume from the step-10 checkpoint explicitly, as after a crash at step 13
    resumed = Trainer(_mlp(seed=123, dropout=0.2), _noisy_loss, data,
                      _cfg(tmp_path / "b", resume=str(tmp_path / "b/checkpoints/step_00000010.pt"),
                           **kw))
    assert resumed.step == 10
    resumed.fit()

    assert _losses(resumed) == _losses(straight)[10:]  # exact float equality, every step
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema_model.state_dict().values(),
                    resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.lr == straight.lr
    # the metrics file of the resumed run describes one trajectory: steps 1..20 once each
    recs = read_jsonl(tmp_path / "b/metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert [r["loss"] for r in recs] == [r["loss"] for r in read_jsonl(tmp_path / "a/metrics.jsonl")]


def _poisoned_data(bad_steps):
    ds = _dataset(64)

    def batch_fn(index, g):
        idx = torch.randint(0, 64, (8,), generator=g)
        return {"x": ds.tensors[0][idx], "y": ds.tensors[1][idx],
                "poison": torch.tensor(float("nan") if index + 1 in bad_steps else 0.0)}
    return batch_fn


def _poison_loss(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    p = batch["poison"]
    return loss + torch.where(torch.isnan(p), p, torch.zeros_like(p))


def test_nonfinite_loss_skips_step_and_is_logged(tmp_path):
    tr = Trainer(_mlp(), _poison_loss, _poisoned_data({3, 5}),
                 _cfg(tmp_path, steps=6, optimizer="adam", ema_decay=0.5))
    snaps = []
    for _ in range(6):
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        ema_before = {k: v.clone() for k, v in tr.ema_model.state_dict().items()}
        rec = tr.train_step()
        snaps.append((rec, before, ema_before))
    for step, (rec, before, ema_before) in enumerate(snaps, 1):
        after = tr.model.state_dict() if step == 6 else snaps[step][1]
        ema_after = tr.ema_model.state_dict() if step == 6 else snaps[step][2]
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert rec["skipped"] == (1 if step in (3, 5) else 0)
        assert unchanged == (step in (3, 5)), step
        # the EMA does not absorb a skipped step (gated on the device like the optimizer)
        assert all(torch.equal(ema_before[k], ema_after[k]) for k in ema_before) == \
            (step in (3, 5)), step
    assert tr.nonfinite_total == 2 and tr.nonfinite_consecutive == 0
    read = tr.read_record(snaps[2][0])  # records hold device tensors until read back
    assert math.isnan(read["loss"]) and read["nonfinite_reason"] == "loss"
    assert read["skipped"] == 1 and read["nonfinite_total"] == 2
    # adam's step count only advanced on the 4 real steps
    st = tr.optimizer.state_dict()["state"][0]["step"]
    assert float(st) == 4
    # and the model is the same as training without the poisoned batches at all is not
    # required; what is required is that the weights stay finite
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values())


def test_consecutive_nonfinite_stops_with_clear_error(tmp_path):
    tr = Trainer(_mlp(), _poison_loss, _poisoned_data(set(range(3, 100))),
                 _cfg(tmp_path, steps=50, max_consecutive_nonfinite=4))
    with pytest.raises(NonFiniteLossError, match=r"4 consecutive steps \(steps 3\.\.6"):
        tr.fit()
    assert tr.step == 6 and tr.nonfinite_total == 4
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if r["skipped"]] == [3, 4, 5, 6]
    assert all(r["loss"] == "nan" for r in recs if r["skipped"])


def test_inf_grad_without_scaler_is_skipped(tmp_path):
    def loss_fn(model, batch):
        out = model(batch[0])
        loss = ((out - batch[1]) ** 2).mean()
        # finite loss, infinite gradient: d/dw sqrt(w*0) at 0
        return loss + torch.sqrt(model[0].weight.sum() * 0.0)

    tr = Trainer(_mlp(), loss_fn, _dataset(64), _cfg(tmp_path, steps=2,
                                                     max_consecutive_nonfinite=0))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    assert tr.nonfinite_total == 2 and tr.history[0]["nonfinite_reason"] == "grad"
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_onecycle_lr_logged_every_step(tmp_path):
    cfg = _cfg(tmp_path, steps=25, scheduler="onecycle", lr=0.1,
               scheduler_kwargs={"pct_start": 0.4})
    tr = Trainer(_mlp(), mse, _dataset(64), cfg)
    tr.fit()
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=25, pct_start=0.4)
    expected = []
    for _ in range(25):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 26))
    assert [r["lr"] for r in recs] == pytest.approx(expected, rel=1e-12)
    peak = int(np.argmax([r["lr"] for r in recs]))
    assert 8 <= peak <= 10 and max(r["lr"] for r in recs) == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_schedules(tmp_path, kind):
    tr = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path, steps=12, scheduler=kind, lr=0.2,
                                                 warmup_steps=4, min_lr=0.02))
    tr.fit()
    lrs = [r["lr"] for r in tr.history]
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    if kind == "constant":
        assert lrs[4:] == pytest.approx([0.2] * 8)
    else:
        assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.02 - 1e-12


def test_ema_matches_closed_form():
    decay, every, warmup = 0.8, 2, 3
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=decay, update_every=every, warmup_steps=warmup)
    ws = {}
    for step in range(1, 12):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step) ** 1.5)
        ws[step] = float(step) ** 1.5
        ema.update(model, step)
    # closed form: ema = w_warmup after warm-up, then n updates at steps 4,6,8,10
    upd = [s for s in range(warmup + 1, 12) if s % every == 0]
    n = len(upd)
    expected = decay ** n * ws[warmup] + (1 - decay) * sum(
        decay ** (n - 1 - j) * ws[s] for j, s in enumerate(upd))
    for p in ema.model.parameters():
        assert torch.allclose(p, torch.full_like(p, expected), rtol=1e-6)
    assert ema.num_updates == n
    # swapping EMA weights in and out
    with ema.swapped_into(model):
        assert torch.allclose(model.weight, torch.full_like(model.weight, expected))
    assert torch.equal(model.weight, torch.full_like(model.weight, ws[11]))


def test_ema_in_trainer_extremes(tmp_path):
    tr = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path / "a", steps=5, ema_decay=0.0))
    tr.fit()
    for a, b in zip(tr.model.parameters(), tr.ema_model.parameters()):
        assert torch.equal(a, b)
    init = {k: v.clone() for k, v in _mlp().state_dict().items()}
    tr = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path / "b", steps=5, ema_decay=1.0))
    tr.fit()
    for k, v in tr.ema_model.state_dict().items():
        assert torch.equal(v, init[k])
    with tr.ema_weights() as m:
        assert torch.equal(m[0].weight, init["0.weight"])
    assert not torch.equal(tr.model[0].weight, init["0.weight"])


def test_grad_accumulation_equals_big_batch(tmp_path):
    big = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path / "a", steps=8, batch_size=16,
                                                  optimizer="sgd", lr=0.1))
    big.fit()
    acc = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path / "b", steps=8, batch_size=4,
                                                  grad_accum=4, optimizer="sgd", lr=0.1))
    acc.fit()
    assert _losses(acc) == pytest.approx(_losses(big), rel=1e-5)
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_keeps_plain_state_dict(tmp_path):
    tr = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path, steps=6, compile=True,
                                                 compile_kwargs={"backend": "eager"}))
    tr.fit()
    assert tr.train_model is not tr.model
    state = torch.load(tmp_path / "checkpoints/step_00000006.pt", weights_only=True)
    assert set(state["model"]) == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_debug_logs_first_batches_only(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dualdiff.train")
    tr = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path, steps=4, debug=True, debug_batches=2))
    tr.fit()
    lines = [r.getMessage() for r in caplog.records if "shape=" in r.getMessage()]
    assert len(lines) == 4  # 2 batches x (x, y)
    assert "shape=(16, 4) dtype=torch.float32" in lines[0] and "min=" in lines[0]
    caplog.clear()
    Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path / "off", steps=2)).fit()
    assert not [r for r in caplog.records if "shape=" in r.getMessage()]


def test_extra_metrics_and_bad_loss_fn(tmp_path):
    def loss_fn(model, batch):
        loss = mse(model, batch)
        return loss, {"mae": (model(batch[0]) - batch[1]).abs().mean(), "const": 2.0}

    tr = Trainer(_mlp(), loss_fn, _dataset(64), _cfg(tmp_path, steps=3))
    tr.fit()
    assert tr.history[-1]["const"] == 2.0 and tr.history[-1]["mae"] > 0
    tr = Trainer(_mlp(), lambda m, b: m(b[0]), _dataset(64), _cfg(tmp_path / "x", steps=1))
    with pytest.raises(TypeError, match="scalar loss tensor"):
        tr.fit()
    tr = Trainer(_mlp(), lambda m, b: torch.tensor(1.0), _dataset(64), _cfg(tmp_path / "y", steps=1))
    with pytest.raises(RuntimeError, match="does not require grad"):
        tr.fit()


def test_requested_but_missing_tensorboard_warns(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard installed")
    except ImportError:
        pass
    with pytest.warns(RuntimeWarning, match="tensorboard"):
        tr = Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path, steps=2, tensorboard=True))
    tr.fit()
    assert (tmp_path / "metrics.jsonl").exists()


def test_unknown_optimizer_and_tiny_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'.*adamw"):
        Trainer(_mlp(), mse, _dataset(64), _cfg(tmp_path, optimizer="adamx"))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        Trainer(_mlp(), mse, _dataset(8), _cfg(tmp_path, batch_size=16))


def test_fp16_grad_scaler_nan_skip_is_scaler_safe(tmp_path):
    tr = Trainer(_mlp(), _poison_loss, _poisoned_data({2}),
                 _cfg(tmp_path, steps=4, amp="fp16", lr=1e-3))
    assert tr.scaler.is_enabled() and tr.amp_dtype == torch.float16
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # no overflow on step 1
    rec1 = tr.train_step()
    assert rec1["skipped"] == 0 and rec1["amp_overflow_total"] == 0
    scale = tr.scaler.get_scale()
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    rec2 = tr.train_step()
    assert rec2["skipped"] == 1 and tr.nonfinite_total == 1
    assert tr.scaler.get_scale() == scale  # the scaler never saw the skipped step
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    rec3 = tr.train_step()  # and the next step works normally (no stale unscale state)
    assert rec3["skipped"] == 0 and math.isfinite(rec3["loss"])
    assert not all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
