"""LIFT analysis pipeline: heatmap -> paths -> plots -> generation -> MSE tests -> FID, and the demo.

Each step is a function taking a checkpoint / heatmap / output folder and an
:class:`LIFTAnalysisConfig` (YAML or ``key=value`` overridable), writing its files into the
output folder and returning what it computed. ``dualdiff lift ...`` (dualdiff/cli_lift.py)
calls them. Files written in ``out_dir``:

* ``heatmap.pt`` / ``heatmap.json`` (:class:`dualdiff.analysis.heatmap.HeatmapResult`);
  under torchrun each rank writes ``heatmap_shard{r}of{w}.pt`` and rank 0 merges;
* ``paths.json`` (grid paths: seed DP total / 64, greedy, fixed-step total / 64) and
  ``path_<kind>.json`` (:class:`dualdiff.analysis.generate.GenerationPath` per kind);
* ``heatmap.png`` (paths overlaid), ``mse.png``, ``samples.png``, ``samples_<kind>.png``;
* ``mse.json``; ``fid.json``; ``fid_<kind>/*.png`` and ``real/*.png`` for FID.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dualdiff.analysis.generate import GenerationPath, generate, generate_for_fid, make_path, save_image_grid, save_pngs
from dualdiff.analysis.heatmap import HeatmapResult, compute_error_heatmap, merge_heatmap_shards, shard_path
from dualdiff.analysis.paths import fixed_step_path, greedy_path, seed_dp_path
from dualdiff.metrics.mse_tests import format_mse_table, run_mse_tests, save_mse_results

__all__ = [
    "LIFTAnalysisConfig",
    "load_analysis_model",
    "real_images",
    "run_demo",
    "run_fid",
    "run_generate",
    "run_generate_for_fid",
    "run_heatmap",
    "run_mse",
    "run_paths",
    "run_plot",
]


@dataclass
class LIFTAnalysisConfig:
    """Settings of the analysis steps (defaults: the seed / public code's values).

    Heatmap: ``num_points`` x ``num_points`` grid log-spaced in [gamma_min, gamma_max],
    ``heatmap_samples`` real images per cell, ``probes`` Hutchinson probes, ``chunk_size`` probes
    per pass, ``cells_per_batch`` cells per batched call, ``target`` x0 / eps, ``chain_rule_snr``,
    ``heatmap_amp`` off / bf16 (autocast of the model) and ``heatmap_compile`` (torch.compile the
    batched jvp).
    Paths: ``num_steps`` sampling points (diagonal / seed DP), ``fixed_steps`` moves and
    ``max_jump`` of the fixed-step DP, ``paths`` the kinds generated and compared.
    Generation: ``num_images`` for FID, ``batch_size``, ``eta``, ``clip_sample``, ``grid_images``.
    MSE: ``mse_timestep``, ``mse_samples``. FID: ``fid_dims``, ``inception_weights``,
    ``fid_cache_dir``. ``device``: auto | cpu | cuda[:k]; ``ema``: use the EMA weights.
    """
    num_points: int = 15
    gamma_min: float = 0.01
    gamma_max: float = 100.0
    heatmap_samples: int = 16
    probes: int = 8
    chunk_size: int | None = None
    cells_per_batch: int | None = None  # None: 4 on CUDA, small passes on the CPU
    target: Literal["x0", "eps"] = "x0"
    chain_rule_snr: Literal["timestep", "grid"] = "timestep"
    heatmap_amp: Literal["off", "bf16"] = "off"
    heatmap_compile: bool = False
    seed: int = 0
    num_steps: int = 50
    fixed_steps: int = 18
    max_jump: int = 5
    paths: list[str] = field(default_factory=lambda: ["diagonal", "dp_total", "dp_64"])
    num_images: int = 1000
    batch_size: int = 64
    eta: float = 0.0
    clip_sample: bool = True
    grid_images: int = 16
    mse_timestep: int = 500
    mse_samples: int = 500
    fid_dims: int = 2048
    inception_weights: str | None = None
    fid_cache_dir: str | None = None
    device: str = "auto"
    ema: bool = True

    def validate(self) -> None:
        if self.num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {self.num_points}")
        if not 0 < self.gamma_min < self.gamma_max:
            raise ValueError(f"need 0 < gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}")
        if self.cells_per_batch is not None and self.cells_per_batch < 1:
            raise ValueError(f"cells_per_batch must be >= 1 or None, got {self.cells_per_batch}")
        for k in ("heatmap_samples", "probes", "num_steps", "fixed_steps", "max_jump",
                  "num_images", "batch_size", "grid_images", "mse_samples"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    @classmethod
    def tiny(cls) -> "LIFTAnalysisConfig":
        """The demo's CPU-sized analysis."""
        # eta = 1 (stochastic DDIM): the demo's briefly trained model has ε errors at high noise that
        # deterministic DDIM (eta = 0) carries to the end as per-pixel noise; the added noise
        # lets later steps correct them. Override with eta=0 for the seed's sampler.
        return cls(num_points=6, heatmap_samples=4, probes=2, num_steps=12, fixed_steps=8,
                   max_jump=3, num_images=64, batch_size=32, grid_images=8, mse_samples=64, eta=1.0,
                   paths=["diagonal", "dp_total", "dp_64", "fixed_total"])


def _device(cfg: LIFTAnalysisConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{rank}")
        return torch.device("cpu")
    return torch.device(cfg.device)


def load_analysis_model(checkpoint, cfg: LIFTAnalysisConfig):
    """``(model, lift_config, schedule)`` from a train_lift checkpoint, on cfg's device, eval mode."""
    from dualdiff.experiments.lift import build_lift_schedule, load_lift_model

    model, lcfg = load_lift_model(checkpoint, ema=cfg.ema, map_location="cpu")
    if getattr(lcfg, "model_kind", "dual") != "dual":
        raise ValueError("the LIFT analysis needs a dual-scale model (model_kind='dual'), "
                         f"got {lcfg.model_kind!r}")
    return model.to(_device(cfg)).eval(), lcfg, build_lift_schedule(lcfg)


def real_images(lift_cfg, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images [n, 3, 64, 64] in [-1, 1] from the run's data (a seeded random subset)."""
    from dualdiff.experiments.lift import build_lift_dataset

    data = build_lift_dataset(lift_cfg.data)
    if n > len(data):
        raise ValueError(f"asked for {n} real images but the dataset has {len(data)}")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    items = [data[int(i)] for i in idx]
    items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    return torch.stack(items).float()


def _dist():
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return rank, world


def run_heatmap(checkpoint, out_dir, cfg: LIFTAnalysisConfig, *, progress: bool = True) -> HeatmapResult | None:
    """Compute and save the heatmap. Progress is kept in ``heatmap_partial*.pt`` (every minute and
    on an error): running the same command again after a crash computes only the missing cells.
    Under torchrun (WORLD_SIZE > 1) cells are split across ranks,
    each rank writes its shard and rank 0 merges after a barrier (or, without an initialised
    process group, when all shard files exist). Returns the merged result (None on other ranks)."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, lcfg, schedule = load_analysis_model(checkpoint, cfg)
    dev = next(model.parameters()).device
    x = real_images(lcfg, cfg.heatmap_samples, cfg.seed).to(dev)
    rank, world = _dist()
    # progress survives a crash: rerunning the same command continues from this file
    partial = out / (f"heatmap_partial_rank{rank:03d}of{world:03d}.pt" if world > 1 else "heatmap_partial.pt")
    res = compute_error_heatmap(
        model, x, schedule, num_points=cfg.num_points, gamma_min=cfg.gamma_min, gamma_max=cfg.gamma_max,
        probes=cfg.probes, chunk_size=cfg.chunk_size, cells_per_batch=cfg.cells_per_batch, seed=cfg.seed,
        target=cfg.target, chain_rule_snr=cfg.chain_rule_snr, shard=(rank, world) if world > 1 else None,
        progress=progress and rank == 0, amp=cfg.heatmap_amp, compile=cfg.heatmap_compile,
        partial=partial)
    res.meta["checkpoint"] = str(checkpoint)
    if world == 1:
        res.save(out / "heatmap")
        partial.unlink(missing_ok=True)
        return res
    res.save(shard_path(out, rank, world))
    partial.unlink(missing_ok=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    elif rank == 0:  # no process group: wait for the other ranks' files
        deadline = time.time() + 3600
        while not all(shard_path(out, r, world).exists() for r in range(world)):
            if time.time() > deadline:
                raise TimeoutError("timed out waiting for the other ranks' heatmap shards")
            time.sleep(2)
    if rank != 0:
        return None
    merged = merge_heatmap_shards([shard_path(out, r, world) for r in range(world)])
    merged.save(out / "heatmap")
    return merged


def _load_heatmap(heatmap) -> HeatmapResult:
    return heatmap if isinstance(heatmap, HeatmapResult) else HeatmapResult.load(heatmap)


def _fixed_moves(cfg: LIFTAnalysisConfig, n: int) -> int:
    """fixed_steps, capped at 2(n-1): a path on an n x n grid cannot make more moves."""
    return max(1, min(cfg.fixed_steps, 2 * (n - 1)))


def run_paths(heatmap, out_dir, cfg: LIFTAnalysisConfig, schedule=None) -> dict:
    """Grid paths (seed DP total / 64, greedy, fixed-step total / 64) -> paths.json, and one
    GenerationPath file per kind in ``cfg.paths`` (path_<kind>.json). Returns both."""
    from dualdiff.diffusion import make_schedule

    hm = _load_heatmap(heatmap)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if schedule is None:
        schedule = make_schedule(hm.meta.get("schedule", "lift_cosine"), int(hm.meta.get("num_timesteps", 1000)))
    e64, e32, g = hm.error_64.numpy(), hm.error_32.numpy(), hm.gammas.numpy()
    grid = {
        "dp_total": seed_dp_path(e64, e32, objective="total"),
        "dp_64": seed_dp_path(e64, e32, objective="64"),
        "greedy_total": greedy_path(e64, e32, objective="total"),
    }
    for obj in ("total", "64"):
        grid[f"fixed_{obj}"] = fixed_step_path(e64, e32, g, num_steps=_fixed_moves(cfg, len(g)), max_jump=cfg.max_jump,
                                               objective=obj, on_infeasible="grow")
    (out / "paths.json").write_text(json.dumps({
        "gammas": g.tolist(),
        "paths": {k: {"points": p.points.tolist(), "cost": p.cost, "method": p.method, "objective": p.objective,
                      "max_jump": p.max_jump} for k, p in grid.items()}}, indent=1))
    gen = _generation_paths(cfg, schedule, hm, cfg.paths)
    for kind, p in gen.items():
        p.save(out / f"path_{kind}.json")
    return {"grid": grid, "generation": gen}


def run_plot(heatmap, out_dir, cfg: LIFTAnalysisConfig, mse_results: dict | str | None = None) -> list[Path]:
    """heatmap.png with the DP / greedy / fixed-step paths, and mse.png when MSE results are given."""
    from dualdiff.analysis.plots import plot_heatmap, plot_mse_bars

    hm = _load_heatmap(heatmap)
    out = Path(out_dir)
    grid = run_paths(hm, out, LIFTAnalysisConfig(**{**asdict(cfg), "paths": []}))["grid"]
    files = [plot_heatmap(hm, out / "heatmap.png", grid,
                          title=f"LIFT discretization error ({hm.num_points}x{hm.num_points}, target {hm.meta.get('target')})")]
    if mse_results is not None:
        if not isinstance(mse_results, dict):
            mse_results = json.loads(Path(mse_results).read_text())
        files.append(plot_mse_bars(mse_results, out / "mse.png"))
    return files


def _generation_paths(cfg, schedule, heatmap, kinds) -> dict[str, GenerationPath]:
    hm = _load_heatmap(heatmap) if heatmap is not None else None
    out = {}
    for kind in kinds:
        needs = kind.startswith(("dp", "fixed"))
        if needs and hm is None:
            raise ValueError(f"path {kind!r} needs --heatmap")
        steps = cfg.num_steps
        if kind.startswith("fixed"):
            steps = _fixed_moves(cfg, hm.num_points) + 1
        p = make_path(kind, schedule, heatmap=hm, num_steps=steps, max_jump=cfg.max_jump,
                      gamma_min=cfg.gamma_min if hm is None else None, gamma_max=cfg.gamma_max if hm is None else None)
        out[Path(kind).stem if Path(str(kind)).is_file() else kind] = p
    return out


def run_generate(checkpoint, out_dir, cfg: LIFTAnalysisConfig, heatmap=None, kinds=None) -> dict:
    """Sample ``grid_images`` images per path kind: samples_<kind>.png and samples.png side by side.

    Every path starts from the same noise (generator seeded with cfg.seed)."""
    model, _, schedule = load_analysis_model(checkpoint, cfg)
    return _generate_grids(model, schedule, out_dir, cfg, heatmap, kinds)


def _generate_grids(model, schedule, out_dir, cfg, heatmap, kinds) -> dict:
    from dualdiff.analysis.plots import plot_sample_grids

    out = Path(out_dir)
    samples = {}
    for name, p in _generation_paths(cfg, schedule, heatmap, kinds or cfg.paths).items():
        x64, _ = generate(model, p, cfg.grid_images, schedule=schedule, eta=cfg.eta, clip_sample=cfg.clip_sample,
                          generator=torch.Generator().manual_seed(cfg.seed))
        save_image_grid(x64, out / f"samples_{name}.png", nrow=int(np.ceil(np.sqrt(cfg.grid_images))))
        samples[name] = x64
    plot_sample_grids(samples, out / "samples.png", nrow=int(np.ceil(np.sqrt(cfg.grid_images))))
    return samples


def run_generate_for_fid(checkpoint, out_dir, cfg: LIFTAnalysisConfig, kind: str = "diagonal",
                         heatmap=None, n: int | None = None) -> list[Path]:
    """Write ``n`` (default cfg.num_images) PNGs generated along one path into ``out_dir``."""
    model, _, schedule = load_analysis_model(checkpoint, cfg)
    (p,) = _generation_paths(cfg, schedule, heatmap, [kind]).values()
    return generate_for_fid(model, p, n or cfg.num_images, out_dir, cfg.batch_size, schedule=schedule,
                            seed=cfg.seed, eta=cfg.eta, clip_sample=cfg.clip_sample)


def run_fid(folder_a, folder_b, cfg: LIFTAnalysisConfig, *, allow_download: bool | None = None) -> float:
    """FID between two image folders with pytorch-fid's Inception (see dualdiff.metrics.fid)."""
    from dualdiff.metrics.fid import fid_from_folders

    dev = _device(cfg)
    return fid_from_folders(folder_a, folder_b, inception_weights=cfg.inception_weights, dims=cfg.fid_dims,
                            batch_size=cfg.batch_size, device=dev, cache_dir=cfg.fid_cache_dir,
                            allow_download=allow_download, progress=True)


def run_mse(checkpoint, out_dir, cfg: LIFTAnalysisConfig) -> dict:
    """The three MSE tests on ``mse_samples`` real images -> mse.json (and the table, returned)."""
    model, lcfg, schedule = load_analysis_model(checkpoint, cfg)
    x = real_images(lcfg, cfg.mse_samples, cfg.seed + 1)
    res = run_mse_tests(model, x, schedule, timestep=cfg.mse_timestep, batch_size=cfg.batch_size, seed=cfg.seed)
    save_mse_results(res, Path(out_dir) / "mse.json")
    return res


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def _fmt_path(p: GenerationPath) -> str:
    k = [0, len(p.t64) // 2, len(p.t64) - 1]
    pts = ", ".join(f"(γ64 {p.gamma_64[i]:.3g}, γ32 {p.gamma_32[i]:.3g})" for i in k)
    return f"{len(p.t64)} steps; start/mid/end {pts}"


def run_demo(out_dir, *, train_overrides=(), analysis_overrides=(), steps: int | None = None,
             quiet_progress: bool = True, print_fn=print) -> dict:
    """The whole pipeline on the embedded procedural data with the tiny config, on the CPU.

    train tiny model -> heatmap (small grid) -> DP / fixed-step paths -> generation along the
    paths -> MSE tests -> FID per path when the Inception weights are available (else says so).
    Prints a short report and writes it to ``out_dir/report.txt``; returns the numbers.
    ``steps``: training steps (None: the tiny preset's, :meth:`LIFTConfig.tiny`).
    """
    from dualdiff.config import apply_overrides
    from dualdiff.experiments.lift import LIFTConfig, train_lift
    from dualdiff.metrics.fid import InceptionWeightsError

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lcfg = LIFTConfig.tiny()
    lcfg.train.out_dir = str(out / "run")
    if steps is not None:
        lcfg.train.steps = int(steps)
    lcfg = apply_overrides(lcfg, list(train_overrides)) if train_overrides else lcfg
    acfg = LIFTAnalysisConfig.tiny()
    acfg.device = "cpu" if not torch.cuda.is_available() else acfg.device
    acfg = apply_overrides(acfg, list(analysis_overrides)) if analysis_overrides else acfg
    acfg.validate()
    report: dict = {}
    lines: list[str] = []

    def say(s=""):
        lines.append(s)
        print_fn(s)

    trainer = train_lift(lcfg, out / "run", verbose=False)
    hist = [r["loss"] for r in trainer.history if "loss" in r]
    ckpt = out / "run"
    report["losses"] = hist
    n_params = sum(p.numel() for p in trainer.model.parameters()) if hasattr(trainer, "model") else None
    say(f"== LIFT demo (tiny config, {lcfg.train.steps} steps, {lcfg.data.num_images} procedural images"
        + (f", {n_params:,} parameters" if n_params else "") + ")")
    if hist:
        k = max(1, len(hist) // 5)
        say(f"training loss: first {hist[0]:.4f}  ->  last {hist[-1]:.4f}  (mean of first/last {k} logs: "
            f"{np.mean(hist[:k]):.4f} -> {np.mean(hist[-k:]):.4f})")
    t1 = time.perf_counter()
    hm = run_heatmap(ckpt, out, acfg, progress=not quiet_progress)
    e64, e32 = hm.error_64.numpy(), hm.error_32.numpy()
    diag = np.diag(e64 + e32)
    report["heatmap"] = {"gammas": hm.gammas.tolist(), "error_64": e64.tolist(), "error_32": e32.tolist()}
    say(f"heatmap {hm.num_points}x{hm.num_points} (γ {hm.gammas[0]:.3g}..{hm.gammas[-1]:.3g}, "
        f"{acfg.heatmap_samples} samples x {acfg.probes} probes, {time.perf_counter() - t1:.1f} s): "
        f"64x64 error {e64.min():.3g}..{e64.max():.3g}, 32x32 {e32.min():.3g}..{e32.max():.3g}; "
        f"diagonal total falls {diag[0]:.3g} -> {diag[-1]:.3g}")
    paths = run_paths(hm, out, acfg, schedule=None)
    for k, p in paths["grid"].items():
        desc = (f"γ1 index per γ0 index: {p.points[:, 1].tolist()}" if p.method != "fixed_step"
                else f"(i, j) points: {[tuple(q) for q in p.points.tolist()]}")
        say(f"  path {k:13s} cost {p.cost:.4g}  {desc}")
    mse_res = None
    model, _, schedule = load_analysis_model(ckpt, acfg)
    samples = _generate_grids(model, schedule, out, acfg, hm, acfg.paths)
    for name, p in paths["generation"].items():
        say(f"  sampling path {name:11s} {_fmt_path(p)}")
    say(f"sample grids: {out / 'samples.png'}")
    x = real_images(lcfg, acfg.mse_samples, acfg.seed + 1)
    mse_res = run_mse_tests(model, x, schedule, timestep=acfg.mse_timestep, batch_size=acfg.batch_size,
                            seed=acfg.seed)
    save_mse_results(mse_res, out / "mse.json")
    report["mse"] = mse_res
    for line in format_mse_table(mse_res).splitlines():
        say(line)
    run_plot(hm, out, acfg, mse_res)
    say(f"plots: {out / 'heatmap.png'}, {out / 'mse.png'}")
    # FID (needs pytorch-fid's Inception weights)
    from dualdiff.metrics.fid import load_inception

    try:
        ext = load_inception(acfg.fid_dims, acfg.inception_weights, device=_device(acfg))
    except InceptionWeightsError as e:
        report["fid"] = None
        say(f"FID: skipped, Inception weights not available ({str(e).split('. ')[0]}). "
            f"Pass inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth to include it.")
    else:
        from dualdiff.metrics.fid import fid_from_folders

        real = real_images(lcfg, acfg.num_images, acfg.seed + 2)
        save_pngs(real, out / "real")
        fids = {}
        for name, p in paths["generation"].items():
            generate_for_fid(model, p, acfg.num_images, out / f"fid_{name}", acfg.batch_size, schedule=schedule,
                             seed=acfg.seed, eta=acfg.eta, clip_sample=acfg.clip_sample,
                             progress=not quiet_progress)
            fids[name] = fid_from_folders(out / "real", out / f"fid_{name}", extractor=ext,
                                          cache_dir=acfg.fid_cache_dir or out / "fid_cache")
        report["fid"] = fids
        (out / "fid.json").write_text(json.dumps(fids, indent=1))
        say(f"FID vs {acfg.num_images} real images ({acfg.num_images} generated each; tiny-sample FID is "
            "biased high): " + ", ".join(f"{k} {v:.2f}" for k, v in fids.items()))
    say(f"done in {time.perf_counter() - t0:.1f} s; files in {out}")
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    report["samples"] = {k: v.shape for k, v in samples.items()}
    return report
