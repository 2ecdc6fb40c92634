"""``dualdiff ldm study``: does guidance on the class distribution steer generation, does
``rescaled_phi`` hurt, and do matched class-balancing cutoffs beat the seed's mismatch?

Arms ``<training>/<sampling>``:

* training ``matched``: class-balanced training with the test cutoffs (``balance_p`` =
  ``test_balance_p``, 0 = the seed's test cutoffs [0, .25, .5, .75, 1]);
  ``seed_mismatch``: the seed's training cutoffs (``seed_train_balance_p`` = 0.5 -> [.5, .625,
  .75, .875, 1]) while the requests still follow the test cutoffs.
* sampling ``uncond`` (every row gets the null embedding), ``scale1`` (conditional alone) and
  ``scale<s>_phi<φ>`` for every ``cond_scales`` (> 1) x ``rescaled_phis``.

Metrics per run: ``cond_error`` (mean total-variation distance between the requested class
distribution and the stain-rule distribution of the decoded samples,
:func:`~dualdiff.experiments.ldm.conditioning_error`; lower is better) and ``latent_std_ratio``
(std of the sampled latents / std of the data's: about 1 when the sampler does not diverge).

Claims (verdicts by :data:`dualdiff.study.VERDICT_RULE`):

1. guidance steers generation: ``matched/scale<max>_phi0`` < ``matched/uncond``;
2. conditioning error falls with cond_scale: ``matched/scale<max>_phi0`` < ``matched/scale1``;
3. rescaled_phi does not hurt, tested as ``matched/scale<max>_phi<φ>`` < ``.../phi0``: *contradicted*
   means it hurts; *supported* or *inconclusive* mean it does not measurably hurt;
4. matched cutoffs beat the seed's mismatch: ``matched/<default sampling>`` <
   ``seed_mismatch/<default sampling>``.

Common random numbers: a study seed ``s`` fixes the UNet's initial weights, the training
batches (indices, t, noise, condition drops), the requested distributions and every sampling
noise (x_T and DDIM noise are the same for every sampling arm). The guidance arms of a training
arm share one trained model (only sampling differs), so each seed trains once per training arm.
The autoencoder and the latent caches (data seed ``experiment.data.seed``) are built once and
shared by every seed: seeds vary the diffusion model, not the tiles.

    dualdiff ldm study --out-dir runs/ldm-study preset=tiny      # 3 seeds, CPU, <= 15 min
    dualdiff ldm study --out-dir runs/ldm-study seeds=5          # default sizes
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualdiff.experiments.ldm import LDMConfig
from dualdiff.study import Claim, Comparison, Metric, Study, StudySettings

__all__ = ["LDMStudyConfig", "LDM_STUDY_PRESETS", "build_ldm_study", "run_ldm_seed",
           "register_ldm_study", "study_arms", "TRAINING_ARMS"]

METRICS = [Metric("cond_error", "conditioning error (TV)"),
           Metric("latent_std_ratio", "sampled / data latent std", lower_is_better=False)]

#: the two training arms
TRAINING_ARMS = ("matched", "seed_mismatch")


def _study_experiment(base: LDMConfig) -> LDMConfig:
    cfg = copy.deepcopy(base)
    cfg.train = dataclasses.replace(cfg.train, progress=False, checkpoint_every=0, save_final=False)
    cfg.ae.train = dataclasses.replace(cfg.ae.train, progress=False)
    cfg.data = dataclasses.replace(cfg.data, sampling="class_balanced")
    return cfg


@dataclass
class LDMStudyConfig(StudySettings):
    """``seeds`` x (:data:`TRAINING_ARMS` x sampling arms). ``experiment``: the ldm config of
    every run (its ``train.seed`` becomes the study seed; ``data.sampling`` is class_balanced
    and ``data.balance_p`` is set per training arm). ``cond_scales`` / ``rescaled_phis``: the
    guidance arms (scale 1 is one arm, phi has no effect there). ``requests``: requested
    distributions per seed, drawn from the test tiles with ``test_balance_p``;
    ``samples_per_request``: samples of each. ``seed_train_balance_p``: the seed's training
    cutoffs' uniform share (0.5)."""
    experiment: LDMConfig = field(default_factory=lambda: _study_experiment(LDMConfig()))
    cond_scales: list[float] = field(default_factory=lambda: [1.0, 3.0, 6.0])
    rescaled_phis: list[float] = field(default_factory=lambda: [0.0, 0.7])
    requests: int = 16
    samples_per_request: int = 4
    test_balance_p: float = 0.0
    seed_train_balance_p: float = 0.5

    def validate(self) -> None:
        """StudySettings' checks plus the guidance grid and the cutoffs."""
        super().validate()
        if not self.cond_scales or any(s < 1 for s in self.cond_scales) or 1.0 not in self.cond_scales:
            raise ValueError(f"cond_scales must include 1 and hold values >= 1, got {self.cond_scales}")
        if len(set(self.cond_scales)) < 2:
            raise ValueError(f"cond_scales needs a scale > 1 besides 1, got {self.cond_scales}")
        if not self.rescaled_phis or 0.0 not in self.rescaled_phis or \
                any(not 0 <= p <= 1 for p in self.rescaled_phis):
            raise ValueError(f"rescaled_phis must include 0 and lie in [0, 1], got {self.rescaled_phis}")
        for name in ("requests", "samples_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("test_balance_p", "seed_train_balance_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.test_balance_p == self.seed_train_balance_p:
            raise ValueError("seed_train_balance_p equals test_balance_p: there is no mismatch to study")


def _tiny() -> LDMStudyConfig:
    """The CPU preset: ldm's tiny sizes with a shorter run (300 UNet steps, batch 32; the EMA
    copy phase scaled with it to 10 %; autoencoder 200 steps, shared by the seeds), 25 DDIM
    steps, 8 requests x 4 samples per seed; 3 seeds, one CPU thread. Budget: at most 15 minutes
    on 2 shared CPU cores."""
    from dualdiff.experiments.ldm import tiny_ema_update_after_step

    exp = LDMConfig.from_name("tiny")
    exp.train = dataclasses.replace(exp.train, steps=300, log_every=50,
                                    ema_update_after_step=tiny_ema_update_after_step(300))
    exp.ae.train = dataclasses.replace(exp.ae.train, steps=200)
    exp.sampling_timesteps = 25
    return LDMStudyConfig(seeds=3, threads=1, experiment=_study_experiment(exp), requests=8,
                          samples_per_request=4)


LDM_STUDY_PRESETS: dict[str, Any] = {"tiny": _tiny, "default": LDMStudyConfig}


def _fmt(x: float) -> str:
    return f"{x:g}"


def sampling_settings(config: LDMStudyConfig) -> dict[str, tuple[float, float] | None]:
    """Sampling arm -> (cond_scale, rescaled_phi), None for ``uncond``."""
    out: dict[str, tuple[float, float] | None] = {"uncond": None, "scale1": (1.0, 0.0)}
    for s in config.cond_scales:
        if s == 1.0:
            continue
        for phi in config.rescaled_phis:
            out[f"scale{_fmt(s)}_phi{_fmt(phi)}"] = (float(s), float(phi))
    return out


def study_arms(config: LDMStudyConfig) -> list[str]:
    """Every ``<training>/<sampling>`` arm, training-major."""
    return [f"{t}/{s}" for t in TRAINING_ARMS for s in sampling_settings(config)]


def _default_sampling(config: LDMStudyConfig) -> str:
    """The sampling arm nearest the experiment's own cond_scale / rescaled_phi."""
    exp = config.experiment
    best = max(s for s in config.cond_scales)
    scale = exp.cond_scale if exp.cond_scale in config.cond_scales and exp.cond_scale != 1 else best
    phi = exp.rescaled_phi if exp.rescaled_phi in config.rescaled_phis else 0.0
    return f"scale{_fmt(scale)}_phi{_fmt(phi)}"


def _shared_latents(config: LDMStudyConfig, work_dir: Path) -> Path:
    """The autoencoder and latent caches all seeds share (built once per process: the folder
    ``<study>/work/shared_<rank>``); returns that folder."""
    from dualdiff.experiments.ldm import encode_latents, train_autoencoder

    shared = work_dir.parents[1] / f"shared_{work_dir.name}"
    done = shared / "done"
    if done.is_file():
        return shared
    if shared.exists():
        shutil.rmtree(shared)
    cfg = copy.deepcopy(config.experiment)
    cfg.train = dataclasses.replace(cfg.train, out_dir=str(shared))
    train_autoencoder(cfg)
    encode_latents(cfg, verbose=False)
    done.write_text("ok\n")
    return shared


def run_ldm_seed(config: LDMStudyConfig, seed: int, arms: list[str], work_dir: Path
                 ) -> dict[str, dict[str, Any]]:
    """Train each training arm that ``arms`` needs once at UNet seed ``seed`` and sample every
    requested sampling arm from it (common random numbers, module docstring); returns
    ``{arm: {"cond_error", "latent_std_ratio", ...}}``."""
    from dualdiff.data.latent_cache import LatentCache
    from dualdiff.experiments.ldm import balanced_requests, build_trainer, guided_errors, load_codec

    work_dir = Path(work_dir)
    shared = _shared_latents(config, work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)
    train_cache = LatentCache.load(shared / "latents_train.pt")
    test = LatentCache.load(shared / "latents_test.pt")
    exp = config.experiment
    settings = sampling_settings(config)
    wanted: dict[str, list[str]] = {}
    for a in arms:
        t, _, s = a.partition("/")
        if t not in TRAINING_ARMS or s not in settings:
            raise ValueError(f"unknown arm {a!r}")
        wanted.setdefault(t, []).append(s)
    req, _ = balanced_requests(test, config.requests, config.test_balance_p, seed)
    dist = req.repeat_interleave(config.samples_per_request, 0)
    shape = tuple(test.latents.shape[1:])
    data_std = float(test.scaled.std())
    out: dict[str, dict[str, Any]] = {}
    for t in TRAINING_ARMS:
        if t not in wanted:
            continue
        cfg = copy.deepcopy(exp)
        p = config.test_balance_p if t == "matched" else config.seed_train_balance_p
        cfg.data = dataclasses.replace(cfg.data, balance_p=p)
        cfg.train = dataclasses.replace(cfg.train, seed=seed, out_dir=str(work_dir / t))
        cfg.ae.path = str(shared / "autoencoder")
        trainer = build_trainer(cfg, cache=train_cache)
        try:
            trainer.fit()
        finally:
            trainer.close()
        model = trainer.ema_model.eval()
        dev = next(model.parameters()).device
        codec = load_codec(cfg, shared, dev)
        res = guided_errors(model, lambda z: codec.decode(z / test.scale), dist.to(dev), cfg, shape,
                            {s: settings[s] for s in wanted[t]}, seed)
        last = trainer.history[-1]["loss"] if trainer.history else None
        for s, r in res.items():
            out[f"{t}/{s}"] = {"cond_error": float(r["cond_error"].mean()),
                               "latent_std_ratio": float(r["latent_std"]) / data_std,
                               "balance_p": p, "final_train_loss": last}
    return out


def build_ldm_study(config: LDMStudyConfig, preset: str | None = None) -> Study:
    """The :class:`~dualdiff.study.Study` of ``config`` (arms, claims, executor)."""
    from dualdiff.config import to_dict
    from dualdiff.study.runner import config_fingerprint

    arms = study_arms(config)
    top = _fmt(max(config.cond_scales))
    guided = f"scale{top}_phi0"
    phi = max(config.rescaled_phis)
    default = _default_sampling(config)
    claims = [
        Claim("guidance < uncond", f"guidance steers generation: conditioning error at cond_scale {top} "
              "is lower than unconditional sampling (matched cutoffs)",
              f"matched/{guided}", "matched/uncond", "cond_error", "lower"),
        Claim("error falls with cond_scale", f"conditioning error falls with cond_scale: {top} "
              "lower than 1 (conditional alone)", f"matched/{guided}", "matched/scale1", "cond_error", "lower"),
    ]
    if phi > 0:
        claims.append(Claim(
            "rescaled_phi does not hurt",
            f"rescaled_phi {_fmt(phi)} does not hurt at cond_scale {top} (tested as 'lowers the error vs "
            "phi 0': contradicted = it hurts; supported or inconclusive = no measurable harm)",
            f"matched/scale{top}_phi{_fmt(phi)}", f"matched/{guided}", "cond_error", "lower"))
    claims.append(Claim(
        "matched < seed's mismatch",
        f"matched cutoffs (train p = test p = {_fmt(config.test_balance_p)}) beat the seed's mismatch "
        f"(train p = {_fmt(config.seed_train_balance_p)}, test p = {_fmt(config.test_balance_p)}) at "
        f"{default}", f"matched/{default}", f"seed_mismatch/{default}", "cond_error", "lower",
        cited="the seed trained with cutoffs [0.5, 0.625, 0.75, 0.875, 1] (p = 0.5) and tested with "
              "[0, 0.25, 0.5, 0.75, 1] (p = 0)",
        source="the seed document's DatasetLung cutoffs (train and test)"))
    comparisons = []
    for t in TRAINING_ARMS:
        for s in sampling_settings(config):
            if s != "uncond":
                comparisons.append(Comparison(f"{t}/{s}", f"{t}/uncond", "cond_error"))
    for s in sampling_settings(config):
        comparisons.append(Comparison(f"matched/{s}", f"seed_mismatch/{s}", "cond_error"))
    e = config.experiment
    notes = [
        "Common random numbers: a seed fixes the UNet's initial weights, the training batches, the "
        "requested distributions and all sampling noise; the sampling arms of a training arm share "
        "one trained model (EMA weights) and the same x_T and DDIM noise. The autoencoder and "
        f"latents (data seed {e.data.seed}) are shared by all seeds: seeds vary the diffusion model only.",
        f"Requests: {config.requests} class distributions per seed drawn from the masked test tiles "
        f"with the test cutoffs (p = {_fmt(config.test_balance_p)}), {config.samples_per_request} samples "
        f"each; conditioning error = mean TV distance of the stain-rule distribution of the decoded "
        f"samples to the request.",
        f"Scale: UNet {e.train.steps} steps of batch {e.train.batch_size} ({e.objective}, "
        f"{e.loss_weighting} γ={_fmt(e.p2_gamma)}), EMA {e.train.ema_decay} every {e.train.ema_every} "
        f"after {e.train.ema_update_after_step} steps, {e.sampling_timesteps} DDIM steps, "
        f"{e.data.image_size}² tiles. The seed document gives no conditioning-error numbers to cite.",
        "Claim 'rescaled_phi does not hurt' is judged as 'phi lowers the error': only *contradicted* "
        "says it hurts.",
    ]
    cfg_dict = to_dict(config)
    return Study(
        name="ldm", arms=arms, seeds=config.seed_list(), metrics=list(METRICS),
        execute=lambda seed, a, w: run_ldm_seed(config, seed, a, w),
        claims=claims, comparisons=comparisons, config=cfg_dict,
        fingerprint=config_fingerprint(cfg_dict, ("seeds", "first_seed", "threads",
                                                  "experiment.train.device", "experiment.ae.train.device",
                                                  "experiment.train.out_dir")),
        preset=preset, notes=notes, threads=config.threads)


def register_ldm_study(ldm_subparsers: Any) -> Any:
    """Add ``study`` to the ``dualdiff ldm`` subcommands."""
    from dualdiff.study.cli import add_study_command

    return add_study_command(
        ldm_subparsers, LDMStudyConfig, build_ldm_study, presets=LDM_STUDY_PRESETS,
        default_preset="default", default_out_dir="runs/ldm-study",
        help="guidance scales x rescaled_phi vs unconditional, and matched vs the seed's mismatched "
             "cutoffs, over N seeds with 95 % intervals and verdicts",
        description=__doc__)
