"""Triton kernels of the fused dual timestep embedding (forward only).

Fused path (padded freq and hidden widths <= FUSED_MAX_DIM, the target H = 256): one launch
computes, for a block of BLOCK_B batch rows, everything between the timesteps and the output:
the sinusoidal features of t0 and t1 (in registers, never written to memory), both branch MLPs
``Linear(F, H) -> SiLU -> Linear(H, H)``, SiLU of the concatenation and the output
``Linear(2H, H)``. The grid is ``cdiv(B, BLOCK_B)`` programs; each streams every weight once
(from L2 after the first program).

Split path (wider layers, where the fused kernel's [BLOCK_B, H] register tiles and [H, BK]
operand tiles would exceed the 232,448 B of shared memory of an H100/H200): two launches of
fixed tile sizes, whatever F and H. ``_branches_kernel`` writes s = SiLU(mlpX(e(tX))) of both
branches to a [B, 2H] scratch buffer (weight dtype: the rounding the fused kernel applies before
its output dot), one [BLOCK_B, SPLIT_N] tile per program, recomputing the first layer's hidden
chunk (and the sinusoids) inside its reduction loop; ``_out_kernel`` is the tiled output Linear.
The backward is computed in PyTorch by ``dualdiff.ops.timestep_embedding``.

Matmuls use ``tl.dot`` with fp32 accumulation. For fp32 weights the dot precision is
``FP32_DOT_PRECISION`` ("tf32x3": three TF32 tensor-core products, ~fp32 accuracy; "ieee" is
exact FMA arithmetic but slower). bf16/fp16 weights use the native tensor-core dot, and the
activations are rounded to the weight dtype before each dot, like the unfused module.
Grids are 1-D (axis 0 allows 2**31 - 1 programs); batch-row offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---- launch heuristics and constants --------------------------------------------------------
BLOCK_B = 16                  # batch rows per program (tl.dot needs M >= 16)
MAX_WEIGHT_TILE = 8192        # elements of one [HP, BK] weight tile held in registers
NUM_WARPS = 8                 # 255 registers/thread, no spills at H = 256 (fp32, tf32x3; ptxas sm_90a)
NUM_STAGES = 1                # no software pipelining: 3 stages need 229 KB of shared memory at H = 256
FUSED_MAX_DIM = 256           # fused launch when the padded F and H are <= this; else the split path
SPLIT_N = 64                  # split path: output columns per program
SPLIT_K = 64                  # split path: reduction chunk (hidden or 2H)
SPLIT_F = 64                  # split path: feature chunk of the first layer
SPLIT_NUM_WARPS = 4
SPLIT_NUM_STAGES = 2
MAX_GRID_X = 2**31 - 1        # CUDA limit of grid axis 0 (axes 1 and 2: 65,535; unused here)
FP32_DOT_PRECISION = "tf32x3"  # for fp32 weights on the GPU; the interpreter always computes in fp32
# 2*pi split for Cody-Waite reduction: HI has 8 significant bits, so n * HI is exact for
# |n| < 2**16 (|t * freq| < 4e5); MID and LO are the fp32 remainders.
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_MID = tl.constexpr(0.0019353071693331003)
TWO_PI_LO = tl.constexpr(1.0253131677018246e-11)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain ints: Triton's host helpers cost microseconds per call


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def block_sizes(freq_dim: int, hidden_dim: int) -> tuple[int, int, int]:
    """(FP, HP, BK) of the fused kernel: padded feature/hidden widths (powers of two, >= 16) and
    the chunk of the hidden dimension processed per loop step."""
    fp = max(16, _next_pow2(freq_dim))
    hp = max(16, _next_pow2(hidden_dim))
    bk = max(16, min(64, MAX_WEIGHT_TILE // hp, hp))
    return fp, hp, bk


def use_fused(freq_dim: int, hidden_dim: int) -> bool:
    """True when the one-launch kernel fits (shared memory, no register spills)."""
    fp, hp, _ = block_sizes(freq_dim, hidden_dim)
    return fp <= FUSED_MAX_DIM and hp <= FUSED_MAX_DIM


def _checked(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    if not (0 < grid[0] <= MAX_GRID_X and 0 < grid[1] <= 65535 and 0 < grid[2] <= 65535):
        raise ValueError(f"dual_timestep_embedding: launch grid {grid} exceeds the CUDA limits "
                         "(batch too large: split it)")
    return grid


def launch_grids(batch: int, freq_dim: int, hidden_dim: int, split: bool | None = None
                 ) -> list[tuple[int, int, int]]:
    """The grid of every launch for a [batch] embedding: one for the fused path, (branches,
    output) for the split path (``split`` None: chosen by :func:`use_fused`). Raises ValueError
    when a grid would exceed the CUDA limits."""
    if split is None:
        split = not use_fused(freq_dim, hidden_dim)
    rows = _cdiv(batch, BLOCK_B)
    if not split:
        return [_checked((rows, 1, 1))]
    cols = _cdiv(hidden_dim, SPLIT_N)
    return [_checked((2 * rows * cols, 1, 1)), _checked((rows * cols, 1, 1))]


# ---- kernels ---------------------------------------------------------------------------------
@triton.jit
def _sin_cos_reduced(x):
    """sin(x), cos(x) for fp32 x after Cody-Waite reduction to [-pi, pi] (accurate for large
    timesteps whatever the precision of the hardware sin/cos)."""
    n = tl.floor(x * INV_TWO_PI + 0.5)
    r = x - n * TWO_PI_HI
    r = r - n * TWO_PI_MID
    r = r - n * TWO_PI_LO
    return tl.sin(r), tl.cos(r)


@triton.jit
def _features(t, offs_f, freqs_ptr, HALF):
    """[len(t), len(offs_f)] fp32 sinusoidal features of fp32 timesteps t at columns offs_f:
    sin below HALF, cos in [HALF, 2 HALF), 0 beyond (the odd-F pad and masked columns)."""
    is_sin = offs_f < HALF
    in_feat = offs_f < 2 * HALF
    fidx = tl.where(is_sin, offs_f, offs_f - HALF)
    freq = tl.load(freqs_ptr + fidx, mask=in_feat, other=0.0)
    s, c = _sin_cos_reduced(t[:, None] * freq[None, :])
    feat = tl.where(is_sin[None, :], s, c)
    return tl.where(in_feat[None, :], feat, 0.0)


@triton.jit
def _branch(
    t_ptr,       # [B] timesteps of this branch (any int/float dtype), element stride stride_t
    stride_t,    # 0 when one timestep is broadcast to the batch
    freqs_ptr,   # [HALF] fp32 frequencies exp(-ln(10000) * k / HALF)
    w0_ptr,      # [H, F] first Linear weight (row-major, like nn.Linear)
    b0_ptr,      # [H]
    w2_ptr,      # [H, H] second Linear weight
    b2_ptr,      # [H]
    rows, row_mask,
    F: tl.constexpr, HALF: tl.constexpr, H: tl.constexpr,
    FP: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """SiLU(Linear2(SiLU(Linear0(sinusoid(t))))) for BLOCK_B rows: an fp32 [BLOCK_B, HP] tile."""
    offs_f = tl.arange(0, FP)
    offs_h = tl.arange(0, HP)
    t = tl.load(t_ptr + rows * stride_t, mask=row_mask, other=0).to(tl.float32)
    feat = _features(t, offs_f, freqs_ptr, HALF)      # [BLOCK_B, FP] in registers only

    acc = tl.zeros([BLOCK, HP], dtype=tl.float32)
    for k in range(0, H, BK):
        offs_k = k + tl.arange(0, BK)
        k_ok = offs_k < H
        # w0t[f, j] = W0[k + j, f]: [FP, BK]
        w0t = tl.load(w0_ptr + offs_k[None, :] * F + offs_f[:, None],
                      mask=k_ok[None, :] & (offs_f[:, None] < F), other=0.0)
        b0 = tl.load(b0_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        hk = tl.dot(feat.to(w0t.dtype), w0t, input_precision=DOT_PREC) + b0[None, :]
        hk = hk * tl.sigmoid(hk)                       # [BLOCK_B, BK]; padded columns are 0
        # w2t[j, n] = W2[n, k + j]: [BK, HP]
        w2t = tl.load(w2_ptr + offs_h[None, :] * H + offs_k[:, None],
                      mask=k_ok[:, None] & (offs_h[None, :] < H), other=0.0)
        acc += tl.dot(hk.to(w2t.dtype), w2t, input_precision=DOT_PREC)
    b2 = tl.load(b2_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
    y = acc + b2[None, :]
    return y * tl.sigmoid(y)                           # padded columns are SiLU(0) = 0


@triton.jit(do_not_specialize=["stride_t0", "stride_t1", "B"],
            do_not_specialize_on_alignment=["t0_ptr", "t1_ptr"])
def dual_timestep_embedding_fwd_kernel(
    t0_ptr,      # [B] timesteps of branch 0 (int or float), element stride stride_t0
    t1_ptr,      # [B] timesteps of branch 1, element stride stride_t1
    stride_t0, stride_t1,
    freqs_ptr,   # [HALF] fp32 frequency table
    w00_ptr,     # [H, F]  mlp0.0.weight
    b00_ptr,     # [H]     mlp0.0.bias
    w02_ptr,     # [H, H]  mlp0.2.weight
    b02_ptr,     # [H]     mlp0.2.bias
    w10_ptr,     # [H, F]  mlp1.0.weight
    b10_ptr,     # [H]     mlp1.0.bias
    w12_ptr,     # [H, H]  mlp1.2.weight
    b12_ptr,     # [H]     mlp1.2.bias
    wo_ptr,      # [H, 2H] out.weight
    bo_ptr,      # [H]     out.bias
    out_ptr,     # [B, H]  output (weight dtype), contiguous; every element written
    B,
    F: tl.constexpr, HALF: tl.constexpr, H: tl.constexpr,
    FP: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # int64: B * H may pass 2**31
    row_mask = rows < B
    s0 = _branch(t0_ptr, stride_t0, freqs_ptr, w00_ptr, b00_ptr, w02_ptr, b02_ptr, rows, row_mask,
                 F, HALF, H, FP, HP, BLOCK, BK, DOT_PREC)
    s1 = _branch(t1_ptr, stride_t1, freqs_ptr, w10_ptr, b10_ptr, w12_ptr, b12_ptr, rows, row_mask,
                 F, HALF, H, FP, HP, BLOCK, BK, DOT_PREC)
    offs_h = tl.arange(0, HP)
    h_ok = offs_h < H
    for n in range(0, H, BK):
        offs_n = n + tl.arange(0, BK)
        n_ok = offs_n < H
        # woXt[j, i] = Wo[n + i, X*H + j]: [HP, BK]
        wmask = h_ok[:, None] & n_ok[None, :]
        wo0t = tl.load(wo_ptr + offs_n[None, :] * (2 * H) + offs_h[:, None], mask=wmask, other=0.0)
        wo1t = tl.load(wo_ptr + offs_n[None, :] * (2 * H) + H + offs_h[:, None], mask=wmask, other=0.0)
        bo = tl.load(bo_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.dot(s0.to(wo0t.dtype), wo0t, input_precision=DOT_PREC)
        acc += tl.dot(s1.to(wo1t.dtype), wo1t, input_precision=DOT_PREC)
        acc += bo[None, :]
        tl.store(out_ptr + rows[:, None] * H + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_ok[None, :])


@triton.jit
def _branch_tile(
    t_ptr, stride_t,   # [B] timesteps of this branch, element stride (0: broadcast)
    freqs_ptr,         # [HALF] fp32 frequencies
    w0_ptr,            # [H, F] first Linear weight
    b0_ptr,            # [H]
    w2_ptr,            # [H, H] second Linear weight
    b2_ptr,            # [H]
    s_ptr,             # [B, 2H] scratch out (weight dtype): columns col0.. of this branch
    rows, row_mask, offs_n, F, HALF, H,
    BLOCK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """s[rows, offs_n] = SiLU(Linear2(SiLU(Linear0(sinusoid(t))))) for one [BLOCK, BN] tile."""
    n_ok = offs_n < H
    t = tl.load(t_ptr + rows * stride_t, mask=row_mask, other=0).to(tl.float32)
    acc = tl.zeros([BLOCK, BN], dtype=tl.float32)
    for k in range(0, H, BK):
        offs_k = k + tl.arange(0, BK)
        k_ok = offs_k < H
        a = tl.zeros([BLOCK, BK], dtype=tl.float32)
        for f in range(0, F, BF):
            offs_f = f + tl.arange(0, BF)
            feat = _features(t, offs_f, freqs_ptr, HALF)                  # [BLOCK, BF]
            # w0t[i, j] = W0[k + j, f + i]: [BF, BK]
            w0t = tl.load(w0_ptr + offs_k[None, :].to(tl.int64) * F + offs_f[:, None],
                          mask=k_ok[None, :] & (offs_f[:, None] < F), other=0.0)
            a += tl.dot(feat.to(w0t.dtype), w0t, input_precision=DOT_PREC)
        a += tl.load(b0_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        h = a * tl.sigmoid(a)                                               # padded columns: 0
        # w2t[j, n] = W2[offs_n[n], k + j]: [BK, BN]
        w2t = tl.load(w2_ptr + offs_n[None, :].to(tl.int64) * H + offs_k[:, None],
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(h.to(w2t.dtype), w2t, input_precision=DOT_PREC)
    y = acc + tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y * tl.sigmoid(y)
    tl.store(s_ptr + rows[:, None] * (2 * H) + offs_n[None, :], y.to(s_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["stride_t0", "stride_t1", "B"],
            do_not_specialize_on_alignment=["t0_ptr", "t1_ptr"])
def _branches_kernel(
    t0_ptr, t1_ptr,    # [B] timesteps of branch 0 / 1 (int or float), element strides below
    stride_t0, stride_t1,
    freqs_ptr,         # [HALF] fp32 frequency table
    w00_ptr, b00_ptr, w02_ptr, b02_ptr,  # branch 0: [H, F], [H], [H, H], [H]
    w10_ptr, b10_ptr, w12_ptr, b12_ptr,  # branch 1: the same shapes
    s_ptr,             # [B, 2H] scratch out (weight dtype): SiLU(mlp0) | SiLU(mlp1)
    B, F, HALF, H,
    BLOCK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # program -> (branch, column tile, row block); the row block varies fastest, so programs
    # that read the same weight columns run together (L2 reuse)
    pid = tl.program_id(0)
    n_rows = tl.cdiv(B, BLOCK)
    n_cols = tl.cdiv(H, BN)
    rb = pid % n_rows
    rest = pid // n_rows
    cb = rest % n_cols
    br = rest // n_cols
    rows = rb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < B
    offs_n = cb * BN + tl.arange(0, BN)
    if br == 0:
        _branch_tile(t0_ptr, stride_t0, freqs_ptr, w00_ptr, b00_ptr, w02_ptr, b02_ptr, s_ptr,
                     rows, row_mask, offs_n, F, HALF, H, BLOCK, BN, BK, BF, DOT_PREC)
    else:
        _branch_tile(t1_ptr, stride_t1, freqs_ptr, w10_ptr, b10_ptr, w12_ptr, b12_ptr, s_ptr + H,
                     rows, row_mask, offs_n, F, HALF, H, BLOCK, BN, BK, BF, DOT_PREC)


@triton.jit(do_not_specialize=["B"])
def _out_kernel(
    s_ptr,             # [B, 2H] scratch from _branches_kernel (weight dtype)
    wo_ptr,            # [H, 2H] out.weight
    bo_ptr,            # [H]     out.bias
    out_ptr,           # [B, H]  output (weight dtype), contiguous; every element written
    B, H,
    BLOCK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    n_rows = tl.cdiv(B, BLOCK)
    rows = (pid % n_rows).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < B
    offs_n = (pid // n_rows) * BN + tl.arange(0, BN)
    n_ok = offs_n < H
    acc = tl.zeros([BLOCK, BN], dtype=tl.float32)
    for k in range(0, 2 * H, BK):
        offs_k = k + tl.arange(0, BK)
        k_ok = offs_k < 2 * H
        a = tl.load(s_ptr + rows[:, None] * (2 * H) + offs_k[None, :],
                    mask=row_mask[:, None] & k_ok[None, :], other=0.0)
        # wot[j, n] = Wo[offs_n[n], k + j]: [BK, BN]
        wot = tl.load(wo_ptr + offs_n[None, :].to(tl.int64) * (2 * H) + offs_k[:, None],
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, wot, input_precision=DOT_PREC)
    acc += tl.load(bo_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * H + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_ok[None, :])


# ---- host launchers --------------------------------------------------------------------------
def _dot_precision(weight: torch.Tensor):
    """input_precision of tl.dot: only meaningful for fp32 operands (None: Triton's default)."""
    if weight.dtype != torch.float32:
        return None
    return FP32_DOT_PRECISION if weight.is_cuda else "ieee"


def _launch_args(t0, t1, freqs, weights, out):
    """Arguments and grid of the fused kernel."""
    B = out.shape[0]
    H = out.shape[1]
    F = weights[0].shape[1]
    fp, hp, bk = block_sizes(F, H)
    args = (t0, t1, t0.stride(0), t1.stride(0), freqs, *weights, out, B,
            F, F // 2, H, fp, hp, BLOCK_B, bk, _dot_precision(weights[0]))
    return args, launch_grids(B, F, H, split=False)[0]


def dual_timestep_embedding_fwd(t0, t1, freqs, weights, out, split: bool | None = None):
    """Launch through the Triton JIT (any device, the interpreter included). ``weights`` =
    (w00, b00, w02, b02, w10, b10, w12, b12, wo, bo), contiguous, one dtype; ``out`` [B, H].
    ``split``: None chooses by size (:func:`use_fused`); True/False force a path (tests).
    Returns the CompiledKernel of the fused path on a GPU, else None."""
    B, H = out.shape
    F = weights[0].shape[1]
    if split is None:
        split = not use_fused(F, H)
    if not split:
        args, grid = _launch_args(t0, t1, freqs, weights, out)
        return dual_timestep_embedding_fwd_kernel[grid](*args, num_warps=NUM_WARPS,
                                                        num_stages=NUM_STAGES)
    grid_branches, grid_out = launch_grids(B, F, H, split=True)
    prec = _dot_precision(weights[0])
    scratch = torch.empty((B, 2 * H), dtype=out.dtype, device=out.device)
    _branches_kernel[grid_branches](
        t0, t1, t0.stride(0), t1.stride(0), freqs, *weights[:8], scratch, B, F, F // 2, H,
        BLOCK=BLOCK_B, BN=SPLIT_N, BK=SPLIT_K, BF=SPLIT_F, DOT_PREC=prec,
        num_warps=SPLIT_NUM_WARPS, num_stages=SPLIT_NUM_STAGES)
    _out_kernel[grid_out](scratch, weights[8], weights[9], out, B, H, BLOCK=BLOCK_B, BN=SPLIT_N,
                          BK=SPLIT_K, DOT_PREC=prec, num_warps=SPLIT_NUM_WARPS,
                          num_stages=SPLIT_NUM_STAGES)
    return None


# The cached launch calls CompiledKernel.run with the argument list of Triton >= 3.4 (launch hooks
# in triton.knobs.runtime). On an older Triton, or a compiled kernel without these members, it
# launches through the JIT every time (correct, a few µs slower per call).
_COMPILED_MEMBERS = ("run", "function", "packed_metadata", "launch_metadata")


def cached_launch_supported(compiled=None) -> bool:
    """True when this Triton (and ``compiled``, a CompiledKernel, if given) has the internals the
    cached launch uses: ``triton.knobs.runtime`` launch hooks (Triton >= 3.4) and the compiled
    kernel's run/function/packed_metadata/launch_metadata."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "launch_enter_hook"):
        return False
    return compiled is None or all(hasattr(compiled, m) for m in _COMPILED_MEMBERS)


class CachedLauncher:
    """Lean GPU launch: after the first JIT launch, later calls go straight to the compiled
    kernel's launcher, skipping the JIT's argument binding and cache lookup (several µs of host
    time per call). Valid because the kernel does not specialize on B, the t strides or the t
    pointers' alignment; the key holds everything else the compiled code depends on. The split
    path (two launches) always goes through the JIT: its launch cost is small next to its work.

    Falls back to the JIT launch for good (``self.enabled = False``, reason in ``self.why``) on
    a Triton without the internals it needs (:func:`cached_launch_supported`) or when the first
    cached launch is refused with a TypeError/AttributeError (a changed internal signature:
    raised before anything is launched)."""

    def __init__(self) -> None:
        self._cache: dict = {}
        self.enabled = cached_launch_supported()
        self.why = "" if self.enabled else (
            f"Triton {triton.__version__} has no triton.knobs.runtime launch hooks (needs >= 3.4)")

    def __call__(self, key, stream: int, t0, t1, freqs, weights, out) -> None:
        compiled = self._cache.get(key) if self.enabled else None
        if compiled is None:  # first call, the split path (never cached), or the fallback
            compiled = dual_timestep_embedding_fwd(t0, t1, freqs, weights, out)
            compiled = getattr(compiled, "result", lambda: compiled)()  # an async-compile future
            if self.enabled and compiled is not None:
                if cached_launch_supported(compiled):
                    self._cache[key] = compiled
                else:
                    self._disable(f"Triton {triton.__version__}'s CompiledKernel lacks "
                                  f"{', '.join(m for m in _COMPILED_MEMBERS if not hasattr(compiled, m))}")
            return
        args, grid = _launch_args(t0, t1, freqs, weights, out)
        hooks = triton.knobs.runtime
        try:
            compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(grid, stream, *args),
                         hooks.launch_enter_hook, hooks.launch_exit_hook, *args)
        except (TypeError, AttributeError) as exc:  # refused before launching: use the JIT
            self._disable(f"cached launch refused by Triton {triton.__version__}: {exc}")
            dual_timestep_embedding_fwd(t0, t1, freqs, weights, out)

    def _disable(self, why: str) -> None:
        self.enabled, self.why = False, why
        self._cache.clear()
