"""``dualdiff lift study``: the LIFT comparison over N seeds, with intervals and verdicts.

Per seed, **one** LIFT model is trained (``experiment.lift``), its error heatmap computed
(``experiment.analysis``), and every arm measured on that model:

* MSE-test arms (``mse/both_noisy``, ``mse/clean32_noisy64``, ``mse/clean64_noisy32``): the
  seed's three noise-prediction tests (:mod:`dualdiff.metrics.mse_tests`) on the same images and
  noise; metrics ``mse_64`` / ``mse_32`` (large / small scale).
* Path arms (``path/<kind>``): ``analysis.num_images`` images sampled along each path
  (``diagonal``, ``dp_total``, ``dp_64``, ``greedy_total`` with ``analysis.num_steps`` points;
  ``fixed_total``, the fixed-step DP, with ``fixed_steps + 1``; ``diagonal_fixed``, the diagonal
  with as many points as ``fixed_total``, its same-cost baseline), every path from the same
  initial and per-step noise; metrics: the sample-quality distance to the seed's training images
  (FID with ``fid_weights=FILE``; always the offline proxy :data:`~dualdiff.metrics.feature_fid.PROXY_NAME`,
  named as a proxy wherever it appears) and ``nn_mse`` (mean per-sample MSE to the nearest
  training image).
* ``data/held_out``: fresh images of the data distribution scored like the samples — each
  sample metric's floor at this sample size.

Claims (:data:`dualdiff.study.stats.VERDICT_RULE`, fixed before any number): the DP path (total
error) samples better than the diagonal; the DP 64-only path samples better than the diagonal
(the sample metric is on the large scale); a clean small scale lowers the large scale's MSE vs
both noisy; a clean large scale lowers the small scale's MSE vs both noisy. Other paths' paired
differences (fixed vs its same-step diagonal, greedy vs DP) are reported without a verdict.

Common random numbers: study seed ``s`` is the run's ``lift.train.seed``, ``lift.data.seed``
(procedural data) and ``analysis.seed``, so at one seed every arm shares the training set, the
trained model, the heatmap probes, the MSE tests' images and noise, and the sampling noise
(batch ``k`` of every path from the generator seeded ``derive_seed(s, "lift-study-sample", k)``).
The proxy network is trained once per study (``experiment.proxy.*``, its own seed and its own procedural
images, not any run's training set) and cached in ``OUT/work/feature_proxy.pt``.

    dualdiff lift study --out-dir runs/lift-study preset=tiny      # CPU, <= 15 min on 2 cores
    dualdiff lift study --out-dir runs/lift-study fid_weights=/path/to/pt_inception-2015-12-05-6726825d.pth
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dualdiff.config import ConfigError
from dualdiff.experiments.lift import LIFTConfig, build_lift_dataset
from dualdiff.experiments.lift_analysis import LIFTAnalysisConfig, LIFTDemoConfig, proxy_images
from dualdiff.metrics.feature_fid import PROXY_NAME, PROXY_SHORT
from dualdiff.study import Claim, Comparison, Metric, Study, StudySettings

__all__ = ["LIFTStudyConfig", "LIFT_STUDY_PRESETS", "STUDY_PATHS", "MSE_ARMS", "HELD_OUT_ARM",
           "study_metrics", "build_lift_study", "run_lift_seed", "register_lift_study"]

#: every sampling path the study compares (``path/<kind>`` arms)
STUDY_PATHS = ("diagonal", "dp_total", "dp_64", "fixed_total", "greedy_total", "diagonal_fixed")
#: ``mse/<name>`` arm -> the key of :data:`dualdiff.metrics.mse_tests.MSE_TESTS`
MSE_ARMS = {"both_noisy": "test1_both_noisy", "clean32_noisy64": "test2a_clean32_noisy64",
            "clean64_noisy32": "test2b_clean64_noisy32"}
HELD_OUT_ARM = "data/held_out"

DESIGN_SOURCE = "DESIGN.md, the lift row (the seed's method; the seed's own FID / MSE numbers are not in this repository)"
DP_CITED = ("statement, no number: 'a DP finds the monotone path through the heatmap that minimises "
            "total (or 64×64-only) error; images are generated along diagonal / DP paths; FID'")
MSE_CITED = ("statement, no number: the MSE tests 'both noisy; clean 32 + noisy 64; clean 64 + noisy 32' "
             "test whether one scale informs the other (the dual-scale model's premise)")


def _needs_heatmap(kind: str) -> bool:
    return kind.startswith(("dp", "fixed", "greedy"))


@dataclass
class LIFTStudyConfig(StudySettings):
    """``seeds`` x the arms (MSE tests, ``paths``, held-out data). ``experiment``: the LIFT run
    and analysis of each seed (``lift.*``, ``analysis.*``, ``device``; ``analysis.paths`` is not
    used: the arms come from ``paths``). ``fid_weights``: pytorch-fid's Inception weights
    (a local file; adds the ``fid`` metric and makes it the claims' metric; never downloads).
    The offline proxy's network is ``experiment.proxy`` (:class:`~dualdiff.metrics.feature_fid.FeatureProxyConfig`,
    shared with the demo).
    ``reference_images``: training images the sample metrics compare with (at most the
    training set). ``threads``: torch's CPU threads during the runs (0: unchanged)."""
    experiment: LIFTDemoConfig = field(default_factory=lambda: LIFTDemoConfig(
        lift=LIFTConfig(), analysis=LIFTAnalysisConfig()))
    paths: list[str] = field(default_factory=lambda: list(STUDY_PATHS))
    fid_weights: str | None = None
    reference_images: int = 1000

    def validate(self) -> None:
        """StudySettings' checks plus the study's keys; ConfigError naming the bad key."""
        try:
            super().validate()
            self.experiment.proxy.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        bad = [p for p in self.paths if p not in STUDY_PATHS]
        if bad or not self.paths or len(set(self.paths)) != len(self.paths):
            raise ConfigError(f"paths must be distinct kinds of {list(STUDY_PATHS)}, got {self.paths}")
        if self.fid_weights is not None and not Path(self.fid_weights).is_file():
            raise ConfigError(f"fid_weights file {self.fid_weights!r} does not exist (pytorch-fid's "
                              "pt_inception-2015-12-05-6726825d.pth; leave fid_weights unset for the proxy only)")
        if isinstance(self.reference_images, bool) or self.reference_images < 2:
            raise ConfigError(f"reference_images must be an int >= 2, got {self.reference_images!r}")
        self.experiment.validate()
        s, k = self.experiment.lift.data.image_size, 2 ** len(self.experiment.proxy.channels)
        if s % k:
            raise ConfigError(f"experiment.proxy.channels has {len(self.experiment.proxy.channels)} stride-2 stages: the image size "
                              f"{s} must be a multiple of {k}")
        if self.experiment.analysis.num_images < 2:
            raise ConfigError("experiment.analysis.num_images must be >= 2 (a covariance of the samples)")


def _tiny() -> LIFTStudyConfig:
    """The CPU preset: the demo's tiny model (32x32 + 16x16, 0.24 M parameters, 256 procedural
    images) trained **300 steps of 16 instead of the demo's 1600** (the study trains one model
    per seed), a 5x5 heatmap, 16 DDIM sampling steps (the fixed-step paths 9), 64 samples per path
    against the 256 training images, the demo's proxy autoencoder (``experiment.proxy``: 32
    features, 300 steps on 512 procedural images); 3 seeds, one CPU thread. Budget: <= 15 minutes on 2 shared CPU cores."""
    lift = LIFTConfig.from_name("tiny")
    lift.train.steps = 300
    lift.train.log_every = 50
    ana = LIFTAnalysisConfig.from_name("tiny")
    for k, v in dict(num_points=5, num_steps=16, fixed_steps=8, max_jump=3, num_images=64, batch_size=64,
                     mse_samples=64, grid_images=8).items():
        setattr(ana, k, v)
    return LIFTStudyConfig(seeds=3, threads=1, experiment=LIFTDemoConfig(lift=lift, analysis=ana),
                           reference_images=256)


def _default() -> LIFTStudyConfig:
    """The experiment's sizes (``LIFTConfig()``, ``LIFTAnalysisConfig()``: 64x64, 7000 steps,
    15x15 heatmap, 50 steps, 1000 samples per path) on the procedural data; 3 seeds. GPU-sized."""
    return LIFTStudyConfig(seeds=3)


LIFT_STUDY_PRESETS: dict[str, Any] = {"tiny": _tiny, "default": _default}


def study_metrics(config: LIFTStudyConfig) -> list[Metric]:
    """The study's metrics (every arm reports all; a metric that does not apply to an arm is
    None): ``mse_64``, ``mse_32``, [``fid``], ``fd_proxy``, ``nn_mse``."""
    s = config.experiment.lift.data.image_size
    out = [Metric("mse_64", f"MSE test ε-MSE {s}² (large)"),
           Metric("mse_32", f"MSE test ε-MSE {s // 2}² (small)")]
    if config.fid_weights is not None:
        out.append(Metric("fid", f"FID (Inception), {s}² samples"))
    out += [Metric("fd_proxy", f"{PROXY_SHORT}, {s}² samples"),
            Metric("nn_mse", f"MSE to nearest training image, {s}²")]
    return out


def _quality_metric(config: LIFTStudyConfig) -> str:
    return "fid" if config.fid_weights is not None else "fd_proxy"


# ------------------------------------------------------------------------------------------
# the proxy network, trained once per study


def _proxy_key(config: LIFTStudyConfig) -> str:
    d = config.experiment.lift.data
    text = json.dumps({"proxy": dataclasses.asdict(config.experiment.proxy), "source": d.source, "path": d.path,
                       "size": d.image_size, "texture_scale": d.texture_scale}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PROXIES: dict[str, Any] = {}


def _feature_proxy(config: LIFTStudyConfig, cache: Path):
    """The study's proxy network: from memory, from ``cache`` when its key matches, else trained
    (seeded) and written there."""
    from dualdiff.metrics.feature_fid import load_feature_proxy, save_feature_proxy, train_feature_proxy

    key = _proxy_key(config)
    if key in _PROXIES:
        return _PROXIES[key]
    net = None
    if cache.is_file():
        try:
            net, _, meta = load_feature_proxy(cache)
            if meta.get("key") != key:
                net = None
        except Exception:  # noqa: BLE001 - an unreadable cache is retrained
            net = None
    if net is None:
        t0 = time.perf_counter()
        net = train_feature_proxy(proxy_images(config.experiment.lift, config.experiment.proxy),
                                  config.experiment.proxy)
        save_feature_proxy(net, config.experiment.proxy, cache, meta={"key": key, "final_loss": net.final_loss,
                                                            "seconds": time.perf_counter() - t0})
    _PROXIES[key] = net
    return net


# ------------------------------------------------------------------------------------------
# one seed


def _paths(kinds: list[str], acfg: LIFTAnalysisConfig, schedule, hm) -> dict:
    from dualdiff.analysis.generate import GenerationPath, make_path
    from dualdiff.analysis.paths import greedy_path, seed_path_schedule

    fixed_points = max(1, min(acfg.fixed_steps, 2 * (acfg.num_points - 1))) + 1
    out = {}
    for kind in kinds:
        if kind in ("diagonal", "diagonal_fixed"):
            n = acfg.num_steps if kind == "diagonal" else fixed_points
            p = make_path("diagonal", schedule, num_steps=n, gamma_min=acfg.gamma_min, gamma_max=acfg.gamma_max)
            p.name = kind
        elif kind == "greedy_total":
            gp = greedy_path(hm.error_64.numpy(), hm.error_32.numpy(), objective="total")
            s = seed_path_schedule(gp, hm.gammas.double().numpy(), num_steps=acfg.num_steps)
            p = GenerationPath.from_gammas(kind, s.gamma_64, s.gamma_32, schedule)
        else:
            n = fixed_points if kind.startswith("fixed") else acfg.num_steps
            p = make_path(kind, schedule, heatmap=hm, num_steps=n, max_jump=acfg.max_jump)
        out[kind] = p
    return out


def _sample(model, path, n: int, acfg: LIFTAnalysisConfig, schedule, seed: int) -> torch.Tensor:
    from dualdiff.analysis.generate import generate
    from dualdiff.utils.seed import derive_seed

    out = []
    for k, start in enumerate(range(0, n, acfg.batch_size)):
        g = torch.Generator().manual_seed(derive_seed(seed, "lift-study-sample", k))
        x64, _ = generate(model, path, min(acfg.batch_size, n - start), schedule=schedule, generator=g,
                          eta=acfg.eta, clip_sample=acfg.clip_sample,
                          clipped_model_output=acfg.clipped_model_output)
        out.append(x64.cpu())
    return torch.cat(out)


def _reference_and_held_out(lcfg: LIFTConfig, n_ref: int, n_held: int, seed: int
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training images to compare with, and fresh images of the same distribution (procedural:
    new draws; other sources: images left out of the reference subset, None if too few)."""
    from dualdiff.data.images import ProceduralDualScaleImages
    from dualdiff.utils.seed import derive_seed

    data = build_lift_dataset(lcfg.data)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed(seed, "lift-study-ref")))

    def stack(ds, idx):
        items = [ds[int(i)] for i in idx]
        return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()

    ref = stack(data, perm[:min(n_ref, len(data))])
    d = lcfg.data
    if d.source == "procedural":
        fresh = ProceduralDualScaleImages(n_held, seed=derive_seed(seed, "lift-study-held-out") % (1 << 62),
                                          size=d.image_size, texture_scale=d.texture_scale)
        return ref, stack(fresh, range(n_held))
    rest = perm[len(ref):len(ref) + n_held]
    return ref, (stack(data, rest) if len(rest) >= 2 else None)


def _run_config(config: LIFTStudyConfig, seed: int, work: Path) -> tuple[LIFTConfig, LIFTAnalysisConfig]:
    exp = copy.deepcopy(config.experiment)
    lcfg, acfg = exp.lift, exp.analysis
    lcfg.train.seed, lcfg.data.seed, acfg.seed = seed, seed, seed
    lcfg.train.device = acfg.device = exp.device
    lcfg.train.progress = False
    lcfg.train.checkpoint_every = 0
    lcfg.train.save_final = True
    lcfg.train.out_dir = str(work / "run")
    return lcfg, acfg


def run_lift_seed(config: LIFTStudyConfig, seed: int, arms: list[str], work_dir: Path
                  ) -> dict[str, dict[str, Any]]:
    """Train one LIFT model at study seed ``seed`` (in ``work_dir``, cleared first) and measure
    the arms ``arms`` on it; returns ``{arm: {metric: value, ...info}}`` (None for a metric that
    does not apply to the arm)."""
    from dualdiff.analysis.plots import plot_sample_grids
    from dualdiff.experiments.lift import train_lift
    from dualdiff.experiments.lift_analysis import load_analysis_model, real_images, run_heatmap
    from dualdiff.metrics.feature_fid import feature_statistics, nearest_mse, proxy_frechet_distance
    from dualdiff.metrics.mse_tests import run_mse_tests

    valid = {f"mse/{k}" for k in MSE_ARMS} | {f"path/{p}" for p in config.paths} | {HELD_OUT_ARM}
    unknown = [a for a in arms if a not in valid]
    if unknown:
        raise ValueError(f"unknown arms {unknown}")
    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)  # a crashed earlier attempt's files
    work.mkdir(parents=True)
    lcfg, acfg = _run_config(config, seed, work)
    metric_names = [m.name for m in study_metrics(config)]
    blank = dict.fromkeys(metric_names)
    t0 = time.perf_counter()
    trainer = train_lift(lcfg, work / "run", resume=False, verbose=False)
    info: dict[str, Any] = {"train_seconds": round(time.perf_counter() - t0, 2), "train_steps": lcfg.train.steps}
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    if losses:
        info["final_train_loss"] = float(losses[-1])
    model, _, schedule = load_analysis_model(work / "run", acfg)
    out: dict[str, dict[str, Any]] = {}

    mse_arms = [a for a in arms if a.startswith("mse/")]
    if mse_arms:
        x = real_images(lcfg, acfg.mse_samples, seed + 1)
        res = run_mse_tests(model, x, schedule, timestep=acfg.mse_timestep, batch_size=acfg.batch_size, seed=seed)
        for a in mse_arms:
            r = res[MSE_ARMS[a.split("/", 1)[1]]]
            out[a] = {**blank, "mse_64": r["mse_64"], "mse_32": r["mse_32"], **info,
                      "mse_timestep": acfg.mse_timestep, "mse_samples": res["num_samples"]}

    sample_arms = [a for a in arms if a.startswith("path/") or a == HELD_OUT_ARM]
    if not sample_arms:
        return out
    kinds = [a.split("/", 1)[1] for a in arms if a.startswith("path/")]
    hm = None
    if any(_needs_heatmap(k) for k in kinds):
        t1 = time.perf_counter()
        hm = run_heatmap(work / "run", work / "analysis", acfg, progress=False)
        info["heatmap_seconds"] = round(time.perf_counter() - t1, 2)
    gen = _paths(kinds, acfg, schedule, hm)
    proxy = _feature_proxy(config, work.parent.parent / "feature_proxy.pt")
    ref, held = _reference_and_held_out(lcfg, config.reference_images, acfg.num_images, seed)
    ref_stats = feature_statistics(proxy, ref)
    fid = None
    if config.fid_weights is not None:
        from dualdiff.metrics.fid import activation_statistics, fid_from_stats, load_inception

        ext = load_inception(acfg.fid_dims, config.fid_weights, device=next(model.parameters()).device,
                             allow_download=False)
        ref_fid = activation_statistics((ref + 1) / 2, ext, batch_size=acfg.batch_size)
        fid = lambda x: fid_from_stats(activation_statistics((x + 1) / 2, ext, batch_size=acfg.batch_size),  # noqa: E731
                                       ref_fid)

    def score(x: torch.Tensor) -> dict[str, float]:
        r = {"fd_proxy": proxy_frechet_distance(proxy, x, ref_stats), "nn_mse": float(nearest_mse(x, ref).mean())}
        if fid is not None:
            r["fid"] = fid(x)
        return r

    panels = {"training images": ref[:acfg.grid_images]}
    t1 = time.perf_counter()
    for kind, p in gen.items():
        x = _sample(model, p, acfg.num_images, acfg, schedule, seed)
        panels[f"{kind} ({p.num_steps} steps)"] = x[:acfg.grid_images]
        out[f"path/{kind}"] = {**blank, **score(x), **info, "sampling_steps": p.num_steps,
                               "num_samples": acfg.num_images, "reference_images": len(ref)}
    info["sampling_seconds"] = round(time.perf_counter() - t1, 2)
    if HELD_OUT_ARM in arms:
        out[HELD_OUT_ARM] = {**blank, **(score(held) if held is not None else {}), "reference_images": len(ref),
                             "num_samples": 0 if held is None else len(held)}
    plot_sample_grids(panels, work / "data_vs_samples.png", nrow=max(1, int(acfg.grid_images ** 0.5 + 0.999)))
    return out


# ------------------------------------------------------------------------------------------
# the study


def build_lift_study(config: LIFTStudyConfig, preset: str | None = None) -> Study:
    """The :class:`~dualdiff.study.Study` of ``config`` (arms, metrics, claims, executor)."""
    from dualdiff.config import to_dict
    from dualdiff.study.runner import config_fingerprint

    config.validate()
    exp = config.experiment
    lcfg, acfg = exp.lift, exp.analysis
    s = lcfg.data.image_size
    arms = [f"mse/{k}" for k in MSE_ARMS] + [f"path/{p}" for p in config.paths] + [HELD_OUT_ARM]
    q = _quality_metric(config)
    qlabel = "FID (Inception)" if q == "fid" else PROXY_SHORT
    claims = [
        Claim("clean 32 lowers MSE 64", f"conditioning on a clean 32×32 (here {s // 2}²) lowers the 64×64 "
              f"(here {s}²) ε-MSE vs both noisy", "mse/clean32_noisy64", "mse/both_noisy", "mse_64",
              "lower", MSE_CITED, DESIGN_SOURCE),
        Claim("clean 64 lowers MSE 32", f"conditioning on a clean 64×64 (here {s}²) lowers the 32×32 "
              f"(here {s // 2}²) ε-MSE vs both noisy", "mse/clean64_noisy32", "mse/both_noisy", "mse_32",
              "lower", MSE_CITED, DESIGN_SOURCE)]
    if "diagonal" in config.paths and "dp_total" in config.paths:
        claims.append(Claim("DP total < diagonal", f"the DP path (total error) samples better than the diagonal "
                            f"({qlabel}, lower is better)", "path/dp_total", "path/diagonal", q, "lower",
                            DP_CITED, DESIGN_SOURCE))
    if "diagonal" in config.paths and "dp_64" in config.paths:
        claims.append(Claim("DP 64-only < diagonal", f"the DP 64-only path samples better than the diagonal at "
                            f"64×64 (here {s}²; {qlabel}, lower is better)", "path/dp_64", "path/diagonal", q,
                            "lower", DP_CITED, DESIGN_SOURCE))
    sample_metrics = [m.name for m in study_metrics(config) if m.name not in ("mse_64", "mse_32")]
    comparisons = []
    pairs = [(p, "diagonal") for p in config.paths if p not in ("diagonal", "diagonal_fixed")]
    pairs += [("fixed_total", "diagonal_fixed"), ("greedy_total", "dp_total")]
    for a, b in pairs:
        if a in config.paths and b in config.paths:
            comparisons += [Comparison(f"path/{a}", f"path/{b}", m) for m in sample_metrics]
    comparisons.append(Comparison("mse/clean32_noisy64", "mse/both_noisy", "mse_64"))
    comparisons.append(Comparison("mse/clean64_noisy32", "mse/both_noisy", "mse_32"))
    demo_steps = LIFTConfig.from_name("tiny").train.steps
    fixed_points = max(1, min(acfg.fixed_steps, 2 * (acfg.num_points - 1))) + 1
    p = config.experiment.proxy
    notes = [
        f"Sample quality: **{PROXY_NAME}**" + (" and FID (pytorch-fid Inception, "
                                               f"fid_weights={config.fid_weights}; tiny-sample FID is biased high)"
                                               if q == "fid" else "")
        + f" between {acfg.num_images} samples per path and up to {config.reference_images} training images of "
        f"the seed's run. The proxy network: a convolutional autoencoder (channels {p.channels}, {p.features} "
        f"features), trained once per study ({p.steps} Adam steps of {p.batch_size} on {p.num_images} images of "
        f"the data distribution drawn with its own seed {p.seed}, not any run's training set); the distance is "
        "the FID formula on its bottleneck codes. Its values are not FID and not comparable to FIDs. "
        "nn_mse: mean over samples of the MSE to the nearest training image (fidelity only: it does not see "
        "diversity, and a memorising model scores 0).",
        "Common random numbers: a seed fixes the training set, the trained model (one per seed, shared by "
        "every arm), the heatmap probes, the MSE tests' images and noise, and the sampling noise (every path "
        "starts from the same noise and draws its per-step noise from the same stream).",
        f"Not applicable is shown as 'no value': MSE-test arms sample nothing (sample metrics), path arms and "
        f"{HELD_OUT_ARM} are not MSE tests. Failed runs, if any, are listed at the end.",
        f"{HELD_OUT_ARM}: fresh images of the data distribution scored like the samples: the floor of each "
        "sample metric at this sample size.",
        f"Scale: each seed trains one model ({lcfg.model.image_size}² + {lcfg.model.image_size // 2}² images, "
        f"channels {lcfg.model.channels}) for {lcfg.train.steps} steps of {lcfg.train.batch_size} on "
        f"{lcfg.data.num_images} {lcfg.data.source} images"
        + (f" (the `dualdiff lift demo` model trains {demo_steps}: the study's models are shorter-trained than "
           "the demo's)" if lcfg.train.steps < demo_steps else "")
        + f"; heatmap {acfg.num_points}x{acfg.num_points}; DDIM eta {acfg.eta:g} with {acfg.num_steps} points "
        f"(fixed_total and diagonal_fixed: {fixed_points}). The seed's setting is 64x64 AFHQ with the full "
        "model: compare directions, not values.",
    ]
    cfg_dict = to_dict(config)
    return Study(
        name="lift", arms=arms, seeds=config.seed_list(), metrics=study_metrics(config),
        execute=lambda seed, a, w: run_lift_seed(config, seed, a, w),
        claims=claims, comparisons=comparisons, cited={}, cited_source=None, config=cfg_dict,
        fingerprint=config_fingerprint(cfg_dict, ("seeds", "first_seed", "threads", "experiment.device",
                                                  "experiment.lift.train.out_dir")),
        preset=preset, notes=notes, threads=config.threads)


def register_lift_study(lift_subparsers: Any) -> Any:
    """Add ``study`` to the ``dualdiff lift`` subcommands (``lift_subparsers``: the
    ``add_subparsers()`` object of the lift parser)."""
    from dualdiff.study import add_study_command

    return add_study_command(
        lift_subparsers, LIFTStudyConfig, build_lift_study, presets=LIFT_STUDY_PRESETS,
        default_preset="default", default_out_dir="runs/lift-study",
        help="compare the MSE tests and every sampling path over N seeds (one model per seed): 95 % "
             "intervals, verdicts; FID with fid_weights=FILE, else an offline proxy named as such",
        description=__doc__)
