"""tadiff (issue 11): the training step with the fused Dice loss vs the seed-style step.

    python benchmarks/bench_tadiff.py [--device cpu|cuda] [--model tiny|default] [--batch 8]
                                      [--iters 10] [--no-compile] [--what dice,loss,step]

    CPU numbers in the README: --model default --batch 16 --what dice,loss (192² masks) and
    --model tiny --batch 8 --what step; GPU rows: the same with --device cuda.

Rows, measured side by side in one run on the same batch and the same random draws:
  seed eager      the loss of :class:`dualdiff.experiments.tadiff.TaDiffLoss` with its Dice term
                  computed the seed's way: MONAI ``DiceLoss(sigmoid, squared_pred, smooth_nr=0,
                  smooth_dr=1e-5, reduction="none")``, then the per-sample weights applied in torch
  fused eager     the same loss with ``dualdiff.ops.weighted_dice_loss`` (one fused call with the
                  ``[B, C]`` weights; cpp on CPU, triton/cuda on GPU)
  seed compile / fused compile   the same, the model + loss forward under ``torch.compile``
Sections: ``dice`` (the Dice term alone on random logits, forward + backward), ``loss`` (forward + backward of the loss alone, the model replaced by fixed
outputs: isolates the Dice part) and ``step`` (the whole training step: model forward/backward,
AdamW). Ratios are against ``seed eager`` of the section. MONAI is a test extra: without it the
seed rows are skipped with a message.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from dualdiff.experiments.tadiff import DICE_FLAGS, TaDiffConfig, TaDiffLoss, build_tadiff_model


class SeedStyleLoss(TaDiffLoss):
    """TaDiffLoss with the seed's Dice: MONAI DiceLoss(reduction='none') + separate weighting."""

    def __init__(self, cfg: TaDiffConfig) -> None:
        super().__init__(cfg)
        from monai.losses import DiceLoss

        self.monai = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=DICE_FLAGS["smooth_nr"],
                              smooth_dr=DICE_FLAGS["smooth_dr"], reduction="none")

    def dice_term(self, logits, label, lam, a):
        dice = self.monai(logits.float(), label).reshape(label.shape[:2])
        return (lam[:, None] * a * dice).mean(), dice.detach().mean()


class FixedOutput(nn.Module):
    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = nn.Parameter(out)

    def forward(self, x, t, days, treatments, target):
        return self.out * 1.0


def make_batch(cfg: TaDiffConfig, batch: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    S, M, H = cfg.model.sessions, cfg.model.modalities, cfg.model.image_size
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    r = ((yy - H / 2) ** 2 + (xx - H / 2) ** 2).sqrt()
    label = torch.stack([(r < H * (0.1 + 0.03 * s)) for s in range(S)]).float().expand(batch, S, H, H)
    return {"image": torch.rand(batch, S, M, H, H, generator=g).to(device), "label": label.contiguous().to(device),
            "days": (torch.arange(S).float() * 60).repeat(batch, 1).to(device),
            "treatments": torch.randint(0, 3, (batch, S), generator=g).float().to(device)}


def timeit(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_fn(model: nn.Module, loss_fn: TaDiffLoss, batch: dict, compile_: bool, train: bool):
    fwd = (lambda m, b: loss_fn(m, b)[0])
    if compile_:
        fwd = torch.compile(fwd)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    last = {}

    def run():
        torch.manual_seed(1)                      # same draws in every row and iteration
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                p.grad = None
        loss = fwd(model, batch)
        loss.backward()
        if opt is not None:
            opt.step()
        last["loss"] = float(loss.detach())

    return run, last


def dice_rows(cfg: TaDiffConfig, batch: int, device, iters: int, compile_: bool, have_monai: bool) -> None:
    """The Dice term alone, forward + backward: MONAI + weighting vs one fused call."""
    from dualdiff.ops import weighted_dice_loss

    S, H = cfg.model.sessions, cfg.model.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, S, H, H, generator=g).to(device).requires_grad_()
    lab = make_batch(cfg, batch, device)["label"]
    w = torch.rand(batch, S, generator=g).to(device) * 0.01
    fns = {}
    if have_monai:
        from monai.losses import DiceLoss
        m = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, reduction="none")
        fns["seed (MONAI + weights)"] = lambda: (w * m(x, lab).reshape(batch, S)).mean()
    fns["fused"] = lambda: weighted_dice_loss(x, lab, w, **DICE_FLAGS)
    rows = []
    for comp in ([False, True] if compile_ else [False]):
        for name, f in fns.items():
            fn = torch.compile(f) if comp else f
            last = {}

            def run(fn=fn, last=last):
                x.grad = None
                loss = fn()
                loss.backward()
                last["loss"] = float(loss.detach())
            sec = timeit(run, device, iters)
            if not rows:
                print(f"\n[dice]  {'row':28s} {'ms':>9s} {'vs first':>9s}  loss   ({batch}x{S}x{H}x{H})", flush=True)
            rows.append(sec)
            label = f"{name}{' compile' if comp else ''}"
            print(f"        {label:28s} {sec * 1e3:9.2f} {rows[0] / sec:8.2f}x  {last['loss']:.8f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--what", default="dice,loss,step", help="sections to run: dice, loss, step")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = TaDiffConfig.from_name(args.model)
    cfg.noise_weight_map = True
    batch = make_batch(cfg, args.batch, device)
    try:
        import monai  # noqa: F401
        have_monai = True
    except ImportError:
        have_monai = False
        print("MONAI is not installed (pip install '.[test]'): the seed rows are skipped")

    print(f"tadiff step, {args.model} model, batch {args.batch} x {cfg.model.sessions} sessions x "
          f"{cfg.model.image_size}², device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    S = cfg.model.sessions
    if "dice" in args.what.split(","):
        dice_rows(cfg, args.batch, device, args.iters, not args.no_compile, have_monai)
    for section in [w for w in ("loss", "step") if w in args.what.split(",")]:
        rows = []
        for compile_ in ([False] if args.no_compile else [False, True]):
            for kind in ("seed", "fused"):
                if kind == "seed" and not have_monai:
                    continue
                loss_fn = SeedStyleLoss(cfg) if kind == "seed" else TaDiffLoss(cfg)
                torch.manual_seed(0)
                if section == "loss":
                    H = cfg.model.image_size
                    model = FixedOutput(torch.randn(args.batch, S + 3, H, H, device=device))
                else:
                    model = build_tadiff_model(cfg).to(device)
                run, last = step_fn(model, loss_fn, batch, compile_, train=section == "step")
                sec = timeit(run, device, args.iters)
                name = f"{kind} {'compile' if compile_ else 'eager'}"
                if not rows:
                    print(f"\n[{section}]  {'row':16s} {'ms':>9s} {'vs first':>9s}  loss", flush=True)
                rows.append(sec)
                print(f"          {name:16s} {sec * 1e3:9.2f} {rows[0] / sec:8.2f}x  {last['loss']:.6f}", flush=True)


if __name__ == "__main__":
    main()
