"""Launch every fused kernel once per dtype and code path: the driver of the compute-sanitizer
stage of ``benchmarks/run_gpu.sh`` (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck --error-exitcode 3 python benchmarks/sanitize_kernels.py
    python benchmarks/sanitize_kernels.py --list                     # the cases, nothing launched
    python benchmarks/sanitize_kernels.py --device cpu --backends cpp --small   # CPU smoke run

A case is one op on one backend on one code path (dtype, vector/unaligned, fused/split, forward
and backward, the grid-stride sizes), run once; its outputs and gradients are compared with the
plain-PyTorch reference computed on the CPU (loose tolerance: the sanitizer is what this is for,
the value check only makes a silent wrong result visible). Inputs are made on the CPU and copied,
and references run on the CPU, so under the sanitizer almost every instrumented GPU kernel is one
of ours. Run with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so memcheck sees every allocation's bounds
(run_gpu.sh does). Prints one line per case and a summary; exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from dualdiff.ops.timestep_embedding import DualTimestepEmbedding, cuda_workspace_bytes
from dualdiff.ops.vae import cuda_forward_blocks, gaussian_kl, gaussian_kl_reference, vae_loss, vae_loss_reference
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
H100_SMS = 132           # sizes that need the grid-stride loops are computed for this many SMs
SMEM_OPTIN = 232_448     # H100/H200 shared memory per block (opt-in): wider is the scratch path


@dataclass(frozen=True)
class Case:
    op: str
    backend: str
    path: str                       # the code path, e.g. "softmax C=8 bf16 uint8-target"
    run: Callable[[str, str], None]  # (backend, device) -> raises on a wrong value
    large: bool = False             # a grid-stride size (skipped by --small)

    @property
    def name(self) -> str:
        return f"{self.op}[{self.backend}] {self.path}"


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got = got.detach().float().cpu()
    want = want.detach().float().cpu()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values")
    torch.testing.assert_close(got, want, **_tol(dtype), msg=lambda m: f"{name}: {m}")


def _leaf(t: torch.Tensor, device: str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh copy of ``t`` on ``device`` (in ``dtype``) that requires grad, sharing nothing."""
    return t.detach().to(device=device, dtype=dtype or t.dtype, copy=True).requires_grad_()


def _unaligned(t: torch.Tensor, device: str) -> torch.Tensor:
    """A contiguous copy of ``t`` on ``device`` whose data pointer is one element past a
    16-byte boundary (the kernels' scalar path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


# ---- weighted Dice ------------------------------------------------------------------------------
def _dice_case(B: int, C: int, spatial: tuple[int, ...], dtype: torch.dtype, activation: str,
               target: str, weight: str, include_background: bool = True, squared: bool = False,
               reduction: str = "mean"):
    def run(backend: str, device: str) -> None:
        g = torch.Generator().manual_seed(0)
        x = (2 * torch.randn(B, C, *spatial, generator=g)).to(dtype)
        if activation == "softmax":
            lab = torch.randint(0, C, (B, *spatial), generator=g)
            tgt = torch.nn.functional.one_hot(lab, C).movedim(-1, 1)
        else:
            tgt = (torch.rand(B, C, *spatial, generator=g) > 0.5)
        tgt = {"float": tgt.float(), "uint8": tgt.to(torch.uint8), "bool": tgt.bool()}[target]
        w = {"none": None, "B": torch.rand(B, generator=g) + 0.5,
             "BC": torch.rand(B, C, generator=g) + 0.5}[weight]
        kw = dict(activation=activation, include_background=include_background,
                  squared_pred=squared, reduction=reduction)
        xd = _leaf(x, device)
        wd = None if w is None else _leaf(w, device)
        loss = weighted_dice_loss(xd, tgt.to(device), wd, backend=backend, **kw)
        seed = torch.randn(loss.shape, generator=g)
        loss.backward(seed.to(device))
        xr = _leaf(x, dtype=torch.float32)
        wr = None if w is None else _leaf(w)
        ref = weighted_dice_loss_reference(xr, tgt, wr, **kw)
        ref.backward(seed)
        _close("loss", loss, ref, dtype)
        _close("d input", xd.grad, xr.grad, dtype)
        if w is not None:
            _close("d weight", wd.grad, wr.grad, dtype)
    return run


def dice_cases(backend: str) -> list[Case]:
    cases = []
    for dn, dt in DTYPES.items():
        # channel buckets of csrc (cp = 1 -> NC 1; softmax cp = C -> NC 4, 8, 32), odd 2-D sizes
        cases.append(Case("weighted_dice", backend, f"sigmoid C=2 {dn} float-target w[B]",
                          _dice_case(3, 2, (5, 7), dt, "sigmoid", "float", "B")))
        for C in (3, 8, 20):
            cases.append(Case("weighted_dice", backend, f"softmax C={C} {dn} uint8-target w[B,C]",
                              _dice_case(2, C, (9, 11), dt, "softmax", "uint8", "BC")))
    cases += [
        Case("weighted_dice", backend, "sigmoid C=4 fp32 bool-target 3-D squared no-background none",
             _dice_case(2, 4, (3, 4, 5), torch.float32, "sigmoid", "bool", "none",
                        include_background=False, squared=True, reduction="none")),
        Case("weighted_dice", backend, "none-activation C=1 bf16 B=1 sum",
             _dice_case(1, 1, (33,), torch.bfloat16, "none", "float", "B", reduction="sum")),
        # 70 000 row groups > the 65 535 of gridDim.y: the backward's grid-stride loop over groups
        Case("weighted_dice", backend, "sigmoid 70000 row groups (grid-stride) fp16",
             _dice_case(35_000, 2, (2, 2), torch.float16, "sigmoid", "float", "B"), large=True),
    ]
    return cases


# ---- VAE loss -----------------------------------------------------------------------------------
def _vae_case(B: int, img: tuple[int, ...], latent: int, rdt: torch.dtype, ldt: torch.dtype,
              recon: str, aligned: bool, kl_only: bool = False):
    def run(backend: str, device: str) -> None:
        g = torch.Generator().manual_seed(1)
        logits = (3 * torch.randn(B, *img, generator=g)).to(rdt)
        x = torch.rand(B, *img, generator=g).to(rdt)
        mu = torch.randn(B, latent, generator=g).to(ldt)
        logvar = (0.5 * torch.randn(B, latent, generator=g)).to(ldt)
        put = (lambda t: t.to(device, copy=True)) if aligned else (lambda t: _unaligned(t, device))
        mud, lvd = put(mu).requires_grad_(), put(logvar).requires_grad_()
        mur, lvr = _leaf(mu, dtype=torch.float32), _leaf(logvar, dtype=torch.float32)
        if kl_only:
            got = (gaussian_kl(mud, lvd, backend=backend),)
            want = (gaussian_kl_reference(mur, lvr),)
        else:
            ld = put(logits).requires_grad_()
            lr = _leaf(logits, dtype=torch.float32)
            got = vae_loss(ld, put(x), mud, lvd, kl_weight=0.3, recon=recon, backend=backend)
            want = vae_loss_reference(lr, x.float(), mur, lvr, kl_weight=0.3, recon=recon)
        seeds = [torch.randn((), generator=g) for _ in got]
        # gradients through every output (total, recon and kl together)
        torch.autograd.backward(list(got), [s.to(device) for s in seeds])
        torch.autograd.backward(list(want), seeds)
        for name, a, b in zip(("total", "recon", "kl"), got, want):
            _close(name, a, b, rdt if rdt != torch.float32 else ldt)
        _close("d mu", mud.grad, mur.grad, ldt)
        _close("d logvar", lvd.grad, lvr.grad, ldt)
        if not kl_only:
            _close("d logits", ld.grad, lr.grad, rdt)
    return run


def vae_cases(backend: str) -> list[Case]:
    cases = []
    for rn, rdt in DTYPES.items():
        for ln, ldt in DTYPES.items():
            for recon in ("bce", "mse"):
                cases.append(Case("vae_loss", backend, f"{recon} image {rn} latent {ln} aligned",
                                  _vae_case(3, (3, 17, 19), 37, rdt, ldt, recon, True)))
        cases.append(Case("vae_loss", backend, f"bce image {rn} latent fp32 unaligned",
                          _vae_case(3, (3, 17, 19), 37, rdt, torch.float32, "bce", False)))
    cases.append(Case("gaussian_kl", backend, "KL only fp32 (no image term)",
                      _vae_case(5, (1,), 129, torch.float32, torch.float32, "bce", True, kl_only=True)))
    # more image elements than 4 blocks per SM x 4096 cover in one step, and more latent
    # elements than 4 blocks per SM x 256: both forward grid-stride loops turn over
    p_r, p_k = cuda_forward_blocks(1, 1, H100_SMS)
    n_img = 4 * H100_SMS * 4096 * 2 + 12_345
    n_lat = 4 * H100_SMS * 256 * 2 + 77
    assert p_r == 1 and p_k == 1
    cases.append(Case("vae_loss", backend, f"bce fp16 grid-stride ({n_img} image, {n_lat} latent)",
                      _vae_case(1, (n_img,), n_lat, torch.float16, torch.float32, "bce", True),
                      large=True))
    return cases


# ---- dual timestep embedding ------------------------------------------------------------------------
def _temb_case(B: int, F: int, H: int, dtype: torch.dtype, tkind: str, twice: bool = False):
    def run(backend: str, device: str) -> None:
        torch.manual_seed(2)
        m = DualTimestepEmbedding(F, H, backend=backend, dtype=dtype)
        g = torch.Generator().manual_seed(3)
        t0 = torch.randint(0, 1000, (B,), generator=g)
        t1 = torch.randint(0, 1000, (B,), generator=g)
        if tkind != "int64":
            t0, t1 = t0.to(getattr(torch, tkind)), t1.to(getattr(torch, tkind))
        want_m = DualTimestepEmbedding(F, H, backend="torch", dtype=dtype)
        want_m.load_state_dict(m.state_dict())
        want = want_m(t0, t1)
        md = m.to(device)
        if twice:  # eager, no autograd: the second call takes the cached launch (Triton)
            with torch.no_grad():
                md(t0.to(device), t1.to(device))
                got = md(t0.to(device), t1.to(device))
            _close("out (cached launch)", got, want, dtype)
            return
        got = md(t0.to(device), t1.to(device))
        seed = torch.randn(got.shape, generator=g).to(dtype)
        got.backward(seed.to(device))
        want.backward(seed)
        _close("out", got, want, dtype)
        for (name, p), (_, q) in zip(md.named_parameters(), want_m.named_parameters()):
            _close(f"d {name}", p.grad, q.grad, dtype)
    return run


def temb_cases(backend: str) -> list[Case]:
    cases = []
    for dn, dt in DTYPES.items():
        cases.append(Case("timestep_embedding", backend, f"fused F=64 H=256 {dn} int64 t B=13",
                          _temb_case(13, 64, 256, dt, "int64")))
    cases += [
        Case("timestep_embedding", backend, "fused F=33 H=48 fp32 float32 t B=1",
             _temb_case(1, 33, 48, torch.float32, "float32")),
        Case("timestep_embedding", backend, "fused F=64 H=256 bf16 int32 t, cached second launch",
             _temb_case(9, 64, 256, torch.bfloat16, "int32", twice=True)),
    ]
    # Triton: padded widths > 256 take the two-launch split path. CUDA: a block workspace over
    # the shared memory per block takes the global-scratch path.
    H_wide = 512 if backend == "triton" else next(
        h for h in range(256, 8192, 64) if cuda_workspace_bytes(256, h) > SMEM_OPTIN)
    what = "split path" if backend == "triton" else "global-scratch path"
    cases.append(Case("timestep_embedding", backend, f"{what} F=256 H={H_wide} fp16 B=19",
                      _temb_case(19, 256, H_wide, torch.float16, "int64")))
    return cases


def all_cases(backends: list[str]) -> list[Case]:
    cases = []
    for be in backends:
        cases += dice_cases(be) + vae_cases(be)
        if be in ("cuda", "triton"):  # the embedding has no cpp backend
            cases += temb_cases(be)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="cuda,triton", help="comma-separated")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--small", action="store_true", help="skip the grid-stride sizes")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    cases = [c for c in all_cases(backends)
             if args.only in c.name and not (args.small and c.large)]
    if args.list:
        for c in cases:
            print(c.name + ("  [grid-stride size]" if c.large else ""))
        print(f"{len(cases)} cases")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    failed = 0
    t0 = time.perf_counter()
    for c in cases:
        t = time.perf_counter()
        try:
            c.run(c.backend, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"ok    {c.name} ({time.perf_counter() - t:.2f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - every case runs; failures are counted
            failed += 1
            print(f"FAIL  {c.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)
    print(f"sanitize_kernels: {len(cases)} cases, {failed} failed, {len(cases) - failed} ok "
          f"({time.perf_counter() - t0:.1f} s, backends {','.join(backends)}, device {args.device})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
