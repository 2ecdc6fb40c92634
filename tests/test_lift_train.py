"""LIFT training through the shared Trainer: the loss falls, checkpoints reload to identical
outputs (weights_only), resume continues exactly, the loss function's options."""
import copy

import pytest
import torch

from dualdiff.errors import CheckpointError

from dualdiff.config import ConfigError, apply_overrides, dump_yaml, load_config
from dualdiff.diffusion import make_schedule
from dualdiff.experiments.lift import (LIFT_PRESETS, LIFTConfig, LIFTDataConfig, build_lift_dataset, lift_loss,
                                       load_lift_model, train_lift)
from dualdiff.models.lift import LIFTDualTimestepModel, LIFTModelConfig, SingleScaleUNet
from dualdiff.train import TrainConfig



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small CPU ops: one intra-op thread avoids oversubscription on a shared machine
    (measured here: 30 tiny training steps took 117 s with 2 threads under load, ~6 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

TINY_CHANNELS = [16, 32]


def _micro(steps=30, **train_kw) -> LIFTConfig:
    """Smaller than the tiny preset so that training tests stay fast on a shared CPU."""
    kw = dict(steps=steps, batch_size=4, lr=3e-3, weight_decay=0.01, scheduler="cosine", min_lr=3e-5,
              grad_clip=1.0, ema_decay=0.9, log_every=1, progress=False, checkpoint_every=0)
    kw.update(train_kw)
    return LIFTConfig(model=LIFTModelConfig(channels=[8, 16], time_freq_dim=8, time_emb_dim=32,
                                            num_heads=2),
                      data=LIFTDataConfig(num_images=64, seed=1), train=TrainConfig(**kw))


def _probe_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 32, 32, generator=g),
            torch.tensor([10, 900]), torch.tensor([500, 3]))


def test_defaults_match_the_issue():
    cfg = LIFTConfig()
    assert cfg.schedule == "lift_cosine" and cfg.T == 1000 and not cfg.shared_timesteps
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.01
    assert cfg.train.scheduler == "cosine" and cfg.train.min_lr == 1e-6 and cfg.train.batch_size == 64
    assert cfg.model.channels == [64, 128, 256, 512] and cfg.loss_reduction == "sum"
    assert LIFTConfig.from_name("default") == cfg and set(LIFT_PRESETS) == {"tiny", "default"}
    tiny = LIFTConfig.from_name("tiny")
    assert tiny.model.channels == TINY_CHANNELS and tiny.train.min_lr < tiny.train.lr
    tiny.train.lr = 1.0  # from_name returns a fresh copy each time
    assert LIFTConfig.from_name("tiny").train.lr != 1.0
    with pytest.raises(ConfigError, match="unknown preset 'huge' for LIFTConfig.*tiny"):
        LIFTConfig.from_name("huge")
    tiny = LIFTConfig.from_name("tiny")
    # YAML round trip and key=value overrides
    again = load_config(LIFTConfig, __import__("yaml").safe_load(dump_yaml(tiny)))
    assert again == tiny
    over = apply_overrides(tiny, ["train.lr=1e-3", "shared_timesteps=true", "model.channels=[8, 16]"])
    assert over.train.lr == 1e-3 and over.shared_timesteps and over.model.channels == [8, 16]
    with pytest.raises(ConfigError, match="image_size"):
        LIFTConfig(data=LIFTDataConfig(image_size=32))
    with pytest.raises(ConfigError, match="path"):
        LIFTDataConfig(source="folder")
    with pytest.raises(ConfigError, match="data.texture_scale"):
        LIFTDataConfig(texture_scale=-1.0)
    # the tiny preset's fainter textures reach the dataset; the default preset keeps them as designed
    assert LIFTConfig().data.texture_scale == 1.0 and tiny.data.texture_scale == 0.25
    assert build_lift_dataset(apply_overrides(tiny, ["data.num_images=2"]).data).texture_scale == 0.25


def test_min_lr_is_one_key_and_validate_never_rewrites():
    """Regression: a top-level ``min_lr`` used to overwrite ``train.min_lr_ratio`` at training
    time, silently dropping the user's value. The final LR is ``train.min_lr`` only."""
    from dualdiff.config import valid_keys
    from dualdiff.experiments.lift import _prepared

    keys = valid_keys(LIFTConfig)
    assert [k for k in keys if "min_lr" in k] == ["train.min_lr"]
    cfg = apply_overrides(LIFTConfig.from_name("tiny"), ["train.min_lr=1e-4"])
    before = copy.deepcopy(cfg)
    cfg.validate()
    assert cfg == before
    assert _prepared(cfg, "somewhere", None).train.min_lr == 1e-4
    with pytest.raises(ConfigError, match="min_lr"):
        apply_overrides(cfg, ["train.min_lr=1.0"])  # above train.lr
    with pytest.raises(ConfigError, match="unknown config key 'min_lr'"):
        apply_overrides(cfg, ["min_lr=1e-5"])


def test_cosine_lr_ends_at_train_min_lr(tmp_path):
    cfg = _micro(steps=4, min_lr=1e-4)
    trainer = train_lift(cfg, tmp_path / "run", verbose=False)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-6)  # after the last step
    assert trainer.history[-1]["lr"] > 1e-4


def test_tiny_preset_ema_forgets_the_initial_weights():
    """Regression: the demo sampled an EMA that (decay 0.99, no warm-up, 200 steps) still held
    0.99**200 = 13% of the random initial weights, on top of a model too short-trained for its
    high-noise ε (samples were per-pixel noise). The preset's EMA must forget the init."""
    tr = LIFTConfig.from_name("tiny").train
    assert 0 < tr.ema_warmup < tr.steps
    assert tr.ema_decay ** (tr.steps - tr.ema_warmup) < 0.02  # of the (already trained) warm-up weights


def test_training_loss_falls_and_checkpoint_reloads(tmp_path, capsys):
    cfg = _micro(steps=30)
    trainer = train_lift(cfg, tmp_path / "run")
    assert "parameters" in capsys.readouterr().out
    losses = [r["loss"] for r in trainer.history]
    assert len(losses) == 30 and all(map(lambda v: v == v, losses))
    assert {"loss_64", "loss_32"} <= set(trainer.history[-1])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    # the cosine LR decays to min_lr
    assert trainer.history[-1]["lr"] < 0.05 * cfg.train.lr
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_00000030.pt"]

    x64, x32, t64, t32 = _probe_inputs()
    for ema, ref in ((True, trainer.ema_model), (False, trainer.model)):
        model, loaded_cfg = load_lift_model(tmp_path / "run", ema=ema)  # run dir -> latest file
        assert isinstance(model, LIFTDualTimestepModel) and not model.training
        assert loaded_cfg.model == cfg.model and loaded_cfg.train.steps == 30
        ref.eval()
        with torch.no_grad():
            a, b = model(x64, x32, t64, t32), ref(x64, x32, t64, t32)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ema_model, _ = load_lift_model(ckpts[0], ema=True)
    raw_model, _ = load_lift_model(ckpts[0], ema=False)
    with torch.no_grad():
        assert (ema_model(x64, x32, t64, t32)[0] - raw_model(x64, x32, t64, t32)[0]).abs().max() > 0


def test_resume_is_exact(tmp_path):
    cfg = _micro(steps=6, checkpoint_every=3)
    straight = train_lift(cfg, tmp_path / "a", verbose=False)
    part = train_lift(cfg, tmp_path / "b", until=3, verbose=False)
    assert part.step == 3
    resumed = train_lift(cfg, tmp_path / "b", resume="latest", verbose=False)
    assert resumed.resumed_from is not None and resumed.step == 6
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[3:]]
    for (k, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=k)
    for p, q in zip(straight.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):  # latest: must exist
        train_lift(cfg, tmp_path / "empty", resume="latest", verbose=False)
    # resume=None follows the config's train.resume key
    cfg.train.resume = "auto"
    again = train_lift(cfg, tmp_path / "b", verbose=False)
    assert again.resumed_from is not None and again.step == 6


def test_single_scale_baseline_trains_and_loads(tmp_path):
    cfg = _micro(steps=2)
    cfg.model_kind = "single"
    trainer = train_lift(cfg, tmp_path / "single", verbose=False)
    assert "loss_32" not in trainer.history[-1]
    model, loaded = load_lift_model(tmp_path / "single")
    assert isinstance(model, SingleScaleUNet) and loaded.model_kind == "single"


class _Recorder(torch.nn.Module):
    """A stand-in model that records its inputs and predicts zeros (loss = E[ε²] per scale)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x64, x32, t64, t32):
        self.calls.append((x64, x32, t64, t32))
        return x64 * self.w, x32 * self.w


def test_lift_loss_options():
    sched = make_schedule("lift_cosine", 1000)
    x = torch.rand(64, 3, 64, 64) * 2 - 1
    m = _Recorder()
    torch.manual_seed(0)
    loss, parts = lift_loss(m, x, sched)
    _, _, t64, t32 = m.calls[-1]
    assert not torch.equal(t64, t32) and t64.min() >= 0 and t64.max() < 1000
    # predicting zero noise: each per-scale MSE is E[eps^2] ~ 1 and the default is their sum
    assert abs(parts["loss_64"].item() - 1) < 0.02 and abs(parts["loss_32"].item() - 1) < 0.03
    torch.testing.assert_close(loss, parts["loss_64"] + parts["loss_32"])
    torch.manual_seed(0)
    mean_loss, _ = lift_loss(m, x, sched, reduction="mean")
    torch.testing.assert_close(mean_loss, loss / 2)
    lift_loss(m, x, sched, shared_timesteps=True)
    x64_t, x32_t, t64, t32 = m.calls[-1]
    assert torch.equal(t64, t32)
    # the 32x32 input is the noised area-downsampled view: at t = 0 it is nearly the clean view
    sched_t0 = make_schedule("lift_cosine", 2)
    lift_loss(m, (x, torch.nn.functional.avg_pool2d(x, 2)), sched_t0)
    assert m.calls[-1][1].shape == (64, 3, 32, 32)
    with pytest.raises(ValueError, match="reduction"):
        lift_loss(m, x, sched, reduction="max")
