"""Diffusion core shared by every experiment: noise schedules and SNR <-> timestep maps,
training objectives and loss weights, DDIM with per-sample timesteps, DDPM ancestral
sampling and classifier-free guidance.

Conventions: integer timesteps t in [0, T-1] index float64 schedule tables
(ᾱ_t = prod_{s<=t}(1 - β_s), as in diffusers); functions on data take per-sample t of
shape [B] and broadcast over x's trailing dims.
"""
from __future__ import annotations

from dualdiff.diffusion.ddim import DDIMScheduler, DDIMStepOutput, ddim_timesteps, previous_timesteps
from dualdiff.diffusion.objectives import (
    OBJECTIVES,
    convert_prediction,
    loss_weight,
    min_snr_loss_weight,
    model_output_to_x0_eps,
    normalize_objective,
    p2_loss_weight,
    predict_noise_from_start,
    predict_noise_from_v,
    predict_start_from_noise,
    predict_start_from_v,
    predict_v,
    q_sample,
    training_target,
)
from dualdiff.diffusion.samplers import (
    SampleOutput,
    cfg_combine,
    cfg_model_fn,
    ddim_sample,
    ddpm_sample,
    ddpm_step,
    q_posterior,
)
from dualdiff.diffusion.schedules import (
    SCHEDULES,
    NoiseSchedule,
    ScheduleRangeWarning,
    cosine_betas,
    linear_betas,
    log_snr_to_timestep,
    make_schedule,
    scaled_linear_betas,
    sigmoid_betas,
    snr_to_timestep,
    timestep_to_log_snr,
    timestep_to_snr,
)

__all__ = [
    "DDIMScheduler",
    "DDIMStepOutput",
    "NoiseSchedule",
    "OBJECTIVES",
    "SCHEDULES",
    "SampleOutput",
    "ScheduleRangeWarning",
    "cfg_combine",
    "cfg_model_fn",
    "convert_prediction",
    "cosine_betas",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "linear_betas",
    "log_snr_to_timestep",
    "loss_weight",
    "make_schedule",
    "min_snr_loss_weight",
    "model_output_to_x0_eps",
    "normalize_objective",
    "p2_loss_weight",
    "predict_noise_from_start",
    "predict_noise_from_v",
    "predict_start_from_noise",
    "predict_start_from_v",
    "predict_v",
    "previous_timesteps",
    "q_posterior",
    "q_sample",
    "scaled_linear_betas",
    "sigmoid_betas",
    "snr_to_timestep",
    "timestep_to_log_snr",
    "timestep_to_snr",
    "training_target",
]
