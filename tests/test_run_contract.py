"""One run contract for the five experiments (dualdiff.experiments.run): every training command
goes through the same checks.

* ``<train section>.lr`` reaches the optimizer (ldm's autoencoder stage: ``ae.train.lr``; a key
  of another stage is an error, never ignored);
* a run-folder conflict (``--out-dir A train.out_dir=B``, or ``out_dir=`` beside the key in
  Python) is the same one-line ConfigError;
* every command that takes a config has ``--config``, ``--show-config`` and ``key=value``, and
  ``--show-config`` works without ``--out-dir``;
* ``--resume`` auto / latest / PATH behave the same (checked through the real Trainer: a spy
  replaces ``Trainer.fit``, records what the Trainer was built with and stops);
* ``from_name`` of an unknown preset is the same ConfigError, from Python and from the CLI.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from dualdiff.cli import build_parser, main
from dualdiff.errors import ConfigError
from dualdiff.experiments.run import CONFLICT
from dualdiff.train import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_LDM_SMALL = ["preset=tiny", "data.image_size=16", "data.num_train=16", "data.num_test=4", "ae.base_channels=8",
              "model.dim=8", "model.attn_heads=1", "model.attn_dim_head=4"]

#: name -> (command, keys of a tiny run, the TrainConfig section the command trains with)
TRAIN_COMMANDS: dict[str, tuple[list[str], list[str], str]] = {
    "lift": (["lift", "train"], ["preset=tiny", "train.batch_size=2", "data.num_images=8",
                                 "model.channels=[8, 16]"], "train"),
    "toy2d": (["toy2d", "run"], ["preset=tiny", "data.n_train=64", "train.batch_size=16", "n_samples=32",
                                 "datasets=circle", "variants=baseline"], "train"),
    "tadiff": (["tadiff", "train"], ["preset=tiny", "model.image_size=16", "model.base_channels=8",
                                     "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_ds=[]",
                                     "model.num_heads=1", "model.norm_groups=4", "data.num_patients=3",
                                     "data.val_patients=1", "data.depth=4", "train.batch_size=4"], "train"),
    "vae": (["vae", "train"], ["preset=tiny", "model.image_size=32", "model.small_channels=[16,32,32]",
                               "model.fc_hidden=32", "model.deep_channels=32", "data.num_per_env=10",
                               "train.batch_size=4"], "train"),
    "ldm-autoencoder": (["ldm", "autoencoder"], [*_LDM_SMALL, "ae.train.batch_size=4"], "ae.train"),
    "ldm-train": (["ldm", "train"], [*_LDM_SMALL, "train.batch_size=4"], "train"),
}

#: the folder each command's Trainer writes its checkpoints to, relative to the run folder
CHECKPOINTS = {"lift": "checkpoints", "toy2d": "train/checkpoints", "tadiff": "checkpoints", "vae": "checkpoints",
               "ldm-autoencoder": "autoencoder/checkpoints", "ldm-train": "checkpoints"}


class _Stop(Exception):
    """Raised by the spy instead of training."""


@pytest.fixture
def spy(monkeypatch):
    """Replace Trainer.fit: record what the Trainer was built with (optimizer lr, step, the
    checkpoint it resumed from), optionally save a checkpoint, then stop the command."""
    seen: list[dict] = []
    options = {"save": False}

    def fit(self, *args, **kwargs):
        seen.append({"lr": self.optimizer.defaults["lr"], "step": self.step, "resumed_from": self.resumed_from,
                     "out_dir": Path(self.config.out_dir)})
        if options["save"]:
            seen[-1]["saved"] = self.save_checkpoint()
        raise _Stop

    monkeypatch.setattr(Trainer, "fit", fit)
    return seen, options


def _prepare(name: str, run: Path) -> None:
    """ldm's train stage reads the latent cache of the encode stage: a small one, written here."""
    if name == "ldm-train":
        from dualdiff.data.latent_cache import LatentCache

        g = torch.Generator().manual_seed(0)
        dist = torch.rand(8, 5, generator=g)
        LatentCache(torch.randn(8, 4, 4, 4, generator=g), dist / dist.sum(1, keepdim=True),
                    torch.ones(8, dtype=torch.bool), 1.0, {}).save(run / "latents_train.pt")


def _one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualdiff: error: "), err
    return err[0][len("dualdiff: error: "):]


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_train_lr_reaches_the_optimizer(name, tmp_path, spy):
    cmd, keys, section = TRAIN_COMMANDS[name]
    seen, _ = spy
    run = tmp_path / "run"
    run.mkdir()
    _prepare(name, run)
    with pytest.raises(_Stop):
        main([*cmd, "--out-dir", str(run), *keys, f"{section}.lr=0.00123"])
    assert seen[-1]["lr"] == pytest.approx(0.00123)
    assert seen[-1]["out_dir"] == run / Path(CHECKPOINTS[name]).parent


@pytest.mark.parametrize("command, key", [(["ldm", "autoencoder"], "train.lr"), (["ldm", "train"], "ae.train.lr"),
                                          (["ldm", "encode"], "ae.train.steps")])
def test_a_key_of_another_stage_is_an_error_not_ignored(command, key, tmp_path, capsys):
    line = _one_error_line(capsys, [*command, "--out-dir", str(tmp_path), f"{key}=0.5"])
    assert line.startswith(f"{key} is not used by this command"), line


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_a_run_folder_conflict_is_one_message(name, tmp_path, capsys):
    cmd, keys, _ = TRAIN_COMMANDS[name]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    line = _one_error_line(capsys, [*cmd, *keys, "--out-dir", a, f"train.out_dir={b}"])
    assert line == CONFLICT.format(flag="--out-dir", flag_value=a, key="train.out_dir", key_value=b)
    assert not Path(a).exists() and not Path(b).exists()  # nothing written before the check


def _python_entry(name: str):
    """(config class, the Python function training that command)."""
    if name == "lift":
        from dualdiff.experiments.lift import LIFTConfig, train_lift
        return LIFTConfig, train_lift
    if name == "toy2d":
        from dualdiff.experiments.toy2d import Toy2DConfig, run_grid
        return Toy2DConfig, run_grid
    if name == "tadiff":
        from dualdiff.experiments.tadiff import TaDiffConfig, train_tadiff
        return TaDiffConfig, train_tadiff
    if name == "vae":
        from dualdiff.experiments.vae import VAEConfig, train_vae
        return VAEConfig, train_vae
    from dualdiff.experiments.ldm import LDMConfig, train_autoencoder, train_ldm
    return LDMConfig, train_autoencoder if name == "ldm-autoencoder" else train_ldm


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_the_python_api_checks_the_run_folder_the_same_way(name, tmp_path):
    cls, train = _python_entry(name)
    cfg = cls.from_name("tiny")
    cfg.train.out_dir = str(tmp_path / "b")
    want = CONFLICT.format(flag="--out-dir", flag_value=str(tmp_path / "a"), key="train.out_dir",
                           key_value=str(tmp_path / "b"))
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "a")
    assert str(e.value) == want


def _config_commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    """Every ``dualdiff <exp> <command>`` parser."""
    out = []
    top = build_parser()
    for action in top._subparsers._group_actions:
        for exp, p in action.choices.items():
            if p._subparsers is None:
                continue
            for sub in p._subparsers._group_actions:
                out.extend(([exp, cmd], q) for cmd, q in sub.choices.items())
    return out


COMMANDS = _config_commands()
NO_CONFIG = {("lift", "plot"), ("toy2d", "plot"), ("tadiff", "plot"), ("vae", "plot"), ("ldm", "plot")}


def test_every_command_that_takes_a_config_has_the_shared_options():
    names = {tuple(c) for c, _ in COMMANDS}
    assert {"lift", "toy2d", "tadiff", "vae", "ldm"} == {c[0] for c in names}
    for argv, p in COMMANDS:
        opts = {o for a in p._actions for o in a.option_strings}
        positional = [a.dest for a in p._actions if not a.option_strings]
        if tuple(argv) in NO_CONFIG:  # they redraw saved files and read no config
            assert "--config" not in opts and "overrides" not in positional, argv
            continue
        assert {"--config", "--show-config", "--device"} <= opts, argv
        assert "overrides" in positional, argv
        assert p.get_default("_config_cls") is not None, argv


def _required_argv(p: argparse.ArgumentParser) -> list[str]:
    """Dummy values for the options / positionals argparse itself requires (never --out-dir)."""
    argv = []
    for a in p._actions:
        if a.option_strings and a.required:
            assert "--out-dir" not in a.option_strings
            argv += [a.option_strings[0], "x"]
        elif not a.option_strings and a.dest not in ("overrides", "help") and a.nargs is None:
            argv.append("x")
    return argv


@pytest.mark.parametrize("argv, parser", [c for c in COMMANDS if tuple(c[0]) not in NO_CONFIG],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_show_config_works_without_out_dir(argv, parser, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, *_required_argv(parser), "--show-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {parser.get_default('_config_cls').__name__}"), out[:200]


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_resume_modes_are_the_same_everywhere(name, tmp_path, capsys, spy):
    cmd, keys, section = TRAIN_COMMANDS[name]
    seen, options = spy
    run = tmp_path / "run"
    run.mkdir()
    _prepare(name, run)
    base = [*cmd, "--out-dir", str(run), *keys]
    ckpts = run / CHECKPOINTS[name]
    # the flag is the key: the bare flag means auto
    for flag, value in ((["--resume"], "auto"), (["--resume", "latest"], "latest")):
        with pytest.raises(SystemExit):
            main([*base, *flag, "--show-config"])
        assert re.search(rf"^{re.escape(section)}\.resume: .* -> '{value}'$", capsys.readouterr().out, re.M)
    # latest and a missing PATH: one-line errors before anything is built
    assert _one_error_line(capsys, [*base, "--resume", "latest"]) == \
        f"--resume latest: no usable checkpoint (step_*.pt) in {str(ckpts)!r}"
    missing = str(tmp_path / "none.pt")
    assert _one_error_line(capsys, [*base, "--resume", missing]) == \
        f"--resume: checkpoint file {missing!r} does not exist"
    # the flag and a key that disagree
    assert _one_error_line(capsys, [*base, "--resume", f"{section}.resume=latest"]) == \
        CONFLICT.format(flag="--resume", flag_value="auto", key=f"{section}.resume", key_value="latest")
    # auto on an empty run folder: a fresh start (the spy saves a checkpoint at step 0)
    options["save"] = True
    with pytest.raises(_Stop):
        main([*base, "--resume"])
    assert seen[-1]["resumed_from"] is None and seen[-1]["step"] == 0
    saved = seen[-1]["saved"]
    assert saved is not None and saved.parent == ckpts
    options["save"] = False
    # auto, latest and PATH all continue from it
    for flag in (["--resume"], ["--resume", "auto"], ["--resume", "latest"], ["--resume", str(saved)]):
        with pytest.raises(_Stop):
            main([*base, *flag])
        assert seen[-1]["resumed_from"] is not None and Path(seen[-1]["resumed_from"]) == saved, flag
    # a corrupt PATH is a CheckpointError naming it
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "bad.pt" in _one_error_line(capsys, [*base, "--resume", str(bad)])


PRESET_CLASSES = ["lift.LIFTConfig", "lift_analysis.LIFTAnalysisConfig", "lift_analysis.LIFTDemoConfig",
                  "toy2d.Toy2DConfig", "tadiff.TaDiffConfig", "vae.VAEConfig", "ldm.LDMConfig"]


@pytest.mark.parametrize("path", PRESET_CLASSES)
def test_from_name_of_an_unknown_preset_is_one_config_error(path):
    import importlib

    module, cls_name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(f"dualdiff.experiments.{module}"), cls_name)
    with pytest.raises(ConfigError) as e:
        cls.from_name("nope")
    assert re.fullmatch(rf"unknown preset 'nope' for {cls_name}; choose one of: [a-z_]+(, [a-z_]+)+", str(e.value))
    assert isinstance(cls.from_name("tiny"), cls) and cls.from_name("tiny") is not cls.from_name("tiny")


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_an_unknown_preset_on_the_command_line_is_the_same_message(name, tmp_path, capsys):
    cmd, _, _ = TRAIN_COMMANDS[name]
    cls, _ = _python_entry(name)
    with pytest.raises(ConfigError) as e:
        cls.from_name("nope")
    assert _one_error_line(capsys, [*cmd, "--out-dir", str(tmp_path), "preset=nope"]) == str(e.value)
