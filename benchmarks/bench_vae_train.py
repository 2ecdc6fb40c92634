"""The vae experiment's training step: fused ``dualdiff.ops.vae_loss`` against the seed-style loss,
eager and ``torch.compile``, contiguous and channels_last, side by side in one run.

    python benchmarks/bench_vae_train.py                          # CPU, tiny preset (64², batch 16)
    python benchmarks/bench_vae_train.py --device cuda --preset default --batch 32   # the GPU rows
    python benchmarks/bench_vae_train.py --no-compile             # eager rows only (no compile wait)

One step = zero_grad, forward, loss, backward, Adam step (the vae experiment's step, its loss with
β·kl_weight = 1e-4 and y_weight = 0.1). Loss variants:

  seed   sigmoid, then ``F.binary_cross_entropy`` (mean) against the [0, 1] target, a separate KL
         (``-0.5·mean(1 + logvar - mu² - exp(logvar))``) and ``F.cross_entropy``, eager ops
  fused  ``vae_loss(logits, target, mu, logvar, kl_weight=1e-4 / D)`` (BCE from the logits + KL in
         one op, backend auto) + ``F.cross_entropy``

``compile`` compiles forward + loss (backward through AOTAutograd; the optimizer step stays eager).
Every variant has its own copy of the same initial model; rounds are interleaved (variant order
rotates), the median of ``--rounds`` rounds of ``--steps`` steps is reported with ratios against
the eager seed-style contiguous step.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from dualdiff.experiments.vae import VAEConfig, build_vae_model
from dualdiff.ops import vae_loss

KL_WEIGHT, Y_WEIGHT = 1e-4, 0.1


def seed_loss(logits, target, mu, logvar, y_logits, y):
    recon = F.binary_cross_entropy(torch.sigmoid(logits), target)
    kld = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    return recon + KL_WEIGHT * kld + Y_WEIGHT * F.cross_entropy(y_logits, y)


def fused_loss(logits, target, mu, logvar, y_logits, y):
    total = vae_loss(logits, target, mu, logvar, kl_weight=KL_WEIGHT / mu.shape[1])[0]
    return total + Y_WEIGHT * F.cross_entropy(y_logits, y)


def make_variant(model0, loss_name: str, compiled: bool, channels_last: bool, batch):
    model = copy.deepcopy(model0).train()
    x, t, y = batch
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x, t = x.contiguous(memory_format=torch.channels_last), t.contiguous(memory_format=torch.channels_last)
    loss_fn = seed_loss if loss_name == "seed" else fused_loss

    def forward_loss(x, t, y):
        logits, mu, logvar, y_logits = model(x)
        return loss_fn(logits, t, mu, logvar, y_logits, y)

    fwd = torch.compile(forward_loss) if compiled else forward_loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fwd(x, t, y)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation happens here)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cfg = VAEConfig.from_name(args.preset)
    torch.manual_seed(0)
    model0 = build_vae_model(cfg.model, 5).to(dev)
    s = cfg.model.image_size
    g = torch.Generator().manual_seed(0)
    t = torch.rand(args.batch, 3, s, s, generator=g)
    x = ((t - 0.45) / 0.225).to(dev)
    batch = (x, t.to(dev), torch.randint(0, 5, (args.batch,), generator=g).to(dev))

    variants = {}
    for compiled in ([False] if args.no_compile else [False, True]):
        for cl in (False, True):
            for loss in ("seed", "fused"):
                name = f"{loss:5s} {'compile' if compiled else 'eager':7s} {'channels_last' if cl else 'contiguous'}"
                variants[name] = make_variant(model0, loss, compiled, cl, batch)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    warm_time = {}
    for name, step in variants.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync()
        warm_time[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times[names[0]])
    print(f"vae training step, preset {args.preset} ({s}², {cfg.model.trunk}, decoder {cfg.model.decoder}), "
          f"batch {args.batch}, {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'variant':36s} {'ms/step':>9s} {'vs seed eager':>14s} {'warm-up s':>10s}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:36s} {med * 1e3:9.2f} {base / med:13.2f}x {warm_time[name]:10.1f}")
    print("fused vs seed at the same setting:")
    for name in names:
        if name.startswith("fused"):
            other = "seed " + name[5:]
            print(f"  {name[6:]:30s} {statistics.median(times[other]) / statistics.median(times[name]):.2f}x")


if __name__ == "__main__":
    main()
