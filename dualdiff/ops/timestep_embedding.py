"""Fused dual timestep embedding (LIFT: one UNet, two scales, one timestep per scale).

    e(t)  = [sin(t f_0) .. sin(t f_{h-1}), cos(t f_0) .. cos(t f_{h-1})]  (+ one 0 column if F odd)
    f_k   = exp(-ln(10000) * k / h),   h = F // 2,   t cast to float32 first
    mlpX  = Linear(H, H) ∘ SiLU ∘ Linear(F, H)                                    X = 0, 1
    out   = Linear(2H, H)(SiLU(concat(mlp0(e(t0)), mlp1(e(t1)))))                  -> [B, H]

F = freq_dim (>= 2; an odd F pads the features with one zero column, as diffusers and ADM do),
H = hidden_dim. Parameters are named like the plain module (mlp0.0.weight, mlp0.2.bias, ...,
out.weight), so checkpoints load in both :class:`DualTimestepEmbedding` and
:class:`DualTimestepEmbeddingReference`.

Backends (``DUALDIFF_BACKEND`` / ``backend=``): ``triton`` and ``cuda`` run the whole forward in
ONE kernel launch with the sinusoids computed in registers/shared memory (never in global
memory); ``torch`` is the reference. Wide layers: Triton takes two tiled launches when freq_dim
or hidden_dim pads past 256 (``kernels.timestep_embedding.use_fused``); the CUDA kernel moves its
per-block workspace to a global scratch buffer when it exceeds the device's shared memory per
block (hidden past ~2300 on an H100). Launches run on the weights' device and its current stream. On the GPU auto picks cuda, then triton (expected order:
the cuda launch is one pybind call, the leanest host path; confirm with
benchmarks/bench_timestep_embedding.py on the GPU); on the CPU, torch (no C++ CPU kernel: two
tiny MLPs are matmuls that ATen's BLAS already runs well).

Gradients: the weights get the unfused module's gradients (the same aten formulas: mm, sum,
silu_backward). On the fused backends they come from an autograd formula that recomputes the small
intermediates in PyTorch (nothing saved besides t and the weights). Eager calls on the torch
backend run plain autograd through the reference, which keeps the activations instead of recomputing
them;
the timesteps get none (the embedding of t is treated as a constant of the data, as in every
diffusion model). Under ``torch.compile(fullgraph=True)`` the op is one custom-op node whose
backward is plain aten ops.

Launch cost is the whole story at the target size (B = 64, F = 64, H = 256: ~38 MFLOP), so the
eager path is lean: with no gradient needed and outside torch.compile the module calls the
launcher directly (no custom-op dispatch), validates its weights once per set of weight storages
(a key of data pointers and dtype), caches the frequency table per device, and on the triton
backend reuses the compiled kernel's launcher (``kernels.timestep_embedding.CachedLauncher``).
Per call it allocates only the output. With gradients needed, eager mode wraps the same launch
in a torch.autograd.Function (the custom op's autograd dispatch measured ~8x its host cost);
torch.compile traces the custom op (``dualdiff::dual_timestep_embedding``), whose autograd
formula is the same ``_backward_torch``. Inside torch.func transforms (jvp, vmap, grad, as in
Hutchinson estimates through a UNet) the op runs the reference, which composes with all of them.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff._backend import (DTYPE_CODES, ENV_VAR, BackendUnavailableError, extension,
                               select_backend, select_by_size)
from dualdiff.ops._checks import FLOAT_DTYPES, check_tensor

__all__ = [
    "AUTO_MIN_BATCH",
    "DualTimestepEmbedding",
    "DualTimestepEmbeddingReference",
    "dual_timestep_embedding",
    "dual_timestep_embedding_reference",
    "sinusoidal_embedding",
    "timestep_frequencies",
]

MAX_PERIOD = 10000.0
SUPPORTED = ("triton", "cuda", "torch")
PREFER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}
# auto's size rule (dualdiff._backend.select_by_size): below AUTO_MIN_BATCH[device][backend] rows
# (the batch B) auto runs the torch reference instead; 0 = always fused. Forced backends are never
# overridden. CPU: no fused backend (auto is torch). CUDA: unmeasured, so always fused.
AUTO_MIN_BATCH = {"cuda": {"cuda": 0, "triton": 0}}
WEIGHT_NAMES = ("mlp0.0.weight", "mlp0.0.bias", "mlp0.2.weight", "mlp0.2.bias",
                "mlp1.0.weight", "mlp1.0.bias", "mlp1.2.weight", "mlp1.2.bias",
                "out.weight", "out.bias")
# Timestep dtypes and their codes for csrc/timestep_embedding.cu (enum TCode).
_T_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3,
            torch.float64: 10, torch.int32: 11, torch.int64: 12, torch.int16: 13, torch.int8: 14}


# ---- reference (the specification) -----------------------------------------------------------
def timestep_frequencies(freq_dim: int, device=None) -> torch.Tensor:
    """``exp(-ln(10000) * k / (freq_dim // 2))`` for k = 0 .. freq_dim // 2 - 1, float32."""
    half = freq_dim // 2
    k = torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(k * (-math.log(MAX_PERIOD) / half))


def sinusoidal_embedding(t: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """[B] timesteps (int or float) -> [B, freq_dim] float32 features sin ‖ cos (‖ 0 if odd)."""
    args = t.to(torch.float32)[:, None] * timestep_frequencies(freq_dim, t.device)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if freq_dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def dual_timestep_embedding_reference(t0, t1, w00, b00, w02, b02, w10, b10, w12, b12, wo, bo):
    """Plain PyTorch: the unfused module's forward on [B] timesteps t0, t1 (see module doc)."""
    fd = w00.shape[1]
    y0 = F.linear(F.silu(F.linear(sinusoidal_embedding(t0, fd).to(w00.dtype), w00, b00)), w02, b02)
    y1 = F.linear(F.silu(F.linear(sinusoidal_embedding(t1, fd).to(w10.dtype), w10, b10)), w12, b12)
    return F.linear(F.silu(torch.cat([y0, y1], dim=1)), wo, bo)


def _backward_torch(grad, t0, t1, ws):
    """Weight gradients of the reference, recomputing its intermediates (aten ops only)."""
    w00, b00, w02, b02, w10, b10, w12, b12, wo, bo = ws
    fd, hd = w00.shape[1], w00.shape[0]
    grad = grad.to(wo.dtype)
    branches = []
    for t, w0, b0, w2, b2 in ((t0, w00, b00, w02, b02), (t1, w10, b10, w12, b12)):
        e = sinusoidal_embedding(t, fd).to(w0.dtype)
        a = F.linear(e, w0, b0)
        h = F.silu(a)
        branches.append((e, a, h, F.linear(h, w2, b2)))
    z = torch.cat([branches[0][3], branches[1][3]], dim=1)
    s = F.silu(z)
    g_wo = grad.t().mm(s)
    g_bo = grad.sum(0)
    g_z = torch.ops.aten.silu_backward(grad.mm(wo), z)
    grads = []
    for i, (e, a, h, _y) in enumerate(branches):
        w2 = (w02, w12)[i]
        g_y = g_z[:, i * hd:(i + 1) * hd]
        g_w2 = g_y.t().mm(h)
        g_b2 = g_y.sum(0)
        g_a = torch.ops.aten.silu_backward(g_y.mm(w2), a)
        grads += [g_a.t().mm(e), g_a.sum(0), g_w2, g_b2]
    return (*grads, g_wo, g_bo)


# ---- backend launchers ----------------------------------------------------------------------
_FREQ_TABLES: dict = {}


def _freq_table(freq_dim: int, device: torch.device) -> torch.Tensor:
    key = (freq_dim, device)
    table = _FREQ_TABLES.get(key)
    if table is None:
        table = _FREQ_TABLES[key] = timestep_frequencies(freq_dim, device)
    return table


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index)


_KERNELS = None          # dualdiff.kernels.timestep_embedding, imported on first use
_TRITON_LAUNCHER = None  # its CachedLauncher
_CUDA_FORWARD = None     # dualdiff._C.timestep_embedding_forward_cuda


def _launch_triton(t0, t1, ws, out, freqs, cache_key=None):
    """Triton kernel; ``cache_key`` (GPU, eager, no autograd) enables the cached compiled launch."""
    global _KERNELS, _TRITON_LAUNCHER
    if _KERNELS is None:
        from dualdiff.kernels import timestep_embedding as kernels

        _KERNELS, _TRITON_LAUNCHER = kernels, kernels.CachedLauncher()
    if cache_key is None or out.device.type != "cuda":
        _KERNELS.dual_timestep_embedding_fwd(t0, t1, freqs, ws, out)
    else:
        _TRITON_LAUNCHER(cache_key, _stream(out.device), t0, t1, freqs, ws, out)


CUDA_ROWS = 8  # batch rows per block of csrc/timestep_embedding.cu (kRows)
_SMEM_OPTIN: dict = {}


def cuda_workspace_bytes(freq_dim: int, hidden_dim: int) -> int:
    """fp32 workspace of one CUDA block: features, hidden and concatenation of CUDA_ROWS rows."""
    return 4 * CUDA_ROWS * (freq_dim + 3 * hidden_dim)


def cuda_grid(batch: int) -> int:
    """Blocks of the CUDA kernel (1-D grid, CUDA_ROWS rows each)."""
    return -(-batch // CUDA_ROWS)


def _cuda_scratch(B: int, F: int, H: int, device: torch.device) -> torch.Tensor | None:
    """A global fp32 workspace when the block's workspace exceeds the device's shared memory
    per block (opt-in maximum: 232,448 B on H100/H200), else None (shared memory)."""
    limit = _SMEM_OPTIN.get(device.index)
    if limit is None:
        limit = _SMEM_OPTIN[device.index] = torch.cuda.get_device_properties(
            device.index).shared_memory_per_block_optin
    need = cuda_workspace_bytes(F, H)
    if need <= limit:
        return None
    return torch.empty(cuda_grid(B) * need // 4, dtype=torch.float32, device=device)


def _launch_cuda(t0, t1, ws, out, freqs, ptrs=None):
    """CUDA kernel of dualdiff._C; ``ptrs``: the weights' data pointers if already known."""
    global _CUDA_FORWARD
    if _CUDA_FORWARD is None:
        _CUDA_FORWARD = extension().timestep_embedding_forward_cuda
    if ptrs is None:
        ptrs = [w.data_ptr() for w in ws]
    B, H = out.shape
    F = ws[0].shape[1]
    scratch = _cuda_scratch(B, F, H, out.device)
    _CUDA_FORWARD(t0.data_ptr(), t0.stride(0), _T_CODES[t0.dtype], t1.data_ptr(), t1.stride(0),
                  _T_CODES[t1.dtype], freqs.data_ptr(), *ptrs, out.data_ptr(), B, F, H,
                  DTYPE_CODES[out.dtype], 0 if scratch is None else scratch.data_ptr(),
                  _stream(out.device))


def _launch(backend, t0, t1, ws, out, freqs, ptrs=None, cache_key=None):
    dev = out.device
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return _launch(backend, t0, t1, ws, out, freqs, ptrs, cache_key)
    if backend == "cuda":
        _launch_cuda(t0, t1, ws, out, freqs, ptrs)
    elif backend == "triton":
        _launch_triton(t0, t1, ws, out, freqs, cache_key)
    else:  # pragma: no cover - select_backend only returns supported names
        raise BackendUnavailableError(f"dual_timestep_embedding has no {backend!r} backend")


def _forward_impl(backend, t0, t1, ws):
    """The forward on any backend, any weight layout (used by the custom op)."""
    if backend == "torch":
        return dual_timestep_embedding_reference(t0, t1, *ws)
    ws = tuple(w if w.is_contiguous() else w.contiguous() for w in ws)
    out = torch.empty((t0.shape[0], ws[0].shape[0]), dtype=ws[0].dtype, device=ws[0].device)
    _launch(backend, t0, t1, ws, out, _freq_table(ws[0].shape[1], out.device))
    return out


# ---- custom op (autograd and torch.compile) ----------------------------------------------------
@torch.library.custom_op("dualdiff::dual_timestep_embedding", mutates_args=())
def _dual_timestep_embedding_op(
    t0: torch.Tensor, t1: torch.Tensor,
    w00: torch.Tensor, b00: torch.Tensor, w02: torch.Tensor, b02: torch.Tensor,
    w10: torch.Tensor, b10: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor,
    wo: torch.Tensor, bo: torch.Tensor, backend: str,
) -> torch.Tensor:
    return _forward_impl(backend, t0, t1, (w00, b00, w02, b02, w10, b10, w12, b12, wo, bo))


@_dual_timestep_embedding_op.register_fake
def _(t0, t1, w00, b00, w02, b02, w10, b10, w12, b12, wo, bo, backend):
    return w00.new_empty((t0.shape[0], w00.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:12])


def _backward(ctx, grad):
    t0, t1, *ws = ctx.saved_tensors
    grads = _backward_torch(grad, t0, t1, ws)
    need = ctx.needs_input_grad[2:12]
    return (None, None, *(g if n else None for g, n in zip(grads, need)), None)


_dual_timestep_embedding_op.register_autograd(_backward, setup_context=_setup_context)


# ---- input checks and dispatch ----------------------------------------------------------------
_T_DTYPES = tuple(_T_CODES)


def _check_weights(ws: Sequence[torch.Tensor]) -> None:
    """Shapes [H, F], [H], [H, H], [H] (x2), [H, 2H], [H]; one float dtype; one device."""
    for name, w in zip(WEIGHT_NAMES, ws):
        check_tensor(name, w, dtypes=FLOAT_DTYPES, ndim=2 if name.endswith("weight") else 1)
    hd, fd = ws[0].shape
    if fd < 2:
        raise ValueError(f"mlp0.0.weight: freq_dim must be >= 2, got shape {tuple(ws[0].shape)}")
    expect = ((hd, fd), (hd,), (hd, hd), (hd,), (hd, fd), (hd,), (hd, hd), (hd,), (hd, 2 * hd), (hd,))
    for name, w, shape in zip(WEIGHT_NAMES, ws, expect):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (freq_dim {fd}, hidden_dim {hd}), "
                             f"got {tuple(w.shape)}")
        if w.dtype != ws[0].dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but mlp0.0.weight has {ws[0].dtype}")
        if w.device != ws[0].device:
            raise ValueError(f"{name} is on {w.device} but mlp0.0.weight is on {ws[0].device}")


def _as_timesteps(name: str, t, device: torch.device) -> torch.Tensor | None:
    """A [B] tensor, or a 0-D tensor / python number (returned 0-D, broadcast later)."""
    if isinstance(t, torch.Tensor):
        if t.dtype not in _T_DTYPES:
            raise TypeError(f"{name} must be an integer or floating tensor "
                            f"(int8/16/32/64, uint8, float16/32/64, bfloat16), got {t.dtype}")
        if t.dim() > 1:
            raise ValueError(f"{name} must be 1-D [B] (or a scalar), got shape {tuple(t.shape)}")
        if t.dim() == 1 and t.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the weights are on {device}")
        return t
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be a 1-D tensor [B] or a python int/float, got {type(t).__name__}")
    return torch.full((), t, dtype=torch.int64 if isinstance(t, int) else torch.float32, device=device)


def _prepare_timesteps(t0, t1, device: torch.device):
    t0 = _as_timesteps("t0", t0, device)
    t1 = _as_timesteps("t1", t1, device)
    if t0.dim() == 1 and t1.dim() == 1:
        if t0.shape != t1.shape:
            raise ValueError(f"t1 shape {tuple(t1.shape)} does not match t0 shape {tuple(t0.shape)} "
                             "(one timestep per sample for each scale)")
    elif t0.dim() == 1:
        t1 = t1.expand(t0.shape[0])
    elif t1.dim() == 1:
        t0 = t0.expand(t1.shape[0])
    else:
        raise ValueError("t0 and t1 are both scalars: pass at least one as a 1-D tensor [B] "
                         "to give the batch size")
    return t0, t1


def _select(device: torch.device, backend: str | None) -> str:
    return select_backend("dual_timestep_embedding", device, SUPPORTED, PREFER, backend)


def _by_size(name: str, device: torch.device, backend: str | None, batch) -> str:
    # skipped (no cost on the launch-bound eager path) while every threshold is 0
    if name == "torch" or not any(AUTO_MIN_BATCH.get(device.type, {}).values()):
        return name
    return select_by_size(name, device, backend, batch, AUTO_MIN_BATCH)


def auto_backend(batch: int, device: torch.device | str) -> str:
    """The backend :class:`DualTimestepEmbedding` runs (``DUALDIFF_BACKEND`` honoured, else
    auto's choice) for ``batch`` timesteps per scale on ``device``."""
    device = torch.device(device)
    return _by_size(_select(device, None), device, None, batch)


_SELECTED: dict = {}


def _select_fast(device: torch.device, backend: str | None) -> str:
    """select_backend, memoised per (device, argument, DUALDIFF_BACKEND) on the GPU, where
    nothing else can change the answer (on the CPU TRITON_INTERPRET matters: not memoised)."""
    if device.type != "cuda":
        return _select(device, backend)
    key = (device.index, backend, os.environ.get(ENV_VAR))
    name = _SELECTED.get(key)
    if name is None:
        name = _SELECTED[key] = _select(device, backend)
    return name


_data_ptr = torch.Tensor.data_ptr


class _WeightState:
    """Memo of the last validated weights (per module): valid while the weights' data pointers
    and dtype are unchanged (in-place updates keep them; .to(), load into new storage or a
    replaced Parameter change them and trigger a new validation)."""

    __slots__ = ("ptrs", "dtype", "device", "is_cuda", "hidden", "direct", "freqs", "triton_key")

    def __init__(self) -> None:
        self.ptrs = None

    def update(self, ws, ptrs=None) -> None:
        _check_weights(ws)
        if ptrs is None:
            ptrs = tuple(map(_data_ptr, ws))
        w0 = ws[0]
        self.ptrs, self.dtype, self.device = ptrs, w0.dtype, w0.device
        self.is_cuda = w0.device.type == "cuda"
        self.hidden = w0.shape[0]
        self.direct = all(w.is_contiguous() for w in ws)  # else copies via _forward_impl
        self.freqs = _freq_table(w0.shape[1], w0.device)
        aligned = all(p % 16 == 0 for p in ptrs)
        self.triton_key = ((w0.device.index, w0.dtype, w0.shape[1], w0.shape[0])
                           if self.direct and aligned and self.is_cuda else None)


def _fast_timesteps(t0, t1, device):
    """The common case ([B] tensors on the device) with few checks, else the full path."""
    if type(t0) is torch.Tensor and type(t1) is torch.Tensor and t0.dim() == 1 and t1.dim() == 1:
        n = t0.shape[0]
        if (n and n == t1.shape[0] and t0.dtype in _T_CODES and t1.dtype in _T_CODES
                and t0.device == device and t1.device == device):
            return t0, t1
    return _prepare_timesteps(t0, t1, device)


def _run(t0, t1, ws, backend: str | None, state: _WeightState | None):
    if torch.compiler.is_compiling():
        _check_weights(ws)
        dev = ws[0].device
        t0, t1 = _prepare_timesteps(t0, t1, dev)
        return _dual_timestep_embedding_op(t0, t1, *ws, _by_size(_select(dev, backend), dev, backend,
                                                                 t0.shape[0]))
    if torch._C._are_functorch_transforms_active():
        # torch.func (jvp, vmap, grad, ...): the reference composes with every transform; the
        # fused kernels have no forward-mode or batching rule.
        _check_weights(ws)
        t0, t1 = _prepare_timesteps(t0, t1, ws[0].device)
        return dual_timestep_embedding_reference(t0, t1, *ws)
    if state is None:  # functional form: validate every call
        state = _WeightState()
        state.update(ws)
    else:
        ptrs = tuple(map(_data_ptr, ws))
        if ptrs != state.ptrs or ws[0].dtype is not state.dtype:
            state.update(ws, ptrs)
    t0, t1 = _fast_timesteps(t0, t1, state.device)
    name = _by_size(_select_fast(state.device, backend), state.device, backend, t0.shape[0])
    if name == "torch":
        # plain autograd through the reference keeps its activations for the backward; the
        # fused kernels save none, so _EagerAutograd recomputes them (measured on the CPU at
        # SD widths, B 64: 0.80x of two diffusers embeddings with the recompute)
        return dual_timestep_embedding_reference(t0.detach(), t1.detach(), *ws)
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return _EagerAutograd.apply(name, state, t0, t1, *ws)
    return _eager_forward(name, state, t0, t1, ws)


def _eager_forward(name, state, t0, t1, ws):
    if name == "torch" or not state.direct:
        return _forward_impl(name, t0, t1, ws)
    out = torch.empty((t0.shape[0], state.hidden), dtype=state.dtype, device=state.device)
    triton_key = None if state.triton_key is None else (*state.triton_key, t0.dtype, t1.dtype)
    _launch(name, t0, t1, ws, out, state.freqs, state.ptrs, triton_key)
    return out


class _EagerAutograd(torch.autograd.Function):
    """Eager training path: the same forward and backward as the custom op, without its
    dispatch cost (a custom op with autograd costs several times a plain autograd.Function
    per call on the host; torch.compile uses the custom op)."""

    @staticmethod
    def forward(ctx, name, state, t0, t1, *ws):
        ctx.save_for_backward(t0, t1, *ws)
        return _eager_forward(name, state, t0, t1, ws)

    @staticmethod
    def backward(ctx, grad):
        t0, t1, *ws = ctx.saved_tensors
        grads = _backward_torch(grad, t0, t1, ws)
        need = ctx.needs_input_grad[4:14]
        return (None, None, None, None, *(g if n else None for g, n in zip(grads, need)))


def dual_timestep_embedding(t0, t1, w00, b00, w02, b02, w10, b10, w12, b12, wo, bo, *,
                            backend: str | None = None) -> torch.Tensor:
    """Functional form of :class:`DualTimestepEmbedding`.

    t0, t1: [B] int or float tensors (one timestep per sample and scale; a python number or a
    0-D tensor is broadcast to the other's B); weights as nn.Linear stores them:
    w00 [H, F], b00 [H], w02 [H, H], b02 [H] (branch 0), the same for branch 1, wo [H, 2H],
    bo [H], one dtype (float32, float16, bfloat16), one device. Returns [B, H] in that dtype.
    Weights get gradients, t0/t1 none.
    """
    return _run(t0, t1, (w00, b00, w02, b02, w10, b10, w12, b12, wo, bo), backend, None)


# ---- modules ---------------------------------------------------------------------------------
def _mlp(freq_dim, hidden_dim, factory):
    return nn.Sequential(nn.Linear(freq_dim, hidden_dim, **factory), nn.SiLU(),
                         nn.Linear(hidden_dim, hidden_dim, **factory))


class DualTimestepEmbeddingReference(nn.Module):
    """The unfused module (plain PyTorch), same parameters and state_dict as the fused one."""

    def __init__(self, freq_dim: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        if freq_dim < 2 or hidden_dim < 1:
            raise ValueError(f"freq_dim must be >= 2 and hidden_dim >= 1, got {freq_dim}, {hidden_dim}")
        factory = {"device": device, "dtype": dtype}
        self.freq_dim, self.hidden_dim = freq_dim, hidden_dim
        self.mlp0 = _mlp(freq_dim, hidden_dim, factory)
        self.mlp1 = _mlp(freq_dim, hidden_dim, factory)
        self.out = nn.Linear(2 * hidden_dim, hidden_dim, **factory)

    def forward(self, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        dt = self.out.weight.dtype
        y0 = self.mlp0(sinusoidal_embedding(t0, self.freq_dim).to(dt))
        y1 = self.mlp1(sinusoidal_embedding(t1, self.freq_dim).to(dt))
        return self.out(F.silu(torch.cat([y0, y1], dim=1)))

    def extra_repr(self) -> str:
        return f"freq_dim={self.freq_dim}, hidden_dim={self.hidden_dim}"


class DualTimestepEmbedding(DualTimestepEmbeddingReference):
    """Fused embedding of two timesteps per sample: ``forward(t0, t1) -> [B, hidden_dim]``.

    ``out = Linear(2H, H)(SiLU(mlp0(e(t0)) ‖ mlp1(e(t1))))`` with ``e`` the sinusoidal features
    (sin ‖ cos, max period 10000, one zero column if freq_dim is odd) and
    ``mlpX = Linear(H, H) ∘ SiLU ∘ Linear(freq_dim, H)`` (see the module docstring).

    t0, t1: [B] integer or floating tensors on the weights' device, possibly different per
    sample; a python number or 0-D tensor is broadcast to the other one's B (at least one must be
    1-D). Output dtype = parameter dtype (float32, float16, bfloat16). ``backend``: None/"auto"
    (DUALDIFF_BACKEND decides), "triton", "cuda" or "torch".

    ``unfused()`` returns a :class:`DualTimestepEmbeddingReference` sharing these parameters;
    ``reference_forward`` computes the plain version. The state_dicts are interchangeable.
    """

    def __init__(self, freq_dim: int, hidden_dim: int, *, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__(freq_dim, hidden_dim, device=device, dtype=dtype)
        self.backend = backend
        self._state = _WeightState()
        # Linear modules in WEIGHT_NAMES order, read through _parameters (nn.Module.__getattr__
        # costs ~0.4 µs per attribute: too much for a launch-bound op).
        self._linears = (self.mlp0[0], self.mlp0[2], self.mlp1[0], self.mlp1[2], self.out)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """(w00, b00, w02, b02, w10, b10, w12, b12, wo, bo), WEIGHT_NAMES order."""
        ws = []
        for lin in self._linears:
            p = lin._parameters
            ws += (p["weight"], p["bias"])
        return tuple(ws)

    def forward(self, t0, t1) -> torch.Tensor:
        return _run(t0, t1, self.weights(), self.backend, self._state)

    def reference_forward(self, t0, t1) -> torch.Tensor:
        """The plain PyTorch forward on the same parameters (autograd through every op)."""
        dev = self.out.weight.device
        t0, t1 = _prepare_timesteps(t0, t1, dev)
        return dual_timestep_embedding_reference(t0, t1, *self.weights())

    def unfused(self) -> DualTimestepEmbeddingReference:
        """A plain module that shares (not copies) this module's parameters."""
        ref = DualTimestepEmbeddingReference.__new__(DualTimestepEmbeddingReference)
        nn.Module.__init__(ref)
        ref.freq_dim, ref.hidden_dim = self.freq_dim, self.hidden_dim
        ref.mlp0, ref.mlp1, ref.out = self.mlp0, self.mlp1, self.out
        return ref
