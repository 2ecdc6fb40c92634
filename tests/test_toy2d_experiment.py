"""toy2d grid: stacked models, per-run clipping, stacked == alone training, outputs, plots, CLI."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.cli import main as cli_main
from dualdiff.config import ConfigError, apply_overrides
from dualdiff.diffusion import ddpm_sample, make_schedule, q_sample
from dualdiff.experiments.toy2d import (TOY2D_PRESETS, GridBatches, RunBatches, Toy2DConfig,
                                        branch_weights, build_run_model, grid_runs,
                                        load_datasets, load_results, make_toy_schedule,
                                        run_grid, run_seeds, sample_runs, train_grid,
                                        trainer_config)
from dualdiff.models.stacked import StackedModels
from dualdiff.models.toy2d import VARIANTS, build_toy_model
from dualdiff.train import TrainConfig, Trainer
from dualdiff.train.distributed import default_device

SMALL = dict(embedding_dim=16, hidden_dim=32, hidden_layers=1)
# the tests' sizes, as dotted Toy2DConfig keys over the template's defaults
TINY = {"data.n_train": 600, "train.steps": 30, "train.batch_size": 32, "num_timesteps": 20,
        "data.chunk_steps": 8, "n_samples": 300, "train.ema_update_after_step": 4, "train.ema_every": 2,
        "train.log_every": 10, "train.progress": False,
        **{f"model.{k}": v for k, v in SMALL.items()}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> Toy2DConfig:
    """``Toy2DConfig()`` with :data:`TINY` and ``overrides`` (dotted keys, ``.`` as ``__``)."""
    return apply_overrides(Toy2DConfig(), {**TINY, **{k.replace("__", "."): v
                                                       for k, v in overrides.items()}})


def train_each_alone(runs, data, config: Toy2DConfig, out_dir) -> list[dict]:
    """The oracle: every run trained alone (plain model, the Trainer's own global clipping), one
    after the other, with the same seeds and batches as in the grid. Returns per run
    ``{"run", "model", "ema_model", "train_losses" [steps]}``."""
    device = default_device(config.train.device)
    schedule = make_toy_schedule(config).to(device)
    out = []
    for v, d in runs:
        model = build_run_model(v, d, config)
        batches = GridBatches([data[d]], [run_seeds(config, v, d)["data"]], config, device)
        history = torch.zeros(config.train.steps, device=device)
        trainer = Trainer(model, _alone_loss(schedule, history), batches,
                          trainer_config(config, Path(out_dir) / f"{v}_{d}", device))
        try:
            trainer.fit()
        finally:
            trainer.close()
        out.append({"run": (v, d), "model": trainer.model, "ema_model": trainer.ema_model,
                    "train_losses": history.cpu().numpy()})
    return out


def _alone_loss(schedule, history):
    def loss_fn(m, batch):
        x0, t, noise = batch["x0"][0], batch["t"][0], batch["noise"][0]
        loss = F.mse_loss(m(q_sample(x0, t, noise, schedule), t), noise)
        history[batch["index"]] = loss.detach()
        return loss
    return loss_fn


# ---------------------------------------------------------------------------------------------
# StackedModels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_forward_matches_members_and_unstacks(variant):
    models = [build_toy_model(variant, **SMALL) for _ in range(3)]
    stack = StackedModels(models)
    assert stack.num_models == 3
    # one stacked parameter per member parameter, leading dimension M
    for name, p in models[0].named_parameters():
        assert stack.stacked_parameters()[name].shape == (3, *p.shape)
    x, t = torch.randn(3, 7, 2) * 2, torch.randint(0, 100, (3, 7))
    kw = {} if variant == "baseline" else {"return_weights": True}
    got = stack(x, t, **kw)
    for m, model in enumerate(models):
        ref = model(x[m], t[m], **kw)
        if variant == "baseline":
            torch.testing.assert_close(got[m], ref, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(got[0][m], ref[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[1][m], ref[1], rtol=1e-6, atol=1e-6)
    # back to individual models / state dicts
    for m, (sd, model) in enumerate(zip(stack.state_dicts(), models)):
        assert set(sd) == set(model.state_dict())
        for k, v in model.state_dict().items():
            assert torch.equal(sd[k], v)
        one = stack.unstack(m)
        assert type(one) is type(model) and all(p.requires_grad for p in one.parameters())
        out_one = one(x[m], t[m])
        out_ref = model(x[m], t[m])
        torch.testing.assert_close(out_one, out_ref, rtol=0, atol=0)
    # overwrite one member
    new = build_toy_model(variant, **SMALL)
    stack.load_member_state_dict(1, new.state_dict())
    assert all(torch.equal(stack.member_state_dict(1)[k], v) for k, v in new.state_dict().items())
    assert all(torch.equal(stack.member_state_dict(0)[k], v)
               for k, v in models[0].state_dict().items())


def test_stacked_models_bad_input():
    with pytest.raises(ValueError, match="models"):
        StackedModels([])
    with pytest.raises(TypeError, match="member 1"):
        StackedModels([build_toy_model("baseline", **SMALL), build_toy_model("fixed", **SMALL)])
    with pytest.raises(ValueError, match="member 1"):
        StackedModels([build_toy_model("baseline", **SMALL),
                       build_toy_model("baseline", embedding_dim=16, hidden_dim=8,
                                       hidden_layers=1)])
    stack = StackedModels([build_toy_model("baseline", **SMALL) for _ in range(2)])
    with pytest.raises(ValueError, match="leading dimension 2"):
        stack(torch.randn(3, 4, 2), torch.randint(0, 10, (3, 4)))
    with pytest.raises(IndexError, match="index"):
        stack.unstack(2)
    with pytest.raises(KeyError, match="missing"):
        stack.load_member_state_dict(0, {})
    with pytest.raises(ValueError, match="max_norm"):
        stack.clip_grad_norm_(0.0)


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_per_member_clipping_equals_clipping_each_model_alone(mode):
    torch.manual_seed(1)
    models = [build_toy_model("adaptive", **SMALL) for _ in range(3)]
    stack = StackedModels(models)
    stack.clip_mode = mode
    x, t = torch.randn(3, 16, 2), torch.randint(0, 100, (3, 16))
    scale = torch.tensor([1.0, 30.0, 0.01])  # member 1 far above the limit, member 2 below
    (stack(x, t).pow(2).mean(dim=(1, 2)) * scale).sum().backward()
    top = stack.clip_grad_norm_(0.5)
    norms = []
    for m, model in enumerate(models):
        (model(x[m], t[m]).pow(2).mean() * scale[m]).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
    norms = torch.stack(norms)
    assert norms[1] > 0.5 > norms[2]  # both branches of the rule are exercised
    tol = dict(rtol=0, atol=0) if mode == "exact" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stack.last_grad_norms, norms, **tol)
    torch.testing.assert_close(top, norms.max(), **tol)
    for m, model in enumerate(models):
        for name, p in model.named_parameters():
            torch.testing.assert_close(stack.stacked_parameters()[name].grad[m], p.grad,
                                       rtol=1e-6, atol=1e-7)
    # a global norm over the stack would have clipped member 0 too: per member is different
    g0 = torch.cat([p.grad.flatten() for p in models[0].parameters()]).norm()
    assert torch.isclose(g0, torch.clamp(norms[0], max=0.5), rtol=1e-5)


class _Clipped(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.calls = []

    def clip_grad_norm_(self, max_norm):
        self.calls.append(max_norm)
        return torch.tensor(123.0)


def test_trainer_calls_a_models_own_clipping(tmp_path):
    """dualdiff.train.loop: with grad_clip set, a model's clip_grad_norm_ replaces the global one."""
    model = _Clipped()

    def data(i, g):
        return torch.randn(8, 2, generator=g) * 100

    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, grad_clip=0.5, out_dir=str(tmp_path),
                      save_final=False, progress=False)
    tr = Trainer(model, lambda m, b: m.lin(b).pow(2).mean(), data, cfg)
    tr.fit()
    tr.close()
    assert model.calls == [0.5, 0.5, 0.5]
    assert tr.history[-1]["grad_norm"] == 123.0
    # the model's hook did not clip, so the gradient is the unclipped (large) one
    assert model.lin.weight.grad.norm() > 0.5
    # no hook: the Trainer's global clipping as before
    plain = nn.Linear(2, 1)
    tr = Trainer(plain, lambda m, b: m(b).pow(2).mean(), data,
                 TrainConfig(steps=1, batch_size=8, lr=1e-3, grad_clip=0.5,
                             out_dir=str(tmp_path / "p"), save_final=False, progress=False))
    tr.fit()
    tr.close()
    assert torch.cat([p.grad.flatten() for p in plain.parameters()]).norm() <= 0.5 + 1e-5


# ---------------------------------------------------------------------------------------------
# data streams, sampling, weights
# ---------------------------------------------------------------------------------------------
def test_run_batches_are_epoch_permutations_and_deterministic():
    rb = RunBatches(n=50, batch_size=8, num_timesteps=20, seed=3, chunk=4)  # 6 batches / epoch
    idx = torch.cat([rb.chunk_draws(c)[0] for c in range(3)])  # 12 steps = 2 epochs
    first, second = idx[:6].flatten(), idx[6:12].flatten()
    assert len(set(first.tolist())) == 48 and len(set(second.tolist())) == 48  # no repeats
    assert not torch.equal(first, second)
    again = RunBatches(n=50, batch_size=8, num_timesteps=20, seed=3, chunk=4).chunk_draws(1)
    for a, b in zip(again, rb.chunk_draws(1)):
        assert torch.equal(a, b)
    _, t, noise = rb.chunk_draws(0)
    assert t.min() >= 0 and t.max() < 20 and noise.shape == (4, 8, 2)


def test_sampling_stacked_equals_ddpm_sample_of_each_member():
    torch.manual_seed(2)
    models = [build_toy_model("fixed", **SMALL) for _ in range(2)]
    stack = StackedModels(models).eval()
    sched = make_schedule("linear", num_timesteps=15)
    got = sample_runs(stack, 64, sched, seeds=[11, 12])
    for m, model in enumerate(models):
        g = torch.Generator().manual_seed(11 + m)
        x_T = torch.randn(64, 2, generator=g)
        ref = ddpm_sample(lambda x, t: model(x, t), x_T, sched, generator=g).sample
        torch.testing.assert_close(got[m], ref, rtol=1e-5, atol=1e-5)
    # a member's samples do not depend on what is sampled beside it
    alone = sample_runs(StackedModels(models[1:]), 64, sched, seeds=[12])
    torch.testing.assert_close(alone[0], got[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seeds"):
        sample_runs(stack, 8, sched, seeds=[1])


def test_branch_weights_over_timesteps():
    models = [build_toy_model("adaptive_deep", **SMALL) for _ in range(2)]
    w = branch_weights(StackedModels(models), 20)
    assert w.shape == (2, 20, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 20))
    t = torch.arange(20)
    ref = models[1].branch_weights(models[1].time_emb(t))
    torch.testing.assert_close(w[1], ref, rtol=1e-6, atol=1e-6)
    fixed = branch_weights(StackedModels([build_toy_model("fixed", **SMALL)]), 5)
    assert torch.equal(fixed, torch.full((1, 5, 2), 0.5))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def test_stacked_training_equals_training_each_run_alone(tmp_path):
    """Same seed -> same init, same batches; per-run clipping -> the grid's runs end where each
    run trained alone (plain model, Trainer's own clipping) ends: weights, EMA and losses."""
    # small clip: clipping is active; dino: the points shipped in the package
    cfg = tiny_config(train__steps=25, train__grad_clip=0.05, train__lr=1e-3,
                      datasets=["circle", "dino"])
    runs = grid_runs(cfg)
    assert runs == [(v, d) for v in VARIANTS for d in ("circle", "dino")]
    data = load_datasets(cfg)
    grid = train_grid(runs, data, cfg, tmp_path / "grid")
    assert (grid.model.last_grad_norms > 0.05).all()
    alone = train_each_alone(runs, data, cfg, tmp_path / "alone")
    states, ema_states = grid.model.run_state_dicts(), grid.ema_model.run_state_dicts()
    for r, one in enumerate(alone):
        assert one["run"] == runs[r]
        ref, ema_ref = one["model"].state_dict(), one["ema_model"].state_dict()
        assert set(states[r]) == set(ref)
        for k in ref:
            torch.testing.assert_close(states[r][k], ref[k], rtol=1e-6, atol=1e-6, msg=f"{runs[r]} {k}")
            torch.testing.assert_close(ema_states[r][k], ema_ref[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grid.train_losses[:, r], one["train_losses"], rtol=1e-6,
                                   atol=1e-6)
        # and the weights moved away from the (shared) initialisation
        init = build_run_model(*runs[r], cfg).state_dict()
        assert any(not torch.equal(init[k], ref[k]) for k in ref)


def test_grid_resumes_exactly_after_a_crash(tmp_path):
    """A grid stopped at step 9 (checkpoints every 4 steps and at the stop) and resumed ends
    with the weights, EMA weights and per-step losses of the uninterrupted run; a resume of a
    finished grid trains nothing."""
    cfg = tiny_config(train__steps=14, train__checkpoint_every=4, train__keep_last=2,
                      variants=["baseline", "adaptive"], datasets=["circle", "line"])
    runs = grid_runs(cfg)
    data = load_datasets(cfg)
    full = train_grid(runs, data, cfg, tmp_path / "full")
    part = train_grid(runs, data, cfg, tmp_path / "cut", until=9)
    assert part.trainer.step == 9 and (part.train_losses[9:] == 0).all()
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step_00000008.pt", "step_00000009.pt"]  # keep_checkpoints=2
    # none written after the (timed) first warmup_steps_timed steps
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == \
        ["step_00000012.pt", "step_00000014.pt"]
    rest = train_grid(runs, data, cfg, tmp_path / "cut", resume=True)
    assert rest.resumed_from_step == 9 and rest.trainer.step == 14
    np.testing.assert_array_equal(rest.train_losses, full.train_losses)
    for got, want in ((rest.model, full.model), (rest.ema_model, full.ema_model)):
        for a, b in zip(got.run_state_dicts(), want.run_state_dicts()):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    again = train_grid(runs, data, cfg, tmp_path / "cut", resume=True)
    assert again.resumed_from_step == 14
    np.testing.assert_array_equal(again.train_losses, full.train_losses)


@pytest.mark.slow  # ~10-25 s on 2 shared cores (torch.compile)
def test_compiled_grid_matches_eager(tmp_path):
    """torch.compile of the grid step (vmap + functional_call traced whole; aot_eager keeps the
    CPU time down) trains to the same weights as eager."""
    import torch._dynamo
    torch._dynamo.reset()
    cfg = tiny_config(train__steps=6, warmup_steps_timed=2, variants=["baseline", "adaptive"],
                      datasets=["circle", "moons"])
    runs = grid_runs(cfg)
    data = load_datasets(cfg)
    eager = train_grid(runs, data, cfg, tmp_path / "e")
    cfg_c = apply_overrides(cfg, {"train.compile": True,
                                  "train.compile_kwargs": {"backend": "aot_eager"}})
    comp = train_grid(runs, data, cfg_c, tmp_path / "c")
    assert 0 < comp.first_steps_seconds <= comp.seconds
    for a, b in zip(comp.model.run_state_dicts(), eager.model.run_state_dicts()):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(comp.train_losses, eager.train_losses, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_each_variant_loss_falls(tmp_path):
    # T = 100 as the template; a short run only gets the loss from ~0.97 to ~0.85 (the template's
    # 10 000 steps reach ~0.4-0.5), so compare the means of the first and last 25 steps
    cfg = tiny_config(train__steps=150, train__lr=1e-2, train__batch_size=64,
                      data__n_train=1000, data__chunk_steps=50, num_timesteps=100,
                      model__embedding_dim=16, model__hidden_dim=48, model__hidden_layers=2,
                      datasets=["line"])
    runs = grid_runs(cfg)
    grid = train_grid(runs, load_datasets(cfg), cfg, tmp_path)
    first, last = grid.train_losses[:25].mean(0), grid.train_losses[-25:].mean(0)
    for r, (v, _) in enumerate(runs):
        assert last[r] < 0.93 * first[r], f"{v}: loss {first[r]:.3f} -> {last[r]:.3f}"


def test_config_defaults_are_the_templates_and_validate_checks_without_changing():
    d = Toy2DConfig()
    t = d.train
    assert (d.num_timesteps, d.beta_start, d.beta_end, t.steps, t.batch_size, t.lr,
            t.weight_decay, t.scheduler, t.warmup_steps, t.grad_clip, t.amp, t.ema_decay,
            t.ema_every, t.ema_warmup, t.ema_update_after_step, t.ema_inv_gamma, t.ema_power,
            t.checkpoint_every, t.keep_last, t.log_every,
            d.data.n_train, d.n_samples, d.kl_k, d.data.dino_source) == (
        100, 1e-4, 0.02, 10_000, 256, 3e-4, 0.01, "cosine", 0, 0.5, "off", 0.995, 10, 0, 100, 1.0,
        2 / 3, 2000, 2, 100, 100_000, 10_000, 5, "embedded")  # ema-pytorch's EMA(beta=0.995, update_every=10)
    assert (d.model.embedding_dim, d.model.hidden_dim, d.model.hidden_layers) == (128, 256, 3)
    assert d.datasets == ["circle", "dino", "line", "moons"] and d.variants == list(VARIANTS)
    assert Toy2DConfig.from_name("default") == d
    tiny = Toy2DConfig.from_name("tiny")
    assert tiny == TOY2D_PRESETS["tiny"]() and tiny is not Toy2DConfig.from_name("tiny")
    with pytest.raises(ConfigError, match="unknown preset 'huge' for Toy2DConfig"):
        Toy2DConfig.from_name("huge")
    before = dataclasses.asdict(tiny)
    tiny.validate()
    assert dataclasses.asdict(tiny) == before  # validate() never changes the config
    s = run_seeds(d, "adaptive", "dino")
    assert s["data"] == run_seeds(d, "baseline", "dino")["data"]  # common random numbers
    assert s["init"] != run_seeds(d, "baseline", "dino")["init"]


@pytest.mark.parametrize("overrides, match", [
    ({"datasets": ["circle", "cube"]}, "datasets: unknown name 'cube'"),
    ({"variants": ["baseline", "baseline"]}, "variants: duplicated"),
    ({"datasets": []}, "datasets: empty"),
    ({"data.n_train": 10, "train.batch_size": 32}, r"train.batch_size \(32\) must be <= data.n_train"),
    ({"clip_mode": "global"}, "clip_mode"),
    ({"kl_k": 300}, "kl_k"),
    ({"model.hidden_dim": 0}, "model.hidden_dim"),
    ({"data.datasaurus_path": "x.tsv"}, "data.dino_source"),
    ({"train.lr": -1.0}, "lr"),  # TrainConfig checks its own keys
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny_config(), overrides)


# ---------------------------------------------------------------------------------------------
# the whole grid: files and plots; the CLI
# ---------------------------------------------------------------------------------------------
SEED_KEYS = ("training_time", "eval_loss", "inference_time", "kl_divergence")


def test_run_grid_writes_results_and_plots(tmp_path):
    datasets, variants = ["circle", "dino", "line", "moons"], ["baseline", "adaptive"]
    cfg = tiny_config(train__steps=20, datasets=datasets, variants=variants)
    res = run_grid(cfg, tmp_path)
    timing = res["timing"]
    assert timing["grid_runs"] == 8
    assert timing["training_time_per_run"] * 8 == pytest.approx(timing["grid_training_time"])
    for v in variants:
        layout = json.loads((tmp_path / v / "final_info.json").read_text())
        assert sorted(layout) == sorted(datasets)
        for d in datasets:
            run = tmp_path / v / d
            info = json.loads((run / "final_info.json").read_text())
            for k in SEED_KEYS:
                assert isinstance(info[k], float) and np.isfinite(info[k]), k
                assert layout[d]["means"][k] == info[k]
            assert info["training_time"] == pytest.approx(timing["grid_training_time"] / 8)
            assert info["inference_time"] * 4 == pytest.approx(info["group_inference_time"])
            assert 0.1 < info["eval_loss"] < 3.0
            samples = np.load(run / "samples.npy")
            assert samples.shape == (300, 2) and np.isfinite(samples).all()
            assert np.load(run / "train_losses.npy").shape == (20,)
            assert (run / "weights.npy").exists() == (v == "adaptive")
            sd = torch.load(run / "ema_model.pt", weights_only=True)
            model = build_toy_model(v, **SMALL)
            model.load_state_dict(sd)  # reloadable as an ordinary model
    w = np.load(tmp_path / "adaptive" / "moons" / "weights.npy")
    assert w.shape == (20, 2) and np.allclose(w.sum(1), 1.0, atol=1e-5)
    loaded = load_results(tmp_path)
    assert loaded["variants"] == variants and loaded["datasets"] == datasets
    assert loaded["arrays"]["baseline/dino/images"].shape == (300, 2)
    assert loaded["runs"]["adaptive/line"]["kl_divergence"] == res["runs"]["adaptive/line"][
        "kl_divergence"]
    for name in ("train_loss.png", "generated_images.png", "weight_evolution.png"):
        p = tmp_path / name
        assert p.is_file() and p.stat().st_size > 10_000, name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help(capsys):
    for argv in (["toy2d", "--help"], ["toy2d", "run", "--help"], ["toy2d", "plot", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--out-dir", "--config", "--resume", "--device", "--show-config", "key=value",
                 "preset=NAME", "run", "plot"):
        assert word in out
    for gone in ("--datasets", "--variants", "--steps", "--seed", "--compile", "--out "):
        assert gone not in out


def test_cli_show_config_lists_every_key_with_the_value_it_would_run_with(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["toy2d", "run", "--show-config", "preset=tiny", "train.steps=7",
                  "datasets=circle,dino"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "# Toy2DConfig (preset tiny)" in out
    assert any(line.startswith("train.steps: int = ") and line.endswith("-> 7")
               for line in out.splitlines())
    assert "datasets: list[str] = ['circle', 'dino', 'line', 'moons'] -> ['circle', 'dino']" in out
    for key in ("model.hidden_dim", "data.n_train", "data.dino_source", "train.lr", "n_samples"):
        assert f"\n{key}: " in out


TINY_ARGS = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY.items()]


def test_cli_tiny_run_resume_and_replot(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["toy2d", "run", "--out-dir", str(out), *TINY_ARGS, "datasets=line,moons",
            "variants=fixed,adaptive_deep", "train.steps=6", "data.n_train=300",
            "train.batch_size=16", "num_timesteps=10", "n_samples=100", "model.hidden_dim=16",
            "data.chunk_steps=3", "save_models=false"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "grid of 4 runs, 6 steps" in printed and "adaptive_deep/moons" in printed
    info = json.loads((out / "fixed" / "line" / "final_info.json").read_text())
    assert info["steps"] == 6 and set(SEED_KEYS) <= set(info)
    assert not (out / "fixed" / "line" / "ema_model.pt").exists()
    # --resume of the finished grid: no training, the same evaluation
    assert cli_main([*argv, "--resume"]) == 0
    assert "resumed at step 6" in capsys.readouterr().out
    again = json.loads((out / "fixed" / "line" / "final_info.json").read_text())
    assert again["resumed_from_step"] == 6 and again["kl_divergence"] == info["kl_divergence"]
    (out / "train_loss.png").unlink()
    assert cli_main(["toy2d", "plot", "--out-dir", str(out)]) == 0
    assert (out / "train_loss.png").is_file()


@pytest.mark.parametrize("argv, match", [
    (["train.stepz=5"], "unknown config key 'train.stepz'.*Did you mean 'train.steps'"),
    (["train.steps=many"], "config key 'train.steps': expected int"),
    (["--config", "{missing}"], "--config: no such file"),
    (["datasets=circle,cube"], "datasets: unknown name 'cube'"),
    (["--steps", "5"], "unrecognized arguments: --steps"),
    (["preset=huge"], "unknown preset 'huge'"),
    (["data.dino_source=table", "data.datasaurus_path={missing}"], "no Datasaurus Dozen table"),
])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, match):
    import re

    missing = str(tmp_path / "missing.yaml")
    argv = [a.replace("{missing}", missing) for a in argv]
    out = tmp_path / "never"
    try:
        code = cli_main(["toy2d", "run", "--out-dir", str(out), "preset=tiny", *argv])
    except SystemExit as e:  # argparse's own errors (cli.main's parser: one line, status 2)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualdiff: error:"), err
    assert re.search(match, lines[0]), lines[0]
