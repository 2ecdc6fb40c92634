"""The ldm experiment's hot paths, side by side in one run (median of interleaved rounds):

1. guided DDIM sampling: conditional + null predictions from ONE batched forward (``cat([x, x])``)
   against two forwards per step (lucidrains' ``forward_with_cond_scale``);
2. a training step on cached latents against encoding the images with the autoencoder every
   step (what the seed did);
3. the training step (forward + loss + backward + Adam) under ``torch.compile`` against eager.

    python benchmarks/bench_ldm.py                                  # CPU, tiny preset
    python benchmarks/bench_ldm.py --device cuda --preset default --batch 16 --image-size 512
    python benchmarks/bench_ldm.py --no-compile                     # skip the compile rows

Models are freshly initialised (timing only); the autoencoder is the preset's ``conv_kl``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dualdiff.experiments.ldm import LDMConfig, LDMLoss, _vae_config, sample_latents
from dualdiff.experiments.vae import build_vae_model
from dualdiff.models.cond_unet import ClassDistUNet


def _timed(variants: dict, rounds: int, reps: int, sync) -> dict[str, float]:
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                variants[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / reps)
    return {n: statistics.median(v) for n, v in times.items()}


def _report(title: str, med: dict[str, float], unit: str = "ms") -> None:
    names = list(med)
    base = med[names[0]]
    print(f"\n{title}")
    for n in names:
        print(f"  {n:34s} {med[n] * 1e3:10.2f} {unit}  {base / med[n]:6.2f}x vs {names[0]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=None, help="tile size (default: the preset's)")
    ap.add_argument("--sample-steps", type=int, default=10, help="DDIM steps per timed sampling call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="calls per variant and round")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = LDMConfig.from_name(args.preset)
    size = args.image_size or cfg.data.image_size
    cfg.data.image_size = size
    torch.manual_seed(0)
    net = ClassDistUNet(cfg.model).to(dev)
    ae = build_vae_model(_vae_config(cfg, "unused").model).to(dev).eval()
    f = ae.downsample_factor
    lat = (cfg.model.channels, size // f, size // f)
    B = args.batch
    print(f"ldm benchmarks, preset {args.preset}: UNet {sum(p.numel() for p in net.parameters()):,} params, tiles "
          f"{size}² -> latents {lat}, batch {B}, {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    # 1. guided sampling
    dist = torch.softmax(torch.randn(B, cfg.data.num_classes), 1).to(dev)
    net.eval()

    def sampler(batched: bool):
        return lambda: sample_latents(net, dist, cfg, lat, cond_scale=3.0, batched=batched,
                                      sampling_timesteps=args.sample_steps)

    for v in (sampler(True), sampler(False)):
        v()
    med = _timed({"one batched cond+null forward": sampler(True), "two forwards per step": sampler(False)},
                 args.rounds, 1, sync)
    _report(f"guided DDIM sampling, {args.sample_steps} steps, cond_scale 3 (per call)", med)

    # 2. cached latents vs encoding every step; 3. compiled vs eager
    net.train()
    loss_fn = LDMLoss(cfg)
    images = torch.rand(B, 3, size, size, device=dev)
    with torch.no_grad():
        z_cached = ae.encode(images)[0]
    d = dist
    has = torch.ones(B, dtype=torch.bool, device=dev)

    def trainer_step(model, encode: bool, compiled: bool):
        model = copy.deepcopy(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        fwd = torch.compile(model) if compiled else model

        def step():
            if encode:
                with torch.no_grad():
                    z = ae.encode(images)[0]
            else:
                z = z_cached
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(fwd, (z, d, has), 0)
            loss.backward()
            opt.step()
        return step

    variants = {"cached latents, eager": trainer_step(net, False, False),
                "encode every step, eager": trainer_step(net, True, False)}
    for v in variants.values():
        v()
    _report("training step: cached latents vs encoding every step", _timed(variants, args.rounds, args.reps, sync))
    if not args.no_compile:
        variants = {"eager": trainer_step(net, False, False), "torch.compile": trainer_step(net, False, True)}
        t0 = time.perf_counter()
        for v in variants.values():
            for _ in range(3):
                v()
        sync()
        print(f"\n(compile warm-up {time.perf_counter() - t0:.1f} s)")
        _report("training step on cached latents: compiled vs eager", _timed(variants, args.rounds, args.reps, sync))


if __name__ == "__main__":
    main()
