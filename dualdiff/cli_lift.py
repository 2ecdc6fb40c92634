"""``dualdiff lift ...``: train, heatmap, path, plot, generate, generate-for-fid, fid, mse, demo.

Wire into the main parser with ``register_lift_commands(subparsers)``. Every command takes
``key=value`` overrides: of :class:`dualdiff.experiments.lift.LIFTConfig` for ``train``, of
:class:`dualdiff.experiments.lift_analysis.LIFTAnalysisConfig` for the others (``--config`` a
YAML file of the same keys).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register_lift_commands", "main"]


def _analysis_cfg(args):
    from dualdiff.config import load_config
    from dualdiff.experiments.lift_analysis import LIFTAnalysisConfig

    cfg = load_config(LIFTAnalysisConfig, getattr(args, "config", None), list(args.overrides or []))
    for attr, key in (("inception_weights", "inception_weights"), ("device", "device")):
        v = getattr(args, attr, None)
        if v is not None:
            setattr(cfg, key, v)
    cfg.validate()
    return cfg


def _train(args) -> int:
    from dualdiff.config import load_config
    from dualdiff.experiments.lift import LIFT_PRESETS, LIFTConfig, train_lift

    if args.config:
        cfg = load_config(LIFTConfig, args.config, list(args.overrides or []))
    else:
        from dualdiff.config import apply_overrides
        import copy

        cfg = copy.deepcopy(LIFT_PRESETS[args.preset])
        cfg = apply_overrides(cfg, list(args.overrides)) if args.overrides else cfg
    cfg.train.out_dir = str(args.out_dir)
    resume = {"no": False, "yes": True, "auto": "auto"}.get(args.resume, args.resume)
    trainer = train_lift(cfg, args.out_dir, resume=resume)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    if losses:
        print(f"trained to step {trainer.step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoints in "
              f"{Path(args.out_dir) / 'checkpoints'}")
    return 0


def _heatmap(args) -> int:
    from dualdiff.experiments.lift_analysis import run_heatmap

    res = run_heatmap(args.checkpoint, args.out_dir, _analysis_cfg(args))
    if res is not None:
        print(f"heatmap {res.num_points}x{res.num_points}: 64x64 error {float(res.error_64.min()):.3g}.."
              f"{float(res.error_64.max()):.3g}, 32x32 {float(res.error_32.min()):.3g}..{float(res.error_32.max()):.3g}"
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

    for f in run_plot(args.heatmap, args.out_dir, _analysis_cfg(args), args.mse):
        print(f"wrote {f}")
    return 0


def _generate(args) -> int:
    from dualdiff.experiments.lift_analysis import run_generate

    cfg = _analysis_cfg(args)
    samples = run_generate(args.checkpoint, args.out_dir, cfg, heatmap=args.heatmap, kinds=args.path or None)
    for name in samples:
        print(f"wrote {Path(args.out_dir) / f'samples_{name}.png'}")
    print(f"wrote {Path(args.out_dir) / 'samples.png'}")
    return 0


def _generate_for_fid(args) -> int:
    from dualdiff.experiments.lift_analysis import run_generate_for_fid

    files = run_generate_for_fid(args.checkpoint, args.out_dir, _analysis_cfg(args), kind=args.path,
                                 heatmap=args.heatmap, n=args.num_images)
    print(f"wrote {len(files)} images to {args.out_dir}")
    return 0


def _fid(args) -> int:
    from dualdiff.experiments.lift_analysis import run_fid
    from dualdiff.metrics.fid import InceptionWeightsError

    cfg = _analysis_cfg(args)
    if args.cache_dir:
        cfg.fid_cache_dir = args.cache_dir
    try:
        value = run_fid(args.folder_a, args.folder_b, cfg, allow_download=False if args.no_download else None)
    except InceptionWeightsError as e:
        print(f"error: {e}")
        return 2
    print(f"FID {value:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"fid": value, "a": str(args.folder_a), "b": str(args.folder_b)}))
    return 0


def _mse(args) -> int:
    from dualdiff.experiments.lift_analysis import run_mse
    from dualdiff.metrics.mse_tests import format_mse_table

    res = run_mse(args.checkpoint, args.out_dir, _analysis_cfg(args))
    print(format_mse_table(res))
    return 0


def _demo(args) -> int:
    from dualdiff.experiments.lift_analysis import run_demo

    train_ov = [o[len("train:"):] for o in args.overrides or [] if o.startswith("train:")]
    ana_ov = [o for o in args.overrides or [] if not o.startswith("train:")]
    run_demo(args.out_dir, train_overrides=train_ov, analysis_overrides=ana_ov, steps=args.steps)
    return 0


def _common(p: argparse.ArgumentParser, *, checkpoint=False, heatmap=False, out_dir=True, config=True):
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (latest step_*.pt)")
    if heatmap:
        p.add_argument("--heatmap", required=True, help="heatmap.pt / .json written by `dualdiff lift heatmap`")
    if out_dir:
        p.add_argument("--out-dir", required=True, help="output folder")
    if config:
        p.add_argument("--config", default=None, help="YAML file of LIFTAnalysisConfig keys")
        p.add_argument("--device", default=None, help="auto | cpu | cuda[:k] (default: the config's)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (LIFTAnalysisConfig keys, e.g. num_points=30 probes=8)")


def register_lift_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``lift`` with its sub-commands to an ``add_subparsers()`` object; returns the lift parser."""
    lift = subparsers.add_parser("lift", help="LIFT dual-scale diffusion: train, error heatmap, paths, generation, FID",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = lift.add_subparsers(dest="lift_command", required=True)

    p = sub.add_parser("train", help="train a LIFT model (tiny or default preset, YAML config, key=value overrides)")
    p.add_argument("--config", default=None, help="YAML file of LIFTConfig keys")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help="starting config without --config")
    p.add_argument("--out-dir", required=True, help="run folder (checkpoints, metrics)")
    p.add_argument("--resume", default="no", help="no | yes | auto | a checkpoint path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="LIFTConfig overrides, e.g. train.steps=1000")
    p.set_defaults(func=_train)

    p = sub.add_parser("heatmap", help="error heatmap over (γ0, γ1) with batched Hutchinson JVPs (torchrun: sharded)")
    _common(p, checkpoint=True)
    p.set_defaults(func=_heatmap)

    p = sub.add_parser("path", help="seed DP, greedy and fixed-step DP paths through a heatmap; per-kind sampling paths")
    _common(p, heatmap=True)
    p.set_defaults(func=_path)

    p = sub.add_parser("plot", help="heatmap with path overlays (and the MSE chart with --mse)")
    _common(p, heatmap=True)
    p.add_argument("--mse", default=None, help="mse.json from `dualdiff lift mse` to plot as bars")
    p.set_defaults(func=_plot)

    p = sub.add_parser("generate", help="DDIM sample grids along diagonal / DP / saved paths")
    _common(p, checkpoint=True)
    p.add_argument("--heatmap", default=None, help="heatmap for the dp_* / fixed_* paths")
    p.add_argument("--path", action="append", default=None,
                   help="path kind (diagonal, ddim, dp_total, dp_64, fixed_total, fixed_64) or a path_*.json; repeatable")
    p.set_defaults(func=_generate)

    p = sub.add_parser("generate-for-fid", help="write N generated PNGs along one path (progress bar)")
    _common(p, checkpoint=True)
    p.add_argument("--heatmap", default=None, help="heatmap for the dp_* / fixed_* paths")
    p.add_argument("--path", default="diagonal", help="path kind or a path_*.json file")
    p.add_argument("-n", "--num-images", type=int, default=None, help="number of images (default: num_images)")
    p.set_defaults(func=_generate_for_fid)

    p = sub.add_parser("fid", help="FID between two image folders (pytorch-fid Inception; stats cached as .npz)")
    p.add_argument("folder_a")
    p.add_argument("folder_b")
    p.add_argument("--inception-weights", default=None,
                   help="local pt_inception-2015-12-05-6726825d.pth (else the torch hub cache or a download)")
    p.add_argument("--cache-dir", default=None, help="folder for cached statistics (.npz)")
    p.add_argument("--no-download", action="store_true", help="never try to download the Inception weights")
    p.add_argument("--out", default=None, help="write {fid: ...} JSON here")
    _common(p, out_dir=False)
    p.set_defaults(func=_fid)

    p = sub.add_parser("mse", help="the seed's MSE tests (both noisy; clean 32 + noisy 64; clean 64 + noisy 32)")
    _common(p, checkpoint=True)
    p.set_defaults(func=_mse)

    p = sub.add_parser("demo", help="whole pipeline on the embedded data with the tiny config (CPU, minutes)")
    p.add_argument("--out-dir", default="runs/lift-demo", help="output folder (default runs/lift-demo)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the tiny model (default: the tiny preset's, 600)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="LIFTAnalysisConfig overrides; prefix with train: for LIFTConfig ones (train:train.lr=1e-3)")
    p.set_defaults(func=_demo)
    return lift


def main(argv=None) -> int:
    """Stand-alone entry (``python -m dualdiff.cli_lift lift ...``) for use before cli.py wires it in."""
    parser = argparse.ArgumentParser(prog="dualdiff")
    register_lift_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    import sys

    sys.exit(main())
