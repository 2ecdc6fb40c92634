"""``dualdiff lift ...``: train, heatmap, path, plot, generate, generate-for-fid, fid, mse, demo, study.

    dualdiff lift train [--out-dir DIR] [--config FILE.yaml] [--resume [auto|latest|PATH]] [--device DEV]
        [--show-config] [key=value ...]          keys of LIFTConfig, e.g. preset=tiny train.lr=2e-4
    dualdiff lift heatmap --checkpoint RUN --out-dir DIR [key=value ...]
    dualdiff lift path --heatmap DIR/heatmap.pt --out-dir DIR [key=value ...]
    dualdiff lift plot --heatmap DIR/heatmap.pt --out-dir DIR [--paths FILE] [--mse FILE]
    dualdiff lift generate --checkpoint RUN --out-dir DIR [--heatmap FILE] [paths=[diagonal, dp_total]]
    dualdiff lift generate-for-fid --checkpoint RUN --out-dir DIR [--heatmap FILE] [fid_path=dp_total num_images=N]
    dualdiff lift mse --checkpoint RUN --out-dir DIR [key=value ...]
    dualdiff lift fid FOLDER_A FOLDER_B [--out-dir DIR] [inception_weights=FILE fid_download=false]
    dualdiff lift demo [--out-dir DIR] [key=value ...]   keys of LIFTDemoConfig: lift.*, analysis.*, device
    dualdiff lift study [--out-dir DIR] [preset=tiny] [seeds=N] [fid_weights=FILE] [experiment.* ...]
        the MSE tests and every sampling path over N seeds, with 95 % intervals and verdicts

The analysis commands take keys of :class:`dualdiff.experiments.lift_analysis.LIFTAnalysisConfig`
(``preset=tiny`` for the CPU-sized one). Every writing command also takes ``--config FILE.yaml``,
``--device`` and ``--show-config`` (dualdiff/cli_common.py). Wire into the main parser with
``register_lift_commands(subparsers)``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register_lift_commands"]


def _train(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.lift import train_lift

    cfg = config_from_args(args)  # --out-dir / --resume folded into train.out_dir / train.resume
    trainer = train_lift(cfg)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    if losses:
        print(f"trained to step {trainer.step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoints in "
              f"{Path(cfg.train.out_dir) / 'checkpoints'}")
    return 0


def _analysis_cfg(args):
    from dualdiff.cli_common import config_from_args

    return config_from_args(args)


def _heatmap(args) -> int:
    from dualdiff.experiments.lift_analysis import run_heatmap

    res = run_heatmap(args.checkpoint, args.out_dir, _analysis_cfg(args))
    if res is not None:
        from dualdiff.data.images import scale_labels

        big, small = scale_labels(res.meta)
        print(f"heatmap {res.num_points}x{res.num_points}: {big} error {float(res.error_64.min()):.3g}.."
              f"{float(res.error_64.max()):.3g}, {small} {float(res.error_32.min()):.3g}.."
              f"{float(res.error_32.max()):.3g}"
              f" -> {Path(args.out_dir) / 'heatmap.pt'} (.json)")
    return 0


def _path(args) -> int:
    from dualdiff.experiments.lift_analysis import run_paths

    res = run_paths(args.heatmap, args.out_dir, _analysis_cfg(args))
    for k, p in res["grid"].items():
        print(f"{k:13s} cost {p.cost:.4g}  points {p.points.tolist()}")
    for k, p in res["generation"].items():
        print(f"path_{k}.json: t64 {p.t64.tolist()}  t32 {p.t32.tolist()}")
    return 0


def _plot(args) -> int:
    from dualdiff.experiments.lift_analysis import run_plot

    for f in run_plot(args.heatmap, args.out_dir, args.mse, paths=args.paths):
        print(f"wrote {f}")
    return 0


def _generate(args) -> int:
    from dualdiff.experiments.lift_analysis import run_generate

    samples = run_generate(args.checkpoint, args.out_dir, _analysis_cfg(args), heatmap=args.heatmap)
    for name in samples:
        print(f"wrote {Path(args.out_dir) / f'samples_{name}.png'}")
    print(f"wrote {Path(args.out_dir) / 'samples.png'}")
    return 0


def _generate_for_fid(args) -> int:
    from dualdiff.experiments.lift_analysis import run_generate_for_fid

    files = run_generate_for_fid(args.checkpoint, args.out_dir, _analysis_cfg(args), heatmap=args.heatmap)
    print(f"wrote {len(files)} images to {args.out_dir}")
    return 0


def _fid(args) -> int:
    from dualdiff.experiments.lift_analysis import run_fid

    value = run_fid(args.folder_a, args.folder_b, _analysis_cfg(args))
    print(f"FID {value:.4f}")
    if args.out_dir is not None:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fid.json").write_text(json.dumps({"fid": value, "a": str(args.folder_a), "b": str(args.folder_b)}))
        print(f"wrote {out / 'fid.json'}")
    return 0


def _mse(args) -> int:
    from dualdiff.experiments.lift_analysis import run_mse
    from dualdiff.metrics.mse_tests import format_mse_table

    res = run_mse(args.checkpoint, args.out_dir, _analysis_cfg(args))
    print(format_mse_table(res))
    return 0


def _demo(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.lift_analysis import run_demo

    run_demo(config_from_args(args), args.out_dir)
    return 0


def _analysis_command(sub, name: str, help: str, *, checkpoint=False, heatmap: str | None = None,
                      folders: bool = False, out_dir: str = "required") -> argparse.ArgumentParser:
    """A sub-command configured by LIFTAnalysisConfig (``preset=tiny|default``, default ``default``)."""
    from dualdiff.cli_common import add_run_options
    from dualdiff.experiments.lift_analysis import LIFT_ANALYSIS_PRESETS, LIFTAnalysisConfig

    p = sub.add_parser(name, help=help, description=help)
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (latest step_*.pt)")
    if heatmap == "required":
        p.add_argument("--heatmap", required=True, help="heatmap.pt / .json written by `dualdiff lift heatmap`")
    elif heatmap == "optional":
        p.add_argument("--heatmap", default=None, help="heatmap for the dp_* / fixed_* paths")
    if folders:  # before the key=value list, so that argparse assigns them first
        p.add_argument("folder_a", help="image folder")
        p.add_argument("folder_b", help="image folder")
    add_run_options(p, LIFTAnalysisConfig, presets=LIFT_ANALYSIS_PRESETS, default_preset="default",
                    out_dir=out_dir, resume=False)
    return p


def register_lift_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``lift`` with its sub-commands to an ``add_subparsers()`` object; returns the lift parser."""
    from dualdiff.cli_common import add_run_options
    from dualdiff.experiments.lift import LIFT_PRESETS, LIFTConfig
    from dualdiff.experiments.lift_analysis import LIFT_DEMO_PRESETS, LIFTDemoConfig
    from dualdiff.experiments.lift_study import register_lift_study

    lift = subparsers.add_parser("lift", help="LIFT dual-scale diffusion: train, error heatmap, paths, generation, FID",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = lift.add_subparsers(dest="lift_command", required=True)

    p = sub.add_parser("train", help="train a LIFT model (preset=tiny|default, YAML config, key=value overrides)",
                       description="Train a LIFT model. The run folder is --out-dir (or the train.out_dir key; "
                                   "default runs/lift, runs/lift-tiny with preset=tiny). "
                                   "Example: dualdiff lift train preset=tiny train.lr=2e-4 --out-dir runs/t")
    add_run_options(p, LIFTConfig, presets=LIFT_PRESETS, default_preset="default", out_dir="run")
    p.set_defaults(func=(_train))

    p = _analysis_command(sub, "heatmap", "error heatmap over (γ0, γ1) with batched Hutchinson JVPs "
                                          "(torchrun: sharded)", checkpoint=True)
    p.set_defaults(func=(_heatmap))

    p = _analysis_command(sub, "path", "seed DP, greedy and fixed-step DP paths through a heatmap -> paths.json; "
                                       "per-kind sampling paths -> path_<kind>.json", heatmap="required")
    p.set_defaults(func=(_path))

    p = sub.add_parser("plot", help="heatmap with the saved paths drawn on it (and the MSE chart with --mse)")
    p.add_argument("--heatmap", required=True, help="heatmap.pt / .json written by `dualdiff lift heatmap`")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--paths", default=None, metavar="FILE",
                   help="paths.json written by `dualdiff lift path` (default: DIR/paths.json)")
    p.add_argument("--mse", default=None, metavar="FILE", help="mse.json from `dualdiff lift mse` to plot as bars")
    p.set_defaults(func=(_plot))

    p = _analysis_command(sub, "generate", "DDIM sample grids along the `paths` key's kinds "
                                           "(diagonal, ddim, dp_total, dp_64, fixed_total, fixed_64, path_*.json)",
                          checkpoint=True, heatmap="optional")
    p.set_defaults(func=(_generate))

    p = _analysis_command(sub, "generate-for-fid", "write num_images generated PNGs along the path fid_path "
                                                   "(progress bar)", checkpoint=True, heatmap="optional")
    p.set_defaults(func=(_generate_for_fid))

    p = _analysis_command(sub, "fid", "FID between two image folders (pytorch-fid Inception; stats cached as "
                                      ".npz in fid_cache_dir); with --out-dir also writes fid.json",
                          folders=True, out_dir="optional")
    p.set_defaults(func=(_fid))

    p = _analysis_command(sub, "mse", "the seed's MSE tests (both noisy; clean 32 + noisy 64; clean 64 + noisy 32)",
                          checkpoint=True)
    p.set_defaults(func=(_mse))

    p = sub.add_parser("demo", help="whole pipeline on the embedded data with the tiny config (CPU, minutes)",
                       description="Train, heatmap, paths, sample grids beside training images, MSE tests, "
                                   "plots (and FID with Inception weights). Keys: lift.* (LIFTConfig), "
                                   "analysis.* (LIFTAnalysisConfig), device; e.g. lift.train.steps=100")
    add_run_options(p, LIFTDemoConfig, presets=LIFT_DEMO_PRESETS, default_preset="tiny", out_dir="optional",
                    default_out_dir="runs/lift-demo", resume=False)
    p.set_defaults(func=(_demo))

    register_lift_study(sub)
    return lift
