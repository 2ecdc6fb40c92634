"""Real faults: a training process is killed with SIGKILL in the middle of a metrics write
and in the middle of a checkpoint write, then resumed in a new process; the final training
state must equal an uninterrupted run's bitwise, with no temporary file left and the torn
metrics line dropped with a warning (harness: tests/crash_harness.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crash_harness import (DEFAULT_FAULTS, Fault, assert_same_final_state, cli_command,  # noqa: E402
                           compare_final_state, crash_and_resume, tiny_command)

if sys.platform == "win32":  # pragma: no cover
    pytest.skip("SIGKILL crash tests need a POSIX system", allow_module_level=True)


# 4 fresh Python processes (each imports torch): ~10 s on an idle 2-core machine, 47 s at
# load 7, hence slow; the in-process tests in test_checkpoint.py cover each repair path
@pytest.mark.slow
def test_tiny_trainer_killed_mid_log_and_mid_checkpoint_resumes_bitwise(tmp_path):
    res = crash_and_resume(tiny_command(6), tmp_path)
    assert_same_final_state(res.baseline_dir, res.crash_dir)
    # the comparison can fail: one ulp in one Adam moment of the final checkpoint is found
    import torch
    final = sorted((res.crash_dir / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(final, weights_only=True)
    m = state["optimizer"]["state"][0]["exp_avg"].view(-1)
    m[0] = torch.nextafter(m[0], torch.tensor(float("inf")))
    torch.save(state, final)
    diffs = compare_final_state(res.baseline_dir, res.crash_dir)
    assert len(diffs) == 1 and "optimizer.state.0.exp_avg" in diffs[0], diffs


# Every experiment's own CLI, shrunk to a few steps (4 subprocesses each: minutes under load).
# ldm train needs `ldm autoencoder` + `ldm encode` first; its autoencoder run (a Trainer run
# without periodic checkpoints: the kills land before step 6's final checkpoint) is covered.
_COMMON = ("train.steps=6", "train.checkpoint_every=2", "train.log_every=1")
EXPERIMENTS = {
    "toy2d": (cli_command("toy2d", "run", "preset=tiny", *_COMMON, "datasets=circle",
                          "variants=baseline,adaptive"), DEFAULT_FAULTS),
    "tadiff": (cli_command("tadiff", "train", "preset=tiny", *_COMMON, "train.batch_size=2",
                           "data.num_patients=4", "eval_batches=1", "num_samples=1",
                           "sample_steps=2", "sample_cases=1"), DEFAULT_FAULTS),
    "vae": (cli_command("vae", "train", "preset=tiny", *_COMMON, "train.batch_size=4",
                        "data.num_per_env=8", "eval_images=8", "recon_images=2", "plots=false",
                        "train.eval_every=0"), DEFAULT_FAULTS),
    "lift": (cli_command("lift", "train", "preset=tiny", *_COMMON, "train.batch_size=4",
                         "data.num_images=16", "train.ema_warmup=2"), DEFAULT_FAULTS),
    "ldm-autoencoder": (cli_command("ldm", "autoencoder", "preset=tiny", "ae.steps=6",
                                    "ae.batch_size=4"),
                        (Fault("log", 3), Fault("checkpoint", 6))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_cli_killed_and_resumed_bitwise(tmp_path, name):
    command, faults = EXPERIMENTS[name]
    res = crash_and_resume(command, tmp_path, faults)
    assert_same_final_state(res.baseline_dir, res.crash_dir)
