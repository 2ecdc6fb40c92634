"""``dualdiff vae ...``: train | eval | loo | sweep | plot | demo | study (the β-VAE experiment).

    dualdiff vae train --out-dir runs/vae [preset=tiny] [key=value ...]   # any VAEConfig key
    dualdiff vae eval  --checkpoint runs/vae [--out-dir DIR] [eval_images=0 data.path=...]  # score a run again
    dualdiff vae loo   --out-dir runs/vae-loo preset=tiny                # one model per held-out environment
    dualdiff vae sweep --out-dir runs/vae-sweep preset=tiny [--kl-weights 5e-5,1e-4,5e-4]
    dualdiff vae plot  --out-dir runs/vae                                # redraw a run / sweep / loo folder
    dualdiff vae demo  [--out-dir runs/vae-demo]                         # tiny preset, a few CPU minutes
    dualdiff vae study --out-dir runs/vae-study preset=tiny              # annealing x kl_weight over seeds
    dualdiff vae train --out-dir runs/ae model.arch=conv_kl ...         # the spatial KL autoencoder (ldm)

Wired into the main command by ``register_vae_commands(subparsers)``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["register_vae_commands"]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_metrics(name: str, m: dict) -> None:
    keys = ("psnr", "ssim", "highpass_rel_error", "active_units", "accuracy")
    print(f"{name}: " + "  ".join(f"{k} {_fmt(m.get(k))}" for k in keys if k in m))
    if "accuracy_per_env" in m:
        print("  accuracy per environment: " + "  ".join(f"{e} {a:.3f}" for e, a in m["accuracy_per_env"].items()))


def _train(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.vae import train_vae

    cfg = config_from_args(args)
    res = train_vae(cfg)  # --out-dir / --resume folded into train.out_dir / train.resume
    m = res["metrics"]
    _print_metrics("val", m["val"])
    if "test" in m:
        _print_metrics(f"test ({m['test_env']})", m["test"])
    print(f"outputs in {res['out_dir']}")
    return 0


def _eval(args) -> int:
    from dualdiff.cli_common import config_from_checkpoint_args
    from dualdiff.experiments.vae import evaluate_vae_run

    cfg = config_from_checkpoint_args(args, writer="train_vae")
    m = evaluate_vae_run(args.checkpoint, args.out_dir, config=cfg)
    n = m["val"].get("n", 0)
    print(f"step {m['step']}, {n} validation image(s) scored (eval_images={m['eval_images']}; 0 = all)")
    _print_metrics("val", m["val"])
    if "test" in m:
        _print_metrics(f"test ({m['test_env']})", m["test"])
    return 0


def _loo(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.vae import loo_vae

    cfg = config_from_args(args)
    summary = loo_vae(cfg)
    print(f"{'held out':12s} {'test acc':>9s} {'val acc':>9s} {'test PSNR':>10s}")
    for env, s in summary.items():
        print(f"{env:12s} {_fmt(s['test_accuracy']):>9s} {_fmt(s['val_accuracy']):>9s} {_fmt(s['test_psnr']):>10s}")
    print(f"loo.json, loo.png in {cfg.train.out_dir}")
    return 0


def _sweep(args) -> int:
    from dualdiff.cli_common import UserError, config_from_args
    from dualdiff.experiments.vae import sweep_vae

    try:
        weights = [float(w) for w in args.kl_weights.split(",") if w.strip()]
    except ValueError as e:
        raise UserError(f"--kl-weights must be comma-separated floats, got {args.kl_weights!r}") from e
    if not weights or min(weights) < 0:
        raise UserError(f"--kl-weights must be non-negative floats, got {args.kl_weights!r}")
    cfg = config_from_args(args)
    summary = sweep_vae(cfg, kl_weights=weights)
    print(f"{'kl_weight':>10s} {'PSNR':>8s} {'SSIM':>8s} {'HP err':>8s} {'active':>7s}")
    for w, m in summary.items():
        print(f"{w:>10s} {_fmt(m['psnr']):>8s} {_fmt(m['ssim']):>8s} {_fmt(m['highpass_rel_error']):>8s} "
              f"{_fmt(m['active_units']):>7s}")
    print(f"sweep.json, sweep.png in {cfg.train.out_dir}")
    return 0


def _plot(args) -> int:
    from dualdiff.experiments.vae import plot_vae

    for p in plot_vae(args.out_dir):
        print(f"wrote {p}")
    return 0


def _demo(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.vae import demo_vae

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    res = demo_vae(cfg=cfg)
    print(f"{'step':>5s} {'beta':>6s} {'recon':>8s} {'KL/dim':>8s} {'CE':>7s} {'total':>8s}")
    for r in res["table"]:
        print(f"{r['step']:5d} {r['beta']:6.3f} {r['recon']:8.4f} {r['kl']:8.4f} {r['ce']:7.4f} {r['loss']:8.4f}")
    _print_metrics("val", res["metrics"]["val"])
    print("model vs a trivial baseline on the validation images (paired 95 % CI of model - baseline):")
    for k, c in res["comparisons"].items():
        iv = c["difference"]
        ci = "no interval" if iv["low"] is None else f"[{iv['low']:+.4g}, {iv['high']:+.4g}]"
        verdict = "within noise (the interval contains 0)" if c["within_noise"] else "beyond noise"
        print(f"  {k}: {c['model']:.4g} vs {c['baseline']:.4g} ({c['baseline_name']}), "
              f"difference {iv['mean']:+.4g} {ci}, n={c['n']}: {verdict}")
    out = Path(res["out_dir"])
    grids = sorted(out.glob("recon_*/grid.png"))
    print(f"{time.perf_counter() - t0:.1f} s; figure: {res['figure']}; reconstruction grids: "
          f"{', '.join(str(g) for g in grids)}; curves: {out / 'training.png'}")
    return 0


def register_vae_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``vae`` with train | eval | loo | sweep | plot | demo | study to an ``add_subparsers()`` object."""
    from dualdiff.cli_common import add_run_options
    from dualdiff.experiments.vae import SWEEP_KL_WEIGHTS, VAE_PRESETS, VAEConfig

    vae = subparsers.add_parser("vae", help="β-VAE with KL annealing on fundus domains (and the conv_kl autoencoder)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = vae.add_subparsers(dest="vae_command", required=True)
    p = sub.add_parser("train", help="train one model (preset=tiny|default, key=value overrides)")
    add_run_options(p, VAEConfig, presets=VAE_PRESETS, default_preset="default", out_dir="run")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="score a finished run again: validation (and held-out environment) "
                                    "metrics; key=value: eval_images, recon_images, data.path, "
                                    "data.verify, data.skip_bad, train.batch_size, train.device")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run folder (its newest step_*.pt)")
    add_run_options(p, VAEConfig, presets=VAE_PRESETS, out_dir="optional", default_out_dir=None,
                    resume=False, run_input="--checkpoint",
                    train_keys_read=("train.batch_size", "train.device"))
    p.set_defaults(func=_eval)
    p = sub.add_parser("loo", help="leave-one-domain-out: one model per held-out environment")
    add_run_options(p, VAEConfig, presets=VAE_PRESETS, default_preset="default", out_dir="run")
    p.set_defaults(func=_loo)
    p = sub.add_parser("sweep", help="one run per kl_weight; PSNR / high-pass error / active units")
    add_run_options(p, VAEConfig, presets=VAE_PRESETS, default_preset="default", out_dir="run")
    p.add_argument("--kl-weights", default=",".join(f"{w:g}" for w in SWEEP_KL_WEIGHTS),
                   help="comma-separated kl_weight values")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("plot", help="redraw the figures of a run, sweep or loo folder")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="the folder to plot")
    p.set_defaults(func=_plot)
    p = sub.add_parser("demo", help="tiny preset on the embedded fundus set, a few CPU minutes")
    add_run_options(p, VAEConfig, presets=VAE_PRESETS, default_preset="demo", out_dir="run", resume=False)
    p.set_defaults(func=_demo)
    from dualdiff.experiments.vae_study import register_vae_study  # dualdiff vae study
    register_vae_study(sub)
    return vae
