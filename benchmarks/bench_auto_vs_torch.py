"""Issue 18 item 6: every experiment's training step with backend ``auto`` against the same step
with the plain-PyTorch ops (``DUALDIFF_BACKEND=torch``), at each preset, side by side in one run.

    python benchmarks/bench_auto_vs_torch.py [--device cpu|cuda] [--experiments lift,toy2d,tadiff,vae,ldm]
        [--presets tiny,default] [--rounds 7] [--steps 2] [--warmup 2] [--batch N] [--threads 1]
        [--compile] [--json out.json]

For every (experiment, preset) the experiment's own builders make the model, the loss and a batch
of the preset's image size (batch = the preset's ``train.batch_size`` unless ``--batch`` caps it;
toy2d: the preset's whole stacked grid through its Trainer, ``train_grid``). Two arms get copies
of the same initial model and their own optimizer:

  auto    ``DUALDIFF_BACKEND`` unset: each fused op picks its backend (size-aware on the CPU)
  torch   ``DUALDIFF_BACKEND=torch``: every dualdiff op runs its plain-PyTorch reference

One step = zero_grad, the experiment's loss (forward), backward, optimizer step
(``bench_tadiff.step_fn``; toy2d: ``Trainer.train_step``). After ``--warmup`` untimed steps per
arm, ``--rounds`` rounds alternate the arms (A B, then B A, ...), each timing ``--steps`` steps;
the table gives the median per arm and ``auto vs torch`` = t_torch / t_auto (>= 1: auto is at
least as fast; the issue asks >= 0.98); ``paired`` is the median over rounds of the same ratio
within a round (the two arms ran back to back: steadier under a drifting load). The ``auto picks`` column names the backend auto chose
for the experiment's fused op at the step's size; experiments without a dualdiff op in the step
(toy2d, ldm) and ops whose auto choice is the reference say so: their two arms run the same
code, so their ratio is the noise floor of the run. ``--compile`` compiles the model (as
``train.compile=true`` does; the loss stays eager as in the Trainer).

Under plain ``pytest`` (smoke mode, benchmarks/conftest.py) :func:`test_auto_vs_torch_smoke` runs
every experiment's tiny preset once at batch 2 and checks the rows.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Callable

import torch

from dualdiff._backend import ENV_VAR

HERE = pathlib.Path(__file__).resolve().parent
EXPERIMENTS = ("lift", "toy2d", "tadiff", "vae", "ldm")
PRESETS = ("tiny", "default")
ARMS = ("auto", "torch")


def _bench(name: str):
    """A sibling bench module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_dd_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def backend_env(value: str | None):
    """``DUALDIFF_BACKEND=value`` for the block (None: unset, i.e. auto)."""
    old = os.environ.get(ENV_VAR)
    if value is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def _auto_pick(fn: Callable[[], str]) -> str:
    with backend_env(None):
        return fn()


# ---------------------------------------------------------------------------------------------
# one case per experiment: (maker of an arm's step, batch size, op name, auto's choice)
# ---------------------------------------------------------------------------------------------
def _step_of(model0, loss_fn, batch, compile_: bool):
    """An arm's step on its own copy of ``model0`` (bench_tadiff.step_fn: zero_grad, loss,
    backward, AdamW step; the same draws every call)."""
    model = copy.deepcopy(model0)
    if compile_:
        if os.environ.get(ENV_VAR) == "torch":
            # The backend is chosen at trace time and no guard watches the environment: the
            # modules' own backend attribute (which dynamo guards) keeps the two arms' graphs apart.
            from dualdiff.ops.timestep_embedding import DualTimestepEmbedding

            for m in model.modules():
                if isinstance(m, DualTimestepEmbedding):
                    m.backend = "torch"
        model = torch.compile(model)  # the model only, as train.compile=true (loss eager)
    run, _ = _bench("bench_tadiff").step_fn(model, loss_fn, batch, False, train=True)
    return run


def case_tadiff(preset: str, device: torch.device, batch: int | None, compile_: bool):
    from dualdiff.experiments.tadiff import TaDiffConfig, TaDiffLoss, build_tadiff_model
    from dualdiff.ops import weighted_dice

    cfg = TaDiffConfig.from_name(preset)
    B = batch or cfg.train.batch_size
    data = _bench("bench_tadiff").make_batch(cfg, B, device)
    torch.manual_seed(0)
    model0 = build_tadiff_model(cfg).to(device).train()
    S, H = cfg.model.sessions, cfg.model.image_size
    numel = B * S * H * H
    pick = _auto_pick(lambda: weighted_dice.auto_backend(numel, device))
    return (lambda: _step_of(model0, TaDiffLoss(cfg), data, compile_), B,
            f"weighted_dice_loss [{B},{S},{H},{H}]", pick)


def case_vae(preset: str, device: torch.device, batch: int | None, compile_: bool):
    from dualdiff.experiments.vae import VAEConfig, VAELoss, build_vae_model
    from dualdiff.ops import vae as vae_ops

    cfg = VAEConfig.from_name(preset)
    B = batch or cfg.train.batch_size
    s = cfg.model.image_size
    torch.manual_seed(0)
    model0 = build_vae_model(cfg.model, 5).to(device).train()
    g = torch.Generator().manual_seed(0)
    target = torch.rand(B, 3, s, s, generator=g)
    data = (((target - 0.45) / 0.225).to(device), target.to(device),
            torch.randint(0, 5, (B,), generator=g).to(device))
    loss = VAELoss(cfg)
    loss_fn = lambda model, b: loss(model, b, 0)  # noqa: E731 - the Trainer passes the step
    pick = _auto_pick(lambda: vae_ops.auto_backend(B * 3 * s * s, device))
    return (lambda: _step_of(model0, loss_fn, data, compile_), B, f"vae_loss [{B},3,{s},{s}]", pick)


def case_lift(preset: str, device: torch.device, batch: int | None, compile_: bool):
    from dualdiff.experiments.lift import LIFTConfig, LIFTLoss, build_lift_model, build_lift_schedule
    from dualdiff.ops import timestep_embedding as te

    cfg = LIFTConfig.from_name(preset)
    B = batch or cfg.train.batch_size
    s = cfg.model.image_size
    torch.manual_seed(0)
    model0 = build_lift_model(cfg).to(device).train()
    x = (torch.rand(B, 3, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    loss_fn = LIFTLoss(build_lift_schedule(cfg))
    pick = _auto_pick(lambda: te.auto_backend(B, device))
    return (lambda: _step_of(model0, loss_fn, x, compile_), B,
            f"DualTimestepEmbedding B={B} F={cfg.model.time_freq_dim} H={cfg.model.time_emb_dim}", pick)


def case_ldm(preset: str, device: torch.device, batch: int | None, compile_: bool):
    from dualdiff.experiments.ldm import LDMConfig, LDMLoss
    from dualdiff.models.cond_unet import ClassDistUNet

    cfg = LDMConfig.from_name(preset)
    B = batch or cfg.train.batch_size
    f = cfg.ae.downsample_factor
    lat = (cfg.model.channels, cfg.data.image_size // f, cfg.data.image_size // f)
    torch.manual_seed(0)
    model0 = ClassDistUNet(cfg.model).to(device).train()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(B, *lat, generator=g).to(device),
            torch.softmax(torch.randn(B, cfg.data.num_classes, generator=g), 1).to(device),
            torch.ones(B, dtype=torch.bool, device=device))
    loss = LDMLoss(cfg)
    loss_fn = lambda model, b: loss(model, b, 0)  # noqa: E731
    return (lambda: _step_of(model0, loss_fn, data, compile_), B,
            f"none (UNet on latents {list(lat)})", "n/a (no dualdiff op in the step)")


def case_toy2d(preset: str, device: torch.device, batch: int | None, compile_: bool):
    from dualdiff.config import apply_overrides
    from dualdiff.experiments.toy2d import Toy2DConfig, grid_runs, load_datasets, train_grid

    base = Toy2DConfig.from_name(preset)
    B = batch or base.train.batch_size
    over = {"train.steps": 1, "train.device": str(device), "train.progress": False, "train.log_every": 1,
            "train.checkpoint_every": 0, "train.save_final": False, "train.batch_size": B,
            "data.chunk_steps": 1, "train.compile": compile_}
    cfg = apply_overrides(base, over)
    data = load_datasets(cfg)
    runs = grid_runs(cfg)

    def make():
        tmp = tempfile.mkdtemp(prefix="bench_auto_vs_torch_toy2d_")
        trainer = train_grid(runs, data, cfg, pathlib.Path(tmp)).trainer
        trainer.config.steps = trainer.step + 10**6  # room for the timed steps
        return trainer.train_step

    return make, B, f"none ({len(runs)} stacked MLP runs)", "n/a (no dualdiff op in the step)"


CASES = {"lift": case_lift, "toy2d": case_toy2d, "tadiff": case_tadiff, "vae": case_vae, "ldm": case_ldm}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def alternate(arms: dict[str, Callable[[], object]], envs: dict[str, str | None], rounds: int, steps: int,
              warmup: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per step of each arm, one sample per round; rounds alternate the arm order
    (A B, B A, A B, ...) so load from other processes hits both alike."""
    for name, step in arms.items():
        with backend_env(envs[name]):
            for _ in range(warmup):
                step()
    sync()
    names = list(arms)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            with backend_env(envs[name]):
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    arms[name]()
                sync()
                samples[name].append((time.perf_counter() - t0) / steps)
    return samples


def measure(experiment: str, preset: str, device: torch.device, *, batch: int | None = None, rounds: int = 15,
            steps: int = 1, warmup: int = 2, compile_: bool = False) -> dict:
    """One row: the two arms of ``experiment``'s training step at ``preset``."""
    make, B, op, pick = CASES[experiment](preset, device, batch, compile_)
    envs = {"auto": None, "torch": "torch"}
    arms = {}
    for name in ARMS:  # each arm is built (and, for toy2d, its first step taken) under its backend
        with backend_env(envs[name]):
            arms[name] = make()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    samples = alternate(arms, envs, rounds, steps, warmup, sync)
    med = {n: statistics.median(v) for n, v in samples.items()}
    return {"experiment": experiment, "preset": preset, "batch": B, "op": op, "auto_picks": pick,
            "auto_s": med["auto"], "torch_s": med["torch"], "ratio": med["torch"] / med["auto"],
            "paired": statistics.median(t / a for a, t in zip(samples["auto"], samples["torch"])),
            "auto_samples": samples["auto"], "torch_samples": samples["torch"], "compiled": compile_}


def _fmt(sec: float) -> str:
    return f"{sec:.2f} s" if sec >= 1 else f"{sec * 1e3:.1f} ms"


def _same_code(row: dict) -> bool:
    return row["auto_picks"] == "torch" or row["auto_picks"].startswith("n/a")


def table(rows: list[dict]) -> str:
    lines = ["| experiment | preset | batch | fused op in the step | auto picks | auto (median) | torch (median) "
             "| auto vs torch | paired |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}x" + (" (same code: noise floor)" if _same_code(r) else "")
        lines.append(f"| {r['experiment']} | {r['preset']}{' compiled' if r['compiled'] else ''} | {r['batch']} "
                     f"| {r['op']} | {r['auto_picks']} | {_fmt(r['auto_s'])} | {_fmt(r['torch_s'])} | {ratio} "
                     f"| {r['paired']:.3f}x |")
    return "\n".join(lines)


def _cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS))
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=1, help="steps per arm and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: each preset's train.batch_size)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="compile the model (train.compile=true)")
    p.add_argument("--json", default=None, help="write the rows (with every sample) to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    exps = [e for e in a.experiments.split(",") if e]
    presets = [q for q in a.presets.split(",") if q]
    for e in exps:
        if e not in CASES:
            p.error(f"unknown experiment {e!r}; choose from {', '.join(EXPERIMENTS)}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    load0 = os.getloadavg()
    print(f"{dev_name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch "
          f"thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {a.rounds} alternating "
          f"rounds of {a.steps} step(s) per arm after {a.warmup} warm-up steps; load average before "
          f"{load0[0]:.2f} / {load0[1]:.2f} (1 / 5 min)", flush=True)
    rows = []
    for e in exps:
        for q in presets:
            t0 = time.perf_counter()
            row = measure(e, q, device, batch=a.batch, rounds=a.rounds, steps=a.steps, warmup=a.warmup,
                          compile_=a.compile)
            rows.append(row)
            print(f"  {e} {q}: auto {_fmt(row['auto_s'])}, torch {_fmt(row['torch_s'])}, "
                  f"{row['ratio']:.3f}x ({time.perf_counter() - t0:.0f} s)", flush=True)
    load1 = os.getloadavg()
    print()
    print(table(rows))
    print(f"\nload average after: {load1[0]:.2f} / {load1[1]:.2f} (1 / 5 min) on {os.cpu_count()} cores")
    if a.json:
        meta = {"device": dev_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "rounds": a.rounds, "steps": a.steps, "warmup": a.warmup, "load_before": load0,
                "load_after": load1}
        pathlib.Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# smoke (plain pytest)
# ---------------------------------------------------------------------------------------------
def test_auto_vs_torch_smoke():
    """Every experiment's tiny preset once, batch 2: both arms ran and the table has its rows."""
    rows = [measure(e, "tiny", torch.device("cpu"), batch=2, rounds=2, steps=1, warmup=1) for e in EXPERIMENTS]
    assert [r["experiment"] for r in rows] == list(EXPERIMENTS)
    for r in rows:
        assert len(r["auto_samples"]) == len(r["torch_samples"]) == 2
        assert r["auto_s"] > 0 and r["torch_s"] > 0 and r["ratio"] > 0
    picks = {r["experiment"]: r["auto_picks"] for r in rows}
    assert picks["toy2d"].startswith("n/a") and picks["ldm"].startswith("n/a")
    assert picks["lift"] == "torch"  # no CPU kernel for the timestep embedding
    text = table(rows)
    assert text.count("\n") == len(rows) + 1 and "same code" in text


if __name__ == "__main__":
    raise SystemExit(main())
