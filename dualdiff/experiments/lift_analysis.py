"""LIFT analysis pipeline: heatmap -> paths -> plots -> generation -> MSE tests -> FID, and the demo.

Each step is a function taking a checkpoint / heatmap / output folder and an
:class:`LIFTAnalysisConfig` (presets :data:`LIFT_ANALYSIS_PRESETS`; YAML or ``key=value``
overridable), writing its files into the output folder and returning what it computed.
``dualdiff lift ...`` (dualdiff/cli_lift.py) calls them. Reading order:

* config: :class:`LIFTAnalysisConfig`, :class:`LIFTDemoConfig` (the demo = a LIFT training config
  + an analysis config + one device);
* steps: :func:`run_heatmap`, :func:`run_paths`, :func:`run_plot` (reads ``paths.json``),
  :func:`run_generate`, :func:`run_generate_for_fid`, :func:`run_mse`, :func:`run_fid`;
* the whole pipeline on the embedded data: :func:`run_demo`.

Files written in ``out_dir``:

* ``heatmap.pt`` / ``heatmap.json`` (:class:`dualdiff.analysis.heatmap.HeatmapResult`);
  under torchrun each rank writes ``heatmap_shard{r}of{w}.pt`` and rank 0 merges;
* ``paths.json`` (grid paths: seed DP total / 64, greedy, fixed-step total / 64) and
  ``path_<kind>.json`` (:class:`dualdiff.analysis.generate.GenerationPath` per kind);
* ``heatmap.png`` (paths overlaid), ``mse.png``, ``samples.png``, ``samples_<kind>.png``;
  the demo adds ``training_images.png`` and ``data_vs_samples.png`` (training images beside
  the samples of every path, titled with each path's offline sample-quality proxy:
  :data:`dualdiff.metrics.feature_fid.PROXY_NAME`) and ``sample_quality.json``;
* ``mse.json``; ``fid.json``; ``fid_<kind>/*.png`` and ``real/*.png`` for FID.

Size (over ~500 lines): the seven analysis steps and the demo pipeline that chains them share
the config and the file layout above; the computations themselves live in
:mod:`dualdiff.analysis`.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dualdiff.analysis.generate import GenerationPath, generate, generate_for_fid, make_path, save_image_grid, save_pngs
from dualdiff.analysis.heatmap import HeatmapResult, compute_error_heatmap, merge_heatmap_shards, shard_path
from dualdiff.analysis.paths import GridPath, fixed_step_path, greedy_path, seed_dp_path
from dualdiff.config import ConfigError
from dualdiff.data.images import scale_labels
from dualdiff.experiments.lift import LIFTConfig, build_lift_dataset, build_lift_schedule, load_lift_model
from dualdiff.metrics.feature_fid import PROXY_NAME, PROXY_SHORT, FeatureProxyConfig
from dualdiff.metrics.mse_tests import format_mse_table, run_mse_tests, save_mse_results
from dualdiff.train.distributed import (barrier, cleanup_distributed, default_device, get_rank, get_world_size,
                                        init_distributed, is_distributed)

__all__ = [
    "LIFTAnalysisConfig",
    "LIFT_ANALYSIS_PRESETS",
    "LIFTDemoConfig",
    "LIFT_DEMO_PRESETS",
    "load_analysis_model",
    "load_grid_paths",
    "proxy_images",
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
    ``max_jump`` of the fixed-step DP (a fixed-step path samples with fixed_steps + 1 points),
    ``paths`` the kinds generated and compared (a kind or a ``path_*.json`` file).
    Generation: ``num_images`` for FID, ``batch_size``, ``eta``, ``clip_sample``,
    ``clipped_model_output`` (re-derive ε from the clipped x0: :mod:`dualdiff.analysis.generate`), ``grid_images``;
    ``fid_path``: the path kind (or ``path_*.json``) of ``generate-for-fid``.
    MSE: ``mse_timestep``, ``mse_samples``. FID: ``fid_dims``, ``inception_weights`` (a local
    ``pt_inception-2015-12-05-6726825d.pth``), ``fid_cache_dir``, ``fid_download`` (let
    pytorch-fid download the weights when there is no local copy).
    ``device``: auto | cpu | cuda[:k]; ``ema``: use the EMA weights.
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
    clipped_model_output: bool = False
    grid_images: int = 16
    fid_path: str = "diagonal"
    mse_timestep: int = 500
    mse_samples: int = 500
    fid_dims: int = 2048
    inception_weights: str | None = None
    fid_cache_dir: str | None = None
    fid_download: bool = True
    device: str = "auto"
    ema: bool = True

    def validate(self) -> None:
        """Raise :class:`dualdiff.config.ConfigError` naming the bad key; never rewrites one."""
        if self.num_points < 2:
            raise ConfigError(f"num_points must be >= 2, got {self.num_points}")
        if not 0 < self.gamma_min < self.gamma_max:
            raise ConfigError(f"need 0 < gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}")
        if self.cells_per_batch is not None and self.cells_per_batch < 1:
            raise ConfigError(f"cells_per_batch must be >= 1 or None, got {self.cells_per_batch}")
        for k in ("heatmap_samples", "probes", "num_steps", "fixed_steps", "max_jump",
                  "num_images", "batch_size", "grid_images", "mse_samples"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.eta >= 0:
            raise ConfigError(f"eta must be >= 0, got {self.eta}")

    @classmethod
    def from_name(cls, name: str) -> "LIFTAnalysisConfig":
        """A fresh copy of the preset ``name`` of :data:`LIFT_ANALYSIS_PRESETS` (``tiny`` | ``default``)."""
        return _from_presets(LIFT_ANALYSIS_PRESETS, name, cls.__name__)


def _from_presets(presets: dict, name: str, what: str):
    from dualdiff.experiments.run import from_name

    return from_name(presets, name, what)


def _analysis_tiny() -> LIFTAnalysisConfig:
    """The demo's CPU-sized analysis: a 6x6 heatmap, 50 sampling steps on the diagonal and seed-DP
    paths (the fixed-step path has fixed_steps + 1 = 9), eta = 1, ε re-derived from the clipped x0.

    eta = 1 (stochastic DDIM): the demo's briefly trained model has ε errors at high noise that
    deterministic DDIM (eta = 0) carries to the end as per-pixel noise (measured: 50 steps at
    eta 0 gave pure noise where eta 1 gave colour blobs); the added noise lets later steps
    correct them. ``clipped_model_output``: at high noise the x0 implied by a slightly wrong ε
    is far outside [-1, 1]; the seed's step clips it but keeps the unclipped ε, which adds the
    clipped-away part back as noise at every step (measured: smoother blobs with it, at no
    cost). Override with ``eta=0 clipped_model_output=false`` for the seed's sampler."""
    return LIFTAnalysisConfig(num_points=6, heatmap_samples=4, probes=2, num_steps=50, fixed_steps=8,
                              max_jump=3, num_images=64, batch_size=32, grid_images=8, mse_samples=64,
                              eta=1.0, clipped_model_output=True,
                              paths=["diagonal", "dp_total", "dp_64", "fixed_total"])


#: name -> zero-argument function building a fresh config (``preset=NAME`` on the command line)
LIFT_ANALYSIS_PRESETS: dict[str, Callable[[], LIFTAnalysisConfig]] = {
    "tiny": _analysis_tiny, "default": LIFTAnalysisConfig}


def _demo_proxy() -> FeatureProxyConfig:
    """The demo's proxy network: 3 stride-2 stages of 8/16/32 channels, 32 features, 300 Adam steps of
    32 on 512 images (about 12 s on one loaded CPU thread at 32x32)."""
    return FeatureProxyConfig(channels=[8, 16, 32], features=32, steps=300, batch_size=32, num_images=512)


@dataclass
class LIFTDemoConfig:
    """``dualdiff lift demo``: a LIFT training config (``lift.*``), an analysis config
    (``analysis.*``), the offline sample-quality proxy's network (``proxy.*``, trained on
    ``proxy.num_images`` images of the data distribution drawn with its own seed:
    :mod:`dualdiff.metrics.feature_fid`) and the one ``device`` all run on (``lift.train.device``
    and ``analysis.device`` stay ``auto``: a second device key would conflict)."""
    lift: LIFTConfig = field(default_factory=lambda: LIFTConfig.from_name("tiny"))
    analysis: LIFTAnalysisConfig = field(default_factory=_analysis_tiny)
    proxy: FeatureProxyConfig = field(default_factory=_demo_proxy)
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`dualdiff.config.ConfigError` naming the conflicting keys."""
        for key, value in (("lift.train.device", self.lift.train.device), ("analysis.device", self.analysis.device)):
            if value != "auto":
                raise ConfigError(f"{key}={value!r} conflicts with the demo's device key: set device={value} "
                                  "(or --device) instead")

    @classmethod
    def from_name(cls, name: str) -> "LIFTDemoConfig":
        """A fresh copy of the preset ``name`` of :data:`LIFT_DEMO_PRESETS` (``tiny`` | ``default``)."""
        return _from_presets(LIFT_DEMO_PRESETS, name, cls.__name__)


def _demo_default() -> LIFTDemoConfig:
    return LIFTDemoConfig(lift=LIFTConfig(), analysis=LIFTAnalysisConfig(), proxy=_demo_proxy())


#: ``tiny``: the README's CPU demo; ``default``: the experiment's sizes on the procedural data
LIFT_DEMO_PRESETS: dict[str, Callable[[], LIFTDemoConfig]] = {"tiny": LIFTDemoConfig, "default": _demo_default}


def _device(cfg: LIFTAnalysisConfig) -> torch.device:
    return default_device(cfg.device)


def load_analysis_model(checkpoint, cfg: LIFTAnalysisConfig):
    """``(model, lift_config, schedule)`` from a train_lift checkpoint, on cfg's device, eval mode."""
    model, lcfg = load_lift_model(checkpoint, ema=cfg.ema, map_location="cpu")
    if getattr(lcfg, "model_kind", "dual") != "dual":
        raise ConfigError("the LIFT analysis needs a dual-scale model (model_kind='dual'), "
                          f"got {lcfg.model_kind!r}")
    return model.to(_device(cfg)).eval(), lcfg, build_lift_schedule(lcfg)


def proxy_images(lift_cfg: LIFTConfig, proxy: FeatureProxyConfig) -> torch.Tensor:
    """The images the sample-quality proxy trains on: ``proxy.num_images`` procedural images
    drawn with ``proxy.seed`` (not the run's training set) for procedural data, else a seeded
    random subset of the dataset."""
    from dualdiff.data.images import ProceduralDualScaleImages

    d = lift_cfg.data
    if d.source == "procedural":
        ds = ProceduralDualScaleImages(proxy.num_images, seed=proxy.seed, size=d.image_size,
                                       texture_scale=d.texture_scale)
        idx = list(range(proxy.num_images))
    else:
        ds = build_lift_dataset(d)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(proxy.seed))[:proxy.num_images].tolist()
    items = [ds[int(i)] for i in idx]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()


def real_images(lift_cfg: LIFTConfig, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images [n, 3, S, S] (S = ``data.image_size``) in [-1, 1] from the run's data (a
    seeded random subset)."""
    data = build_lift_dataset(lift_cfg.data)
    if n > len(data):
        raise ConfigError(f"asked for {n} real images but the dataset has {len(data)}")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    items = [data[int(i)] for i in idx]
    items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    return torch.stack(items).float()


# --------------------------------------------------------------------------------------------
# heatmap, paths, plots


def run_heatmap(checkpoint, out_dir, cfg: LIFTAnalysisConfig, *, progress: bool = True) -> HeatmapResult | None:
    """Compute and save the heatmap. Progress is kept in ``heatmap_partial*.pt`` (every minute and
    on an error): running the same command again after a crash computes only the missing cells.
    Under torchrun (WORLD_SIZE > 1) the process group is initialised here (gloo on the CPU, NCCL
    on CUDA) unless it already is, cells are split across ranks, each rank writes its shard and
    rank 0 merges them after a barrier. Returns the merged result (None on other ranks)."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, lcfg, schedule = load_analysis_model(checkpoint, cfg)
    dev = next(model.parameters()).device
    started = not is_distributed() and init_distributed(device=dev, timeout=_SHARD_WAIT)
    failed = True
    try:
        rank, world = get_rank(), get_world_size()
        x = real_images(lcfg, cfg.heatmap_samples, cfg.seed).to(dev)
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
            failed = False
            return res
        res.save(shard_path(out, rank, world))
        partial.unlink(missing_ok=True)
        barrier()  # every shard is on disk
        failed = False
        if rank != 0:
            return None
        merged = merge_heatmap_shards([shard_path(out, r, world) for r in range(world)])
        merged.save(out / "heatmap")
        return merged
    finally:
        if started:  # after an error the other ranks may never reach the closing barrier
            cleanup_distributed(wait=not failed)


#: how long a rank waits at the barrier for the others' shards (ranks resumed from partial
#: files can have very different amounts of work left)
_SHARD_WAIT = datetime.timedelta(hours=6)


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


def load_grid_paths(path: str | Path) -> dict[str, GridPath]:
    """The grid paths of a ``paths.json`` written by :func:`run_paths` (name -> GridPath)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no paths file {str(p)!r}: write it with `dualdiff lift path --heatmap ... "
                                "--out-dir ...` (or point --paths at one)")
    try:
        raw = json.loads(p.read_text())["paths"]
        return {k: GridPath(points=np.asarray(v["points"], dtype=np.int64).reshape(-1, 2), cost=float(v["cost"]),
                            method=v["method"], objective=v["objective"], max_jump=v.get("max_jump"))
                for k, v in raw.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{str(p)!r} is not a paths.json written by `dualdiff lift path`: {e}") from e


def run_plot(heatmap, out_dir, mse_results: dict | str | Path | None = None,
             paths: str | Path | None = None) -> list[Path]:
    """heatmap.png with the saved grid paths drawn on it, and mse.png when MSE results are given.

    ``paths``: the ``paths.json`` of :func:`run_paths` (default ``out_dir/paths.json``); it is
    read, never rewritten. ``mse_results``: the dict of :func:`run_mse` or its ``mse.json``."""
    from dualdiff.analysis.plots import plot_heatmap, plot_mse_bars

    hm = _load_heatmap(heatmap)
    out = Path(out_dir)
    grid = load_grid_paths(Path(paths) if paths is not None else out / "paths.json")
    bad = [k for k, p in grid.items() if len(p) and int(p.points.max()) >= hm.num_points]
    if bad:
        raise ConfigError(f"paths {bad} do not fit the {hm.num_points}x{hm.num_points} heatmap: "
                          "were they computed from another heatmap?")
    files = [plot_heatmap(hm, out / "heatmap.png", grid,
                          title=f"LIFT discretization error ({hm.num_points}x{hm.num_points}, target {hm.meta.get('target')})")]
    if mse_results is not None:
        if not isinstance(mse_results, dict):
            f = Path(mse_results)
            if not f.is_file():
                raise FileNotFoundError(f"no MSE results file {str(f)!r}: write it with `dualdiff lift mse`")
            mse_results = json.loads(f.read_text())
        files.append(plot_mse_bars(mse_results, out / "mse.png"))
    return files


# --------------------------------------------------------------------------------------------
# generation, MSE tests, FID


def _generation_paths(cfg, schedule, heatmap, kinds) -> dict[str, GenerationPath]:
    hm = _load_heatmap(heatmap) if heatmap is not None else None
    out = {}
    for kind in kinds:
        needs = kind.startswith(("dp", "fixed"))
        if needs and hm is None:
            raise ConfigError(f"path {kind!r} needs a heatmap (--heatmap)")
        steps = cfg.num_steps
        if kind.startswith("fixed"):
            steps = _fixed_moves(cfg, hm.num_points) + 1
        p = make_path(kind, schedule, heatmap=hm, num_steps=steps, max_jump=cfg.max_jump,
                      gamma_min=cfg.gamma_min if hm is None else None, gamma_max=cfg.gamma_max if hm is None else None)
        out[Path(kind).stem if Path(str(kind)).is_file() else kind] = p
    return out


def run_generate(checkpoint, out_dir, cfg: LIFTAnalysisConfig, heatmap=None) -> dict[str, torch.Tensor]:
    """Sample ``grid_images`` images along every path of ``cfg.paths``: samples_<kind>.png and
    samples.png (side by side, each titled with its number of sampling steps).

    Every path starts from the same noise (generator seeded with cfg.seed)."""
    model, _, schedule = load_analysis_model(checkpoint, cfg)
    gen = _generation_paths(cfg, schedule, heatmap, cfg.paths)
    return _generate_grids(model, schedule, out_dir, cfg, gen)


def _sampler_options(cfg: LIFTAnalysisConfig) -> dict:
    """The DDIM keys of ``cfg`` as keyword arguments of :func:`generate` / :func:`generate_for_fid`."""
    return {"eta": cfg.eta, "clip_sample": cfg.clip_sample, "clipped_model_output": cfg.clipped_model_output}


def _nrow(n: int) -> int:
    return int(np.ceil(np.sqrt(n)))


def _panel_title(name: str, p: GenerationPath) -> str:
    return f"{name} ({len(p.t64)} steps)"


def _generate_grids(model, schedule, out_dir, cfg: LIFTAnalysisConfig, gen: dict[str, GenerationPath],
                    extra_panels: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    from dualdiff.analysis.plots import plot_sample_grids

    out = Path(out_dir)
    samples = {}
    for name, p in gen.items():
        x64, _ = generate(model, p, cfg.grid_images, schedule=schedule, **_sampler_options(cfg),
                          generator=torch.Generator().manual_seed(cfg.seed))
        save_image_grid(x64, out / f"samples_{name}.png", nrow=_nrow(cfg.grid_images))
        samples[name] = x64
    titled = {_panel_title(k, gen[k]): v for k, v in samples.items()}
    plot_sample_grids(titled, out / "samples.png", nrow=_nrow(cfg.grid_images))
    if extra_panels:
        plot_sample_grids({**extra_panels, **titled}, out / "data_vs_samples.png", nrow=_nrow(cfg.grid_images))
    return samples


def run_generate_for_fid(checkpoint, out_dir, cfg: LIFTAnalysisConfig, heatmap=None) -> list[Path]:
    """Write ``cfg.num_images`` PNGs generated along the path ``cfg.fid_path`` into ``out_dir``."""
    model, _, schedule = load_analysis_model(checkpoint, cfg)
    (p,) = _generation_paths(cfg, schedule, heatmap, [cfg.fid_path]).values()
    return generate_for_fid(model, p, cfg.num_images, out_dir, cfg.batch_size, schedule=schedule,
                            seed=cfg.seed, **_sampler_options(cfg))


def _allow_download(cfg: LIFTAnalysisConfig) -> bool | None:
    # None: pytorch-fid may download unless DUALDIFF_NO_DOWNLOAD is set (dualdiff.metrics.fid)
    return None if cfg.fid_download else False


def run_fid(folder_a, folder_b, cfg: LIFTAnalysisConfig) -> float:
    """FID between two image folders with pytorch-fid's Inception (see dualdiff.metrics.fid)."""
    from dualdiff.metrics.fid import fid_from_folders

    for f in (folder_a, folder_b):
        if not Path(f).is_dir():
            raise FileNotFoundError(f"image folder {str(f)!r} does not exist")
    return fid_from_folders(folder_a, folder_b, inception_weights=cfg.inception_weights, dims=cfg.fid_dims,
                            batch_size=cfg.batch_size, device=_device(cfg), cache_dir=cfg.fid_cache_dir,
                            allow_download=_allow_download(cfg), progress=True)


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


def _demo_samples(model, schedule, out: Path, cfg: LIFTDemoConfig, lcfg: LIFTConfig, acfg: LIFTAnalysisConfig,
                  gen: dict[str, GenerationPath], training: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """``acfg.num_images`` samples per path (batch k from generator seed ``acfg.seed + k``, the
    same noise for every path), their grids (the first ``grid_images``: samples_<kind>.png,
    samples.png, and data_vs_samples.png titled with the proxy per path) and their sample quality
    (:mod:`dualdiff.metrics.feature_fid`, against the training images; also for fresh held-out
    images) -> ``sample_quality.json``."""
    from dualdiff.analysis.plots import plot_sample_grids
    from dualdiff.data.images import ProceduralDualScaleImages
    from dualdiff.metrics.feature_fid import (feature_statistics, nearest_mse, proxy_frechet_distance,
                                              train_feature_proxy)
    from dualdiff.utils.seed import derive_seed

    nrow = _nrow(acfg.grid_images)
    grids, quality = {}, {}
    t0 = time.perf_counter()
    net = train_feature_proxy(proxy_images(lcfg, cfg.proxy).to(_device(acfg)), cfg.proxy)
    t_proxy = time.perf_counter() - t0
    data = build_lift_dataset(lcfg.data)
    ref = real_images(lcfg, min(len(data), 1000), acfg.seed + 3)
    ref_stats = feature_statistics(net, ref)
    for name, p in gen.items():
        parts = []
        for k, start in enumerate(range(0, acfg.num_images, acfg.batch_size)):
            x64, _ = generate(model, p, min(acfg.batch_size, acfg.num_images - start), schedule=schedule,
                              **_sampler_options(acfg), generator=torch.Generator().manual_seed(acfg.seed + k))
            parts.append(x64.cpu())
        x = torch.cat(parts)
        grids[name] = x[:acfg.grid_images]
        save_image_grid(grids[name], out / f"samples_{name}.png", nrow=nrow)
        quality[name] = {"fd_proxy": proxy_frechet_distance(net, x, ref_stats), "nn_mse": float(nearest_mse(x, ref).mean()),
                         "num_samples": int(x.shape[0]), "sampling_steps": len(p.t64)}
    d = lcfg.data
    if d.source == "procedural":
        fresh = ProceduralDualScaleImages(acfg.num_images, seed=derive_seed(acfg.seed, "demo-held-out") % (1 << 62),
                                          size=d.image_size, texture_scale=d.texture_scale)
        held = torch.stack([fresh[i] for i in range(len(fresh))])
    else:
        held = real_images(lcfg, min(len(data), acfg.num_images), acfg.seed + 4)
    held_q = {"fd_proxy": proxy_frechet_distance(net, held, ref_stats), "nn_mse": float(nearest_mse(held, ref).mean())}
    titled = {f"{_panel_title(k, gen[k])}\n{PROXY_SHORT.split(' (')[0]} {quality[k]['fd_proxy']:.3g}": v
              for k, v in grids.items()}
    plot_sample_grids({_panel_title(k, gen[k]): v for k, v in grids.items()}, out / "samples.png", nrow=nrow)
    headline = ", ".join(f"{k} {q['fd_proxy']:.3g}" for k, q in quality.items())
    title = (f"{PROXY_SHORT} to the training images (lower is closer): {headline}; held-out data "
             f"{held_q['fd_proxy']:.3g}.\nOne seed, {acfg.num_images} samples per path: every difference is within "
             "noise (no interval); `dualdiff lift study` gives intervals over seeds")
    _plot_titled_grids({"training images": training, **titled}, out / "data_vs_samples.png", nrow, title)
    res = {"proxy": PROXY_NAME, "title": title, "proxy_config": dataclasses.asdict(cfg.proxy), "proxy_final_loss": net.final_loss,
           "proxy_seconds": t_proxy, "reference_images": int(ref.shape[0]), "paths": quality, "held_out": held_q}
    (out / "sample_quality.json").write_text(json.dumps(res, indent=1))
    return grids, res


def _plot_titled_grids(panels: dict[str, torch.Tensor], path: Path, nrow: int, title: str) -> Path:
    """Image grids side by side (one panel each, its key as the panel title) under ``title``."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.3), squeeze=False)
    for ax, (name, imgs) in zip(axes[0], panels.items()):
        grid = make_grid(((imgs.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=1)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_path(p: GenerationPath) -> str:
    k = [0, len(p.t64) // 2, len(p.t64) - 1]
    pts = ", ".join(f"(γ64 {p.gamma_64[i]:.3g}, γ32 {p.gamma_32[i]:.3g})" for i in k)
    return f"{len(p.t64)} sampling steps; start/mid/end {pts}"


def run_demo(cfg: LIFTDemoConfig, out_dir, *, quiet_progress: bool = True, print_fn=print) -> dict:
    """The whole pipeline on the configured data (the tiny preset: procedural images, CPU minutes).

    train -> heatmap -> DP / fixed-step paths -> generation along the paths (with a grid of
    training images beside the samples) -> MSE tests -> plots -> FID per path when the Inception
    weights are available (else says so). The run goes to ``out_dir/run``; ``cfg.device`` is
    the device of every step. Prints a short report, writes it to ``out_dir/report.txt`` and
    returns the numbers.
    """
    from dualdiff.experiments.lift import train_lift
    from dualdiff.metrics.fid import InceptionWeightsError

    if not isinstance(cfg, LIFTDemoConfig):
        raise TypeError(f"cfg must be a LIFTDemoConfig, got {type(cfg).__name__}")
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lcfg, acfg = copy.deepcopy(cfg.lift), copy.deepcopy(cfg.analysis)
    lcfg.train.device = acfg.device = cfg.device  # validate(): both were "auto"
    report: dict = {}
    lines: list[str] = []

    def say(s=""):
        lines.append(s)
        print_fn(s)

    trainer = train_lift(lcfg, out / "run", verbose=False)
    t_train = time.perf_counter() - t0
    hist = [r["loss"] for r in trainer.history if "loss" in r]
    ckpt = out / "run"
    report["losses"] = hist
    n_params = sum(p.numel() for p in trainer.model.parameters())
    say(f"== LIFT demo ({lcfg.train.steps} training steps of {lcfg.train.batch_size}, "
        f"{lcfg.data.num_images} {lcfg.data.source} images, {n_params:,} parameters, {t_train:.1f} s)")
    if hist:
        k = max(1, len(hist) // 5)
        say(f"training loss: first {hist[0]:.4f}  ->  last {hist[-1]:.4f}  (mean of first/last {k} logs: "
            f"{np.mean(hist[:k]):.4f} -> {np.mean(hist[-k:]):.4f})")
    t1 = time.perf_counter()
    hm = run_heatmap(ckpt, out, acfg, progress=not quiet_progress)
    e64, e32 = hm.error_64.numpy(), hm.error_32.numpy()
    diag = np.diag(e64 + e32)
    big, small = scale_labels(hm.meta)
    report["heatmap"] = {"gammas": hm.gammas.tolist(), "error_64": e64.tolist(), "error_32": e32.tolist()}
    say(f"heatmap {hm.num_points}x{hm.num_points} (γ {hm.gammas[0]:.3g}..{hm.gammas[-1]:.3g}, "
        f"{acfg.heatmap_samples} samples x {acfg.probes} probes, {time.perf_counter() - t1:.1f} s): "
        f"{big} error {e64.min():.3g}..{e64.max():.3g}, {small} {e32.min():.3g}..{e32.max():.3g}; "
        f"diagonal total falls {diag[0]:.3g} -> {diag[-1]:.3g}")
    paths = run_paths(hm, out, acfg)
    for k, p in paths["grid"].items():
        desc = (f"γ1 index per γ0 index: {p.points[:, 1].tolist()}" if p.method != "fixed_step"
                else f"(i, j) points: {[tuple(q) for q in p.points.tolist()]}")
        say(f"  path {k:13s} cost {p.cost:.4g}  {desc}")
    t1 = time.perf_counter()
    model, _, schedule = load_analysis_model(ckpt, acfg)
    training = real_images(lcfg, acfg.grid_images, acfg.seed)
    save_image_grid(training, out / "training_images.png", nrow=_nrow(acfg.grid_images))
    samples, quality = _demo_samples(model, schedule, out, cfg, lcfg, acfg, paths["generation"], training)
    report["sample_quality"] = quality
    for name, p in paths["generation"].items():
        say(f"  sampling path {name:11s} {_fmt_path(p)}")
    clipped = ", ε from the clipped x0" if acfg.clipped_model_output else ""
    say(f"samples ({acfg.num_images} per path, the first {acfg.grid_images} in the grids; eta {acfg.eta:g}{clipped}, "
        f"{time.perf_counter() - t1:.1f} s): {out / 'data_vs_samples.png'} (training images beside the samples), "
        f"{out / 'samples.png'}")
    say(f"sample quality vs {quality['reference_images']} training images: {PROXY_NAME}; nn-MSE = mean MSE to the "
        "nearest training image (lower is closer for both):")
    for name, q in quality["paths"].items():
        say(f"  {name:13s} {PROXY_SHORT} {q['fd_proxy']:.4g}   nn-MSE {q['nn_mse']:.4g}")
    h = quality["held_out"]
    say(f"  {'held-out data':13s} {PROXY_SHORT} {h['fd_proxy']:.4g}   nn-MSE {h['nn_mse']:.4g}   "
        f"({acfg.num_images} fresh images of the data distribution: the floor at this sample size)")
    x = real_images(lcfg, acfg.mse_samples, acfg.seed + 1)
    mse_res = run_mse_tests(model, x, schedule, timestep=acfg.mse_timestep, batch_size=acfg.batch_size,
                            seed=acfg.seed)
    save_mse_results(mse_res, out / "mse.json")
    report["mse"] = mse_res
    for line in format_mse_table(mse_res).splitlines():
        say(line)
    run_plot(hm, out, mse_res)
    say(f"plots: {out / 'heatmap.png'}, {out / 'mse.png'}")
    # FID (needs pytorch-fid's Inception weights)
    from dualdiff.metrics.fid import load_inception

    try:
        ext = load_inception(acfg.fid_dims, acfg.inception_weights, device=_device(acfg),
                             allow_download=_allow_download(acfg))
    except InceptionWeightsError as e:
        report["fid"] = None
        say(f"FID: skipped, Inception weights not available ({str(e).split('. ')[0]}). "
            f"Pass analysis.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth to include it.")
    else:
        from dualdiff.metrics.fid import fid_from_folders

        real = real_images(lcfg, acfg.num_images, acfg.seed + 2)
        save_pngs(real, out / "real")
        fids = {}
        for name, p in paths["generation"].items():
            generate_for_fid(model, p, acfg.num_images, out / f"fid_{name}", acfg.batch_size, schedule=schedule,
                             seed=acfg.seed, **_sampler_options(acfg), progress=not quiet_progress)
            fids[name] = fid_from_folders(out / "real", out / f"fid_{name}", extractor=ext,
                                          cache_dir=acfg.fid_cache_dir or out / "fid_cache")
        report["fid"] = fids
        (out / "fid.json").write_text(json.dumps(fids, indent=1))
        say(f"FID vs {acfg.num_images} real images ({acfg.num_images} generated each; tiny-sample FID is "
            "biased high): " + ", ".join(f"{k} {v:.2f}" for k, v in fids.items()))
    say("Within noise: ALL of the differences above (between paths, and between the MSE tests). This demo "
        "trains one model with one seed, so it has no interval for any difference: none of them can be told "
        "apart from seed-to-seed variation. `dualdiff lift study preset=tiny --out-dir DIR` repeats the "
        "comparison over seeds and reports 95 % intervals and verdicts.")
    say(f"done in {time.perf_counter() - t0:.1f} s; files in {out}")
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    report["samples"] = {k: tuple(v.shape) for k, v in samples.items()}
    report["sampling_steps"] = {k: len(p.t64) for k, p in paths["generation"].items()}
    return report
