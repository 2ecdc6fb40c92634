"""Triton kernel of the fused dual timestep embedding (forward only).

One launch computes, for a block of BLOCK_B batch rows, everything between the timesteps and
the output: the sinusoidal features of t0 and t1 (in registers, never written to memory),
both branch MLPs ``Linear(F, H) -> SiLU -> Linear(H, H)``, SiLU of the concatenation and the
output ``Linear(2H, H)``. The grid is ``cdiv(B, BLOCK_B)`` programs; each streams every weight
once (from L2 after the first program). The backward is computed in PyTorch by
``dualdiff.ops.timestep_embedding``.

Matmuls use ``tl.dot`` with fp32 accumulation. For fp32 weights the dot precision is
``FP32_DOT_PRECISION`` ("tf32x3": three TF32 tensor-core products, ~fp32 accuracy; "ieee" is
exact FMA arithmetic but slower). bf16/fp16 weights use the native tensor-core dot, and the
activations are rounded to the weight dtype before each dot, like the unfused module.
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
FP32_DOT_PRECISION = "tf32x3"  # for fp32 weights on the GPU; the interpreter always computes in fp32
# 2*pi split for Cody-Waite reduction: HI has 8 significant bits, so n * HI is exact for
# |n| < 2**16 (|t * freq| < 4e5); MID and LO are the fp32 remainders.
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_MID = tl.constexpr(0.0019353071693331003)
TWO_PI_LO = tl.constexpr(1.0253131677018246e-11)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


def block_sizes(freq_dim: int, hidden_dim: int) -> tuple[int, int, int]:
    """(FP, HP, BK): padded feature/hidden widths (powers of two, >= 16) and the chunk of the
    hidden dimension processed per loop step. Beyond hidden_dim 256 the kernel is correct but
    spills registers (the target is 256)."""
    fp = max(16, triton.next_power_of_2(freq_dim))
    hp = max(16, triton.next_power_of_2(hidden_dim))
    bk = max(16, min(64, MAX_WEIGHT_TILE // hp, hp))
    return fp, hp, bk


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
    is_sin = offs_f < HALF
    in_feat = offs_f < 2 * HALF                       # odd F: the last column is a zero pad
    fidx = tl.where(is_sin, offs_f, offs_f - HALF)
    freq = tl.load(freqs_ptr + fidx, mask=in_feat, other=0.0)
    s, c = _sin_cos_reduced(t[:, None] * freq[None, :])
    feat = tl.where(is_sin[None, :], s, c)
    feat = tl.where(in_feat[None, :], feat, 0.0)      # [BLOCK_B, FP] in registers only

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
    rows = pid * BLOCK + tl.arange(0, BLOCK)
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


# ---- host launchers --------------------------------------------------------------------------
def _dot_precision(weight: torch.Tensor):
    """input_precision of tl.dot: only meaningful for fp32 operands (None: Triton's default)."""
    if weight.dtype != torch.float32:
        return None
    return FP32_DOT_PRECISION if weight.is_cuda else "ieee"


def _launch_args(t0, t1, freqs, weights, out):
    B = out.shape[0]
    H = out.shape[1]
    F = weights[0].shape[1]
    fp, hp, bk = block_sizes(F, H)
    args = (t0, t1, t0.stride(0), t1.stride(0), freqs, *weights, out, B,
            F, F // 2, H, fp, hp, BLOCK_B, bk, _dot_precision(weights[0]))
    return args, (triton.cdiv(B, BLOCK_B), 1, 1)


def dual_timestep_embedding_fwd(t0, t1, freqs, weights, out):
    """Launch through the Triton JIT (any device, the interpreter included). ``weights`` =
    (w00, b00, w02, b02, w10, b10, w12, b12, wo, bo), contiguous, one dtype; ``out`` [B, H].
    Returns the CompiledKernel on a GPU (None under the interpreter)."""
    args, grid = _launch_args(t0, t1, freqs, weights, out)
    return dual_timestep_embedding_fwd_kernel[grid](*args, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


class CachedLauncher:
    """Lean GPU launch: after the first JIT launch, later calls go straight to the compiled
    kernel's launcher, skipping the JIT's argument binding and cache lookup (several µs of host
    time per call). Valid because the kernel does not specialize on B, the t strides or the t
    pointers' alignment; the key holds everything else the compiled code depends on."""

    def __init__(self) -> None:
        self._cache: dict = {}

    def __call__(self, key, stream: int, t0, t1, freqs, weights, out) -> None:
        compiled = self._cache.get(key)
        if compiled is None:
            self._cache[key] = dual_timestep_embedding_fwd(t0, t1, freqs, weights, out)
            return
        args, grid = _launch_args(t0, t1, freqs, weights, out)
        hooks = triton.knobs.runtime
        compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *args),
                     hooks.launch_enter_hook, hooks.launch_exit_hook, *args)
