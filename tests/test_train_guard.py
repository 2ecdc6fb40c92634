"""dualdiff.train: no host reads on steps that do not log; the non-finite guard is decided on
the device (weights, optimizer state and EMA untouched by a skipped step) and its stop rule
fires at the next log step."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dualdiff.train import EMA, NonFiniteLossError, TrainConfig, Trainer

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))


def _data(bad_steps=(), device="cpu"):
    """Batch function; the batches of 1-based steps in ``bad_steps`` poison the loss (NaN)."""
    w = torch.linspace(-1, 1, 4).view(4, 1)

    def batch_fn(index, g):
        x = torch.randn(8, 4, generator=g)
        poison = float("nan") if index + 1 in bad_steps else 0.0
        return {"x": x, "y": torch.tanh(x @ w), "poison": torch.tensor(poison)}
    return batch_fn


def _loss(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    p = batch["poison"]
    return loss + torch.where(torch.isnan(p), p, torch.zeros_like(p))


def _cfg(tmp_path, **kw):
    base = dict(steps=12, batch_size=8, lr=1e-2, out_dir=str(tmp_path), progress=False,
                save_final=False, keep_last=0)
    base.update(kw)
    return TrainConfig(**base)


class _ReadCounter:
    """Counts calls of the Tensor methods that read values back to the host, split into
    those made inside ``Trainer.read_record`` (allowed: log steps) and all others."""

    def __init__(self, monkeypatch, trainer):
        self.outside: list[str] = []
        self.read_steps: list[int] = []
        self._inside = False
        for name in READS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))
        read_record = trainer.read_record

        def counted_read_record(rec):
            self.read_steps.append(trainer.step)
            self._inside = True
            try:
                return read_record(rec)
            finally:
                self._inside = False
        monkeypatch.setattr(trainer, "read_record", counted_read_record)

    def _wrap(self, name, orig):
        def wrapper(t, *args, **kwargs):
            if not self._inside:
                self.outside.append(name)
            return orig(t, *args, **kwargs)
        return wrapper


@pytest.mark.parametrize("kw", [
    dict(),
    dict(grad_clip=0.5, ema_decay=0.9, ema_warmup=2, scheduler="cosine", grad_accum=2),
    dict(optimizer="adam", scheduler="onecycle", ema_decay=0.5, ema_every=2),
])
def test_no_host_reads_on_steps_that_do_not_log(tmp_path, monkeypatch, kw):
    tr = Trainer(_mlp(), _loss, _data(bad_steps={6}), _cfg(tmp_path, log_every=5, **kw))
    counter = _ReadCounter(monkeypatch, tr)
    tr.fit()
    monkeypatch.undo()
    assert counter.outside == []
    assert counter.read_steps == [5, 10, 12]  # log_every and the last step only
    assert [r["step"] for r in tr.history] == [5, 10, 12]
    assert tr.nonfinite_total == 1 and tr.history[1]["nonfinite_total"] == 1


def test_host_reads_are_counted(tmp_path, monkeypatch):
    """The counter sees a read made outside read_record (so the test above can fail)."""
    tr = Trainer(_mlp(), _loss, _data(), _cfg(tmp_path, log_every=5))
    counter = _ReadCounter(monkeypatch, tr)

    def reading_loss(model, batch):
        loss = _loss(model, batch)
        float(loss.detach())
        return loss

    tr.loss_fn = reading_loss
    tr.train_step()
    monkeypatch.undo()
    assert counter.outside == ["__float__"]


def test_log_every_changes_no_value(tmp_path):
    """Records at log steps and the window mean (finite steps only) equal the per-step run."""
    every = Trainer(_mlp(), _loss, _data(bad_steps={3}), _cfg(tmp_path / "a", log_every=1))
    every.fit()
    sparse = Trainer(_mlp(), _loss, _data(bad_steps={3}), _cfg(tmp_path / "b", log_every=4))
    sparse.fit()
    by_step = {r["step"]: r for r in every.history}
    for r in sparse.history:
        for k in ("loss", "grad_norm", "lr", "skipped", "nonfinite_total"):
            assert r[k] == by_step[r["step"]][k], (r["step"], k)
    first = sparse.history[0]
    finite = [by_step[s]["loss"] for s in range(1, 5) if s != 3]
    assert first["step"] == 4 and first["loss_window_mean"] == sum(finite) / len(finite)
    for a, b in zip(every.model.parameters(), sparse.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_kwargs", [{}, {"fused": False}], ids=["fused", "host_check"])
def test_nan_step_changes_nothing_and_is_counted(tmp_path, optimizer_kwargs):
    tr = Trainer(_mlp(), _loss, _data(bad_steps={2}),
                 _cfg(tmp_path, optimizer="adamw", optimizer_kwargs=optimizer_kwargs,
                      ema_decay=0.5, scheduler="cosine"))
    tr.train_step()
    model = {k: v.clone() for k, v in tr.model.state_dict().items()}
    ema = {k: v.clone() for k, v in tr.ema_model.state_dict().items()}
    opt = {k: v.clone() for k, v in tr.optimizer.state[next(tr.model.parameters())].items()}
    lr = tr.lr
    rec = tr.train_step()
    assert all(torch.equal(model[k], v) for k, v in tr.model.state_dict().items())
    assert all(torch.equal(ema[k], v) for k, v in tr.ema_model.state_dict().items())
    state = tr.optimizer.state[next(tr.model.parameters())]
    assert all(torch.equal(opt[k], state[k]) for k in opt)  # step count, moments
    assert tr.lr < lr  # the LR schedule stays in step with the step count
    read = tr.read_record(rec)
    assert read["skipped"] == 1 and read["nonfinite_reason"] == "loss"
    assert tr.nonfinite_total == 1 and tr.nonfinite_consecutive == 1
    tr.train_step()
    assert tr.nonfinite_consecutive == 0
    assert not all(torch.equal(model[k], v) for k, v in tr.model.state_dict().items())


def test_consecutive_nonfinite_stop_fires_at_the_next_log_step(tmp_path):
    tr = Trainer(_mlp(), _loss, _data(bad_steps=set(range(3, 100))),
                 _cfg(tmp_path, steps=40, log_every=4, max_consecutive_nonfinite=3))
    tr.fit(until=2)
    weights = {k: v.clone() for k, v in tr.model.state_dict().items()}
    # step 4 logs 2 consecutive skips (below the limit); step 8 sees 6 and stops
    with pytest.raises(NonFiniteLossError, match=r"6 consecutive steps \(steps 3\.\.8;") as e:
        tr.fit()
    assert f"last logged finite loss {tr.history[0]['loss']:.6g} (step 2)" in str(e.value)
    assert tr.step == 8 and tr.nonfinite_total == 6
    assert [r["step"] for r in tr.history] == [2, 4, 8]
    assert [r["nonfinite_total"] for r in tr.history] == [0, 2, 6]
    assert all(torch.equal(weights[k], v) for k, v in tr.model.state_dict().items())


@pytest.mark.parametrize("step", [1, 4], ids=["warm-up", "decay"])
def test_ema_gate_keeps_or_equals_the_plain_update(step):
    model, twin = _mlp(0), _mlp(0)
    gated, plain = EMA(model, 0.9, warmup_steps=2), EMA(twin, 0.9, warmup_steps=2)
    with torch.no_grad():
        for m in (model, twin):
            for p in m.parameters():
                p.mul_(1.5).add_(0.25)
    before = {k: v.clone() for k, v in gated.model.state_dict().items()}
    gated.update(model, step, gate=torch.tensor(False))
    assert all(torch.equal(before[k], v) for k, v in gated.model.state_dict().items())
    gated.update(model, step, gate=torch.tensor(True))
    plain.update(twin, step)
    after = gated.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in plain.model.state_dict().items())
    assert not torch.equal(after["0.weight"], before["0.weight"])


@pytest.mark.cuda
def test_cuda_steps_run_without_a_sync(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tr = Trainer(_mlp(), _loss, _data(bad_steps={4}),
                 _cfg(tmp_path, device="cuda", log_every=100, grad_clip=1.0, ema_decay=0.9,
                      scheduler="cosine", grad_accum=2))
    assert tr.amp_dtype == torch.bfloat16
    before = tr.train_step()  # lazy initialisation (optimizer state, kernels) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        recs = [tr.train_step() for _ in range(5)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    read = [tr.read_record(r) for r in [before, *recs]]
    assert [r["skipped"] for r in read] == [0, 0, 0, 1, 0, 0]
    assert math.isfinite(read[-1]["loss"]) and tr.nonfinite_total == 1
