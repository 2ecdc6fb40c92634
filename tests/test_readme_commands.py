"""Every command in README.md and docs/*.md runs (issues 9, 21): documentation drift fails CI.

Each ``dualdiff ...`` command of the fenced blocks of README.md and of every docs/*.md page runs
in-process through ``dualdiff.cli.main`` in a temporary working directory, in file order within
its (file, section) (so later commands read what earlier ones wrote), with the tiny overrides of
:data:`TINY` appended so that it takes seconds. Commands that only print (``info``,
``ops-check``, ``--show-config``) must exit 0 and print. The commands of the docs pages' sections
in :data:`CONFIG_ONLY` (full-size GPU runs, studies over seeds: minutes to hours, the studies
run end to end in their own tests) run with ``--show-config`` instead: every key and value they
name is checked, nothing trains. Placeholder paths (``/path/to/...``, ``/data/...``, ``/models/...``,
``/weights/...``) are replaced by tiny fixtures built here (:data:`PLACEHOLDERS`); a resource that
cannot exist offline (Inception weights) is asserted to fail cleanly (exit 2, one
``dualdiff: error:`` line naming it). A README command without a :data:`TINY` entry, or with a
placeholder without a fixture, fails the test: add one. An optional package a fixture needs
(diffusers, nibabel) is used when installed (required under ``CI=true``); without it the command
must fail cleanly naming it. ``torchrun ... -m dualdiff ...`` would run through the plain CLI
(one process). Commands in running text (inline code) are not run: put runnable ones in a block.
"""
from __future__ import annotations

import importlib
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import require  # noqa: E402
from readme_commands import ReadmeCommand, readme_commands, shell_commands  # noqa: E402

from dualdiff.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
COMMANDS = [c for f in DOC_FILES for c in readme_commands((ROOT / f).read_text(encoding="utf-8"), f)]
README_COMMANDS = [c for c in COMMANDS if c.file == "README.md"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SECTIONS = list(dict.fromkeys((c.file, c.section) for c in COMMANDS if c.dualdiff_argv is not None))
#: docs sections whose commands are checked with ``--show-config`` only (see the module docstring)
CONFIG_ONLY = {"Full size on a GPU", "Study"}
#: commands that print and write nothing
PRINT_ONLY = {("info",), ("ops-check",)}
#: non-dualdiff commands the docs may show; not run here (pip / pytest: the Set up lines, checked
#: below; the GPU checklist: tests/test_run_gpu_script.py)
NOT_RUN = (("pip",), ("pytest",), ("bash", "benchmarks/run_gpu.sh"))


def _config_only(cmd: ReadmeCommand) -> bool:
    return cmd.file != "README.md" and cmd.section in CONFIG_ONLY


def _needs_tiny(cmd: ReadmeCommand) -> bool:
    return cmd.dualdiff_argv is not None and not _config_only(cmd) and "--show-config" not in cmd.words

# --- tiny overrides, appended to each README command (README keys first, so these win) --------
_LIFT_TRAIN = ["preset=tiny", "train.steps=2", "train.batch_size=2", "train.log_every=1", "data.num_images=8",
               "model.channels=[8, 16]"]
_LIFT_ANALYSIS = ["preset=tiny", "device=cpu", "num_points=3", "heatmap_samples=2", "probes=1", "cells_per_batch=9",
                  "num_steps=3", "fixed_steps=3", "max_jump=2", "grid_images=2", "batch_size=2", "mse_samples=3",
                  "num_images=3", "fid_download=false"]
_LIFT_DEMO = ["lift.train.steps=3", "lift.train.batch_size=2", "lift.train.log_every=1", "lift.data.num_images=8",
              "lift.model.channels=[8, 16]", *[f"analysis.{kv}" for kv in _LIFT_ANALYSIS[2:]]]
_VAE = ["preset=tiny", "model.image_size=32", "model.small_channels=[16,32,32]", "model.fc_hidden=32",
        "model.deep_channels=32", "model.base_channels=8", "data.num_per_env=10", "train.steps=2",
        "train.batch_size=4", "train.eval_every=0", "eval_images=8"]
_TADIFF_MODEL = ["model.image_size=16", "model.base_channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
                 "model.attention_ds=[]", "model.num_heads=1", "model.norm_groups=4"]
_TADIFF_EVAL = ["eval_batches=1", "eval_t_points=2", "sample_cases=2", "num_samples=2", "sample_steps=2"]
_TADIFF = ["preset=tiny", *_TADIFF_MODEL, "data.num_patients=3", "data.val_patients=1", "data.depth=4",
           "train.steps=3", "train.batch_size=4", *_TADIFF_EVAL]
_LDM_COMMON = ["preset=tiny", "data.image_size=16", "data.num_train=32", "data.num_test=8", "ae.base_channels=8",
               "model.dim=8", "model.attn_heads=1", "model.attn_dim_head=4", "sampling_timesteps=3",
               "eval_requests=2", "eval_samples=2", "num_samples=2", "eval_loss_batches=1", "eval_cond_scales=[1,3]"]
# each training stage takes its own TrainConfig's keys (a key a command does not read is an error)
_LDM_AE = [*_LDM_COMMON, "ae.train.steps=4", "ae.train.batch_size=8"]
_LDM = [*_LDM_COMMON, "train.steps=4", "train.batch_size=8", "train.log_every=2"]

_TOY2D = ["preset=tiny", "train.steps=4", "data.n_train=64", "train.batch_size=16", "n_samples=32",
          "datasets=circle,dino", "variants=baseline,adaptive"]

TINY: dict[tuple[str, ...], list[str]] = {
    ("info",): [],
    ("ops-check",): ["--iters", "1"],
    ("toy2d", "run"): _TOY2D,
    ("toy2d", "plot"): [],
    ("toy2d", "demo"): _TOY2D,
    ("lift", "demo"): _LIFT_DEMO,
    ("lift", "train"): _LIFT_TRAIN,
    ("lift", "heatmap"): _LIFT_ANALYSIS,
    ("lift", "path"): _LIFT_ANALYSIS,
    ("lift", "mse"): _LIFT_ANALYSIS,
    ("lift", "plot"): [],  # draws saved files; takes no keys
    ("lift", "generate"): _LIFT_ANALYSIS,
    ("lift", "generate-for-fid"): _LIFT_ANALYSIS,
    ("lift", "fid"): _LIFT_ANALYSIS,
    ("vae", "demo"): _VAE[1:],
    ("vae", "train"): _VAE,
    ("vae", "loo"): [*_VAE, "data.environments=[warm,dark]"],
    ("vae", "sweep"): [*_VAE, "data.environments=[warm]"],  # 3 kl_weights x 1 environment
    ("vae", "eval"): [],  # sizes come from the run's stored (tiny) config
    ("vae", "plot"): [],  # redraws a finished folder; takes no keys
    ("tadiff", "demo"): _TADIFF[1:],
    ("tadiff", "make-data"): _TADIFF,
    ("tadiff", "train"): _TADIFF,
    ("tadiff", "sweep"): _TADIFF,
    ("tadiff", "eval"): _TADIFF_EVAL,  # the stored run's model keys cannot change
    ("tadiff", "plot"): [],
    ("ldm", "demo"): [*_LDM, "ae.train.steps=4", "ae.train.batch_size=8"],
    ("ldm", "autoencoder"): _LDM_AE,
    ("ldm", "encode"): [*_LDM_COMMON, "train.batch_size=8"],  # encode reads no other train.* key
    ("ldm", "train"): _LDM,
    ("ldm", "sample"): [],  # sizes come from the run's stored (tiny) config
    ("ldm", "eval"): [],
    ("ldm", "plot"): [],
}


# --- placeholder fixtures -----------------------------------------------------------------------
@dataclass
class Fixture:
    """What a placeholder path becomes: ``build(tmp) -> path``; ``overrides`` appended with it;
    ``missing``: the resource cannot exist offline, the command must fail naming this text."""

    build: Callable[[Path], Path] | None = None
    overrides: list[str] = field(default_factory=list)
    missing: str | None = None
    # an optional package: without it (allowed outside CI) the command must fail naming it, run on
    # ``without(tmp)`` (default: an empty folder) instead of ``build(tmp)``
    needs: str | None = None
    without: Callable[[Path], Path] | None = None


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _domainbed_tree(root: Path) -> Path:
    """``root/<environment>/<class>/*.jpg``: 2 environments (one is the README's test_env), 2 grades."""
    rng = np.random.default_rng(0)
    for env in ("messidor", "aptos"):
        for grade in ("0", "1"):
            (root / env / grade).mkdir(parents=True)
            for i in range(5):
                img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / env / grade / f"{i}.jpg")
    return root


def _resnet18_weights(root: Path) -> Path:
    import torch
    from torchvision.models import resnet18

    root.parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet18(weights=None).state_dict(), root)
    return root


def _tadiff_npy(root: Path) -> Path:
    assert main(["tadiff", "make-data", "--out-dir", str(root), *_TADIFF]) == 0
    return root


_NIFTI_FILES = ("T1.nii.gz", "T1c.nii.gz", "Flair.nii.gz", "EdemaMask-CL.nii.gz", "ContrastEnhancedMask-CL.nii.gz")


def _nifti_skeleton(root: Path) -> Path:
    """The NIfTI layout with empty volume files: what a user without nibabel points the loader at."""
    for pid in ("p1", "p2", "p3"):
        for s in range(4):
            (root / pid / f"ses-{s:02d}").mkdir(parents=True)
            for fn in _NIFTI_FILES:
                (root / pid / f"ses-{s:02d}" / fn).touch()
        (root / pid / "sessions.csv").write_text(
            "session,day,treatment\n" + "".join(f"ses-{s:02d},{s * 60},{s % 3}\n" for s in range(4)))
    return root


def _nifti_tree(root: Path) -> Path:
    """The public NIfTI layout: ``root/{pid}/sessions.csv`` and per session the five volumes."""
    import nibabel as nib
    rng = np.random.default_rng(0)
    for pid in ("p1", "p2", "p3"):
        rows = ["session,day,treatment"]
        for s in range(4):
            sdir = root / pid / f"ses-{s:02d}"
            sdir.mkdir(parents=True)
            rows.append(f"ses-{s:02d},{s * 60},{s % 3}")
            for fn in _NIFTI_FILES[:3]:
                v = np.zeros((16, 16, 4), np.float32)
                v[2:14, 2:14] = rng.uniform(1, 100, size=(12, 12, 4))
                nib.save(nib.Nifti1Image(v, np.eye(4)), sdir / fn)
            for fn in _NIFTI_FILES[3:]:
                m = np.zeros((16, 16, 4), np.uint8)
                m[6:10, 6:10, 1:3] = 1
                nib.save(nib.Nifti1Image(m, np.eye(4)), sdir / fn)
        (root / pid / "sessions.csv").write_text("\n".join(rows) + "\n")
    return root


def _diffusers_ae(root: Path) -> Path:
    """A tiny ``AutoencoderKL`` (4 latent channels, factor 2) saved with ``save_pretrained``."""
    import diffusers
    ae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                 down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                 sample_size=16)
    ae.save_pretrained(root)
    return root


def _mask_folder(root: Path) -> Path:
    """ldm's real-data layout: ``images/`` + ``masks/`` (integers 0..4, same stem)."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"t{i}.png")
        Image.fromarray(rng.integers(0, 5, (32, 32), dtype=np.uint8)).save(root / "masks" / f"t{i}.png")
    return root


PLACEHOLDERS: dict[str, Fixture] = {
    "/path/to/real_images": Fixture(_image_folder),
    "/path/to/images": Fixture(_image_folder),
    "/path/to/pt_inception-2015-12-05-6726825d.pth": Fixture(missing="inception"),
    "/data/DR": Fixture(_domainbed_tree, ["data.subset_size=4"]),  # 8 train images per environment
    # a torchvision trunk's state dict: resnet18 for resnet50 takes the same code path, ~4x cheaper
    "/weights/resnet50.pth": Fixture(_resnet18_weights, ["model.trunk=resnet18"]),
    "/data/sailor_npy": Fixture(_tadiff_npy),
    "/data/nifti": Fixture(_nifti_tree, needs="nibabel", without=_nifti_skeleton),
    "/models/sd-vae": Fixture(_diffusers_ae, needs="diffusers"),
    "/data/lung": Fixture(_mask_folder, ["data.num_train=4", "data.num_test=1"]),
}
_PLACEHOLDER_PREFIXES = ("/path/to/", "/data/", "/models/", "/weights/")


def _empty_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _importable(module: str) -> bool:
    """Whether an optional package is there (under ``CI=true`` a missing one fails the test)."""
    if os.environ.get("CI", "").lower() == "true":
        require(module)
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _substitute(argv: list[str], tmp: Path) -> tuple[list[str], list[str], str | None]:
    """argv with placeholder paths replaced by built fixtures, the fixtures' extra overrides and
    the expected error text (None: the command must succeed)."""
    out, extra, missing = [], [], None
    for word in argv:
        for ph, fx in PLACEHOLDERS.items():
            if ph in word:
                if fx.missing is not None:
                    path, missing = tmp / "offline-missing" / Path(ph).name, fx.missing
                elif fx.needs is not None and not _importable(fx.needs):
                    path, missing = tmp / "without" / Path(ph).name, fx.needs
                    if not path.exists():
                        (fx.without or _empty_dir)(path)
                else:
                    path = tmp / "fixtures" / ph.strip("/").replace("/", "_")
                    if not path.exists():
                        fx.build(path)
                extra += fx.overrides
                word = word.replace(ph, str(path))
        assert not any(p in word for p in _PLACEHOLDER_PREFIXES), (
            f"README placeholder in {word!r} has no fixture: add it to PLACEHOLDERS in {__file__}")
        out.append(word)
    return out, extra, missing


def _with_overrides(argv: list[str], tiny: list[str]) -> list[str]:
    """Insert ``tiny`` right after the command's last ``key=value`` word (argparse takes the
    overrides as one run of positionals), else at the end; never after a bare ``--resume``."""
    keys = [i for i, w in enumerate(argv) if "=" in w and not w.startswith("-")]
    if keys:
        at = keys[-1] + 1
    else:
        at = len(argv) - 1 if argv and argv[-1] == "--resume" else len(argv)
    return [*argv[:at], *tiny, *argv[at:]]


def _out_dir(argv: list[str]) -> str | None:
    for flag in ("--out-dir", "--run-dir"):
        if flag in argv:
            return argv[argv.index(flag) + 1]
    return None


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _run(cmd: ReadmeCommand, tmp: Path, capsys) -> None:
    where = cmd.where
    if not _needs_tiny(cmd):  # prints the config it would run with: every key and value checked
        argv = [*cmd.dualdiff_argv, *([] if "--show-config" in cmd.words else ["--show-config"])]
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # --show-config prints and exits 0
            rc = e.code or 0
        out, err = capsys.readouterr()
        assert rc == 0 and out.strip(), f"{where}: exit {rc}\n{shlex.join(argv)}\n{err[-2000:]}"
        return
    assert cmd.key in TINY, f"{where}: add tiny overrides for {' '.join(cmd.key)!r} to TINY in {__file__}"
    argv, extra, missing = _substitute(cmd.dualdiff_argv, tmp)
    argv = _with_overrides(argv, [*TINY[cmd.key], *extra])
    before = _files(tmp)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    if missing is not None:
        lines = err.strip().splitlines()
        assert rc == 2, f"{where}: expected a clean error about {missing}, got exit {rc}"
        assert len(lines) == 1 and lines[0].startswith("dualdiff: error:"), f"{where}: {err}"
        assert missing in lines[0].lower(), f"{where}: the error does not name {missing}: {lines[0]}"
        return
    assert rc == 0, f"{where}: exit {rc}\n{shlex.join(argv)}\n{err[-2000:]}"
    if cmd.key in PRINT_ONLY:
        assert out.strip(), f"{where}: printed nothing"
        return
    after = _files(tmp)
    written = [p for p, t in after.items() if before.get(p) != t]
    out = _out_dir(argv)
    if out is not None:
        written = [p for p in written if p.is_relative_to(tmp / out)]
    assert written, f"{where}: wrote no files" + (f" under {out}" if out else "")


# --- tests --------------------------------------------------------------------------------------
def test_every_readme_dualdiff_command_has_tiny_overrides():
    """Drift guard without running anything: a new README or docs command needs a TINY entry."""
    missing = sorted({c.key for c in COMMANDS if _needs_tiny(c) and c.key not in TINY})
    assert not missing, f"add tiny overrides for {missing} to TINY in {__file__}"
    other = [c.where for c in COMMANDS
             if c.dualdiff_argv is None and not any(c.words[:len(p)] == p for p in NOT_RUN)]
    assert not other, f"commands this test does not know how to run: {other}"


def test_setup_commands_are_the_install_and_ci_ones():
    """The README installs in exactly two ways, both in *Set up*, and `.ci/run` runs the
    README's test line (``pip install ".[test]" && pytest``)."""
    installs = [c for c in README_COMMANDS if c.words[0] == "pip"]
    assert [c.words for c in installs] == [("pip", "install", "."), ("pip", "install", ".[test]")]
    assert {c.section for c in README_COMMANDS if c.words[0] in ("pip", "pytest")} == {"Set up"}
    assert not [c.where for c in COMMANDS if c.file != "README.md" and c.words[0] == "pip"], \
        "install commands belong in the README's Set up section"
    test_line = [c.words for c in README_COMMANDS if c.line == installs[1].line]
    assert test_line == [("pip", "install", ".[test]"), ("pytest",)]
    ci = [cmd for ln in (ROOT / ".ci" / "run").read_text().splitlines() for cmd in shell_commands(ln)]
    at = ci.index(test_line[0]) if test_line[0] in ci else -1
    assert ci[at:at + 2] == test_line, f".ci/run does not run the README's test line: {ci}"


@pytest.mark.parametrize("file,section", SECTIONS,
                         ids=[f"{f.removesuffix('.md')}:{s.split(':')[0]}" for f, s in SECTIONS])
def test_readme_section_commands_run(file, section, tmp_path, monkeypatch, capsys):
    """Each command of the (file, section), in file order, exits 0 and writes files (or fails
    cleanly on an offline-missing resource; or only prints, see the module docstring)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached Inception weights
    for cmd in COMMANDS:
        if (cmd.file, cmd.section) == (file, section) and cmd.dualdiff_argv is not None:
            _run(cmd, tmp_path, capsys)
