"""``dualdiff vae study``: does KL annealing sharpen reconstructions and keep latent units active?

Arms: ``<schedule>/kl<w>`` for schedule in none | linear | cyclical (the experiment's defaults:
linear ramp to β = 1 at 25 % of the run; cyclical ``frange_cycle_linear`` over the whole run,
4 cycles, ratio 0.5) x kl_weight in ``kl_weights``: the seed's 1e-4 and a larger weight that
makes the effective β about 1 at the preset's scale (tiny: 5e-3, 50x; default: 2.5e-3, 25x).

Why a second, larger weight: the fixed loss averages the BCE over pixels and the KL over latent
dims, so kl_weight 1e-4 is a β-VAE with β = kl_weight·3·S²/D (:meth:`VAEConfig.effective_beta`)
of 0.01-0.06, a KL term far weaker than the ELBO's (β = 1). Annealing exists to stop the KL from
collapsing the posterior early in training (KL vanishing: Bowman et al. 2016, Fu et al. 2019),
which needs KL pressure to happen at all; with almost none, "annealing does nothing" is the
expected answer. A 10x weight was tried first at the tiny scale (β 0.19): every latent unit
stayed active in every arm, so it could not test the active-units claim; β ≈ 1 (the ELBO, the
setting of the annealing papers) can.

Metrics per run (:func:`dualdiff.experiments.vae.evaluate_vae` on the final weights, z = mu):
``psnr`` and ``highpass_rel_error`` (sharpness: the relative error in the band below ~2 px at
224², 1 = no fine detail) and ``active_units`` (Cov_x E[z|x] > 0.01, Burda et al.) on every
in-domain validation image; ``loo_accuracy``: grade accuracy on the held-out environment
(``experiment.data.test_env``, every image of it), the leave-one-domain-out score for that one
environment.

Claims (one set per kl_weight), judged by :data:`dualdiff.study.stats.VERDICT_RULE`: linear and
cyclical each vs none, "lower high-pass error", "higher PSNR", "more active units".

Common random numbers: study seed s is the experiment's ``data.seed`` and ``train.seed``, so at
a seed every arm sees the same synthetic images and split, starts from the same weights (same
architecture, init seeded by train.seed), and draws the same batches and reparameterisation noise
(the Trainer's generator); only the schedule and the weight differ. The data are built once per
seed and shared by the arms.

    dualdiff vae study --out-dir runs/vae-study preset=tiny          # CPU, about 10-15 min
    dualdiff vae study --out-dir runs/vae-study seeds=5              # 64² tiny-model sizes, longer
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dualdiff.errors import ConfigError
from dualdiff.experiments.vae import VAEConfig, VAEDataConfig, VAEModelConfig, build_vae_data, train_vae
from dualdiff.study import Claim, Comparison, Metric, Study, StudySettings
from dualdiff.train import TrainConfig

__all__ = ["VAEStudyConfig", "VAE_STUDY_PRESETS", "SCHEDULES", "METRICS", "arm_name",
           "build_vae_study", "run_vae_seed", "register_vae_study"]

SCHEDULES = ("none", "linear", "cyclical")

METRICS = [Metric("highpass_rel_error", "high-pass error (val)", lower_is_better=True),
           Metric("psnr", "PSNR dB (val)", lower_is_better=False),
           Metric("active_units", "active units (val)", lower_is_better=False),
           Metric("loo_accuracy", "held-out env accuracy", lower_is_better=False)]

SHARP_CITED = ("statement, no number: the design's β-VAE 'with KL annealing (linear; cyclical)' "
               "for sharper reconstructions; README troubleshooting: 'to sharpen, lower kl_weight "
               "(or anneal it)'")
UNITS_CITED = ("statement, no number: annealing counters KL vanishing / posterior collapse, so "
               "more latent units stay active (Fu et al. 2019, cyclical annealing)")
SOURCES = {"sharp": "DESIGN.md (vae row) and the README's vae troubleshooting (the seed's advice)",
           "units": "Fu et al. 2019, 'Cyclical Annealing Schedule' (haofuml/cyclical_annealing)"}


def arm_name(schedule: str, kl_weight: float) -> str:
    """The arm of ``schedule`` at ``kl_weight``: ``"linear/kl0.001"``."""
    return f"{schedule}/kl{kl_weight:g}"


def _study_experiment(cfg: VAEConfig) -> VAEConfig:
    # a study keeps only the numbers: no plots, checkpoints, evaluation during training or
    # progress bar; every held-out image scored (eval_images=0)
    return dataclasses.replace(cfg, plots=False, eval_images=0, train=dataclasses.replace(
        cfg.train, progress=False, checkpoint_every=0, save_final=False, eval_every=0))


@dataclass
class VAEStudyConfig(StudySettings):
    """``seeds`` x the arms ``SCHEDULES x kl_weights``; ``experiment``: the vae config every
    run starts from (its ``anneal``, ``kl_weight``, ``data.seed`` and ``train.seed`` are set
    per run; ``data.test_env`` is the held-out environment of ``loo_accuracy``). ``threads``:
    torch's intra-op CPU threads while the runs train (restored after; None: leave as is). 1 by
    default: these models are too small to gain from more, and on a shared, loaded CPU 2 threads
    ran the tiny preset's steps 4-8x slower than 1 (measured)."""
    experiment: VAEConfig = field(default_factory=lambda: _study_experiment(
        dataclasses.replace(VAEConfig(), data=VAEDataConfig(test_env="blurry"))))
    kl_weights: list[float] = field(default_factory=lambda: [1e-4, 2.5e-3])
    threads: int | None = 1

    def validate(self) -> None:
        """StudySettings' checks, plus distinct non-negative ``kl_weights`` and a test env."""
        super().validate()
        w = [float(v) for v in self.kl_weights]
        if not w or len(set(w)) != len(w) or min(w) < 0:
            raise ConfigError(f"kl_weights must be distinct non-negative floats, got {self.kl_weights}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ConfigError(f"threads must be an int >= 1 or None, got {self.threads!r}")
        if self.experiment.data.test_env is None:
            raise ConfigError("experiment.data.test_env must name the held-out environment (loo_accuracy)")


def _tiny() -> VAEStudyConfig:
    """The CPU preset: 32² images, a 3-stage CNN trunk, latent 16, 300 steps of batch 16 on 3 x 40
    synthetic fundus images (held out: ``blurry``, 40 images), kl_weight 1e-4 and 5e-3 (β 0.019
    and 0.96); 3 seeds x 6 arms = 18 runs, a few minutes on 2 loaded CPU cores (one thread)."""
    model = VAEModelConfig(image_size=32, trunk="small", small_channels=[16, 32, 64], fc_hidden=64,
                           latent_dim=16, decoder="deep", deep_channels=32)
    train = TrainConfig(steps=300, batch_size=16, lr=2e-3, optimizer="adam", out_dir="runs/vae-study",
                        log_every=20, progress=False)
    exp = VAEConfig(model=model, data=VAEDataConfig(num_per_env=40, test_env="blurry"), train=train)
    return VAEStudyConfig(seeds=3, experiment=_study_experiment(exp), kl_weights=[1e-4, 5e-3])


def _default() -> VAEStudyConfig:
    """The experiment's ``tiny`` sizes (64², latent 32, 200 steps) with the held-out ``blurry``
    environment, kl_weight 1e-4 and 2.5e-3 (β 0.038 and 0.96), 5 seeds."""
    exp = VAEConfig.from_name("tiny")
    exp.data.test_env = "blurry"
    return VAEStudyConfig(seeds=5, experiment=_study_experiment(exp))


VAE_STUDY_PRESETS: dict[str, Any] = {"tiny": _tiny, "default": _default}


def run_vae_seed(config: VAEStudyConfig, seed: int, arms: list[str], work_dir: Path
                 ) -> dict[str, dict[str, Any]]:
    """Train and evaluate ``arms`` at study seed ``seed`` (one after another, on data built once;
    each run's files under ``work_dir/<arm>``, cleared first); returns ``{arm: {metric: value,
    ...info}}``."""
    exp = config.experiment
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, seed=seed),
                              train=dataclasses.replace(exp.train, seed=seed))
    by_name = {arm_name(s, float(w)): (s, float(w)) for s in SCHEDULES for w in config.kl_weights}
    unknown = [a for a in arms if a not in by_name]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; this study's arms are {list(by_name)}")
    work_dir = Path(work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)  # a crashed earlier attempt's scratch files
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_arms(exp, config, arms, by_name, work_dir)
    finally:
        torch.set_num_threads(threads)


def _run_arms(exp: VAEConfig, config: VAEStudyConfig, arms: list[str],
              by_name: dict[str, tuple[str, float]], work_dir: Path) -> dict[str, dict[str, Any]]:
    data = build_vae_data(exp.data, exp.model.image_size)
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        schedule, w = by_name[arm]
        cfg = dataclasses.replace(exp, anneal=schedule, kl_weight=w, train=dataclasses.replace(
            exp.train, out_dir=str(work_dir / arm.replace("/", "_"))))
        res = train_vae(cfg, data=data)
        m = res["metrics"]
        hist = [r for r in res["trainer"].history if "recon" in r]
        out[arm] = {"highpass_rel_error": m["val"]["highpass_rel_error"], "psnr": m["val"]["psnr"],
                    "active_units": m["val"]["active_units"], "loo_accuracy": m["test"].get("accuracy"),
                    "val_accuracy": m["val"].get("accuracy"), "test_psnr": m["test"]["psnr"],
                    "val_images": m["val"]["n"], "test_images": m["test"]["n"],
                    "effective_beta": cfg.effective_beta(),
                    "final_kl_per_dim": hist[-1]["kl"] if hist else None,
                    "final_recon": hist[-1]["recon"] if hist else None}
    return out


def _claims(kl_weights: list[float]) -> tuple[list[Claim], list[Comparison]]:
    claims, comps = [], []
    for w in kl_weights:
        base = arm_name("none", w)
        for s in ("linear", "cyclical"):
            arm = arm_name(s, w)
            claims += [
                Claim(f"{s} sharper (HP) kl{w:g}", f"{s} annealing lowers the high-pass error vs none "
                      f"(kl_weight {w:g})", arm, base, "highpass_rel_error", "lower", SHARP_CITED,
                      SOURCES["sharp"]),
                Claim(f"{s} higher PSNR kl{w:g}", f"{s} annealing raises PSNR vs none (kl_weight {w:g})",
                      arm, base, "psnr", "higher", SHARP_CITED, SOURCES["sharp"]),
                Claim(f"{s} more active units kl{w:g}", f"{s} annealing increases active units vs none "
                      f"(kl_weight {w:g})", arm, base, "active_units", "higher", UNITS_CITED,
                      SOURCES["units"])]
            comps.append(Comparison(arm, base, "loo_accuracy"))
    if len(kl_weights) > 1:
        for s in SCHEDULES:
            for w in kl_weights[1:]:
                for m in ("highpass_rel_error", "active_units"):
                    comps.append(Comparison(arm_name(s, w), arm_name(s, kl_weights[0]), m))
    return claims, comps


def build_vae_study(config: VAEStudyConfig, preset: str | None = None) -> Study:
    """The :class:`~dualdiff.study.Study` of ``config`` (arms, metrics, claims, executor)."""
    from dualdiff.config import to_dict
    from dualdiff.study.runner import config_fingerprint

    config.validate()
    ws = [float(w) for w in config.kl_weights]
    arms = [arm_name(s, w) for w in ws for s in SCHEDULES]
    claims, comps = _claims(ws)
    e, t = config.experiment, config.experiment.train
    kws = {s: dataclasses.replace(e, anneal=s).anneal_kwargs() for s in SCHEDULES}
    betas = ", ".join(f"kl_weight {w:g} -> β {dataclasses.replace(e, kl_weight=w).effective_beta():.3g}"
                      for w in ws)
    notes = [
        "Common random numbers: a seed fixes the synthetic images and split (data.seed), the initial "
        "weights, the batches and the reparameterisation noise (train.seed) for every arm; only the "
        "schedule and kl_weight differ.",
        f"Scale: {t.steps} steps of batch {t.batch_size}, {e.model.image_size}² images, latent "
        f"{e.model.latent_dim}, {e.data.num_per_env} images per environment, held out: "
        f"{e.data.test_env}. Linear ramp: β = 1 from step {kws['linear']['end']}; cyclical: "
        f"{kws['cyclical']['cycles']} cycles over {kws['cyclical']['total_steps']} steps, ratio "
        f"{kws['cyclical']['ratio']:g}.",
        f"Effective β (usual convention: per-pixel-summed BCE, per-sample-summed KL): {betas}.",
        "The claims' citations are statements without numbers: no seed figure exists to put beside "
        "these metrics.",
    ]
    cfg_dict = to_dict(config)
    return Study(name="vae", arms=arms, seeds=config.seed_list(), metrics=list(METRICS),
                 execute=lambda seed, a, w: run_vae_seed(config, seed, a, w),
                 claims=claims, comparisons=comps, config=cfg_dict,
                 fingerprint=config_fingerprint(cfg_dict, ("seeds", "first_seed", "experiment.train.device")),
                 preset=preset, notes=notes)


def register_vae_study(vae_subparsers: Any) -> Any:
    """Add ``study`` to the ``dualdiff vae`` subcommands (``vae_subparsers``: the vae parser's
    ``add_subparsers()`` object)."""
    from dualdiff.study.cli import add_study_command

    return add_study_command(
        vae_subparsers, VAEStudyConfig, build_vae_study, presets=VAE_STUDY_PRESETS,
        default_preset="default", default_out_dir="runs/vae-study",
        help="annealing none/linear/cyclical x two kl_weights over N seeds: PSNR, high-pass error, "
             "active units, held-out accuracy, verdicts",
        description=__doc__)
