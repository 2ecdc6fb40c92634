"""The Triton kernels of weighted_dice_loss and DualTimestepEmbedding compile for sm_90 without a
GPU, within the H100/H200 limits (vae_loss has its own such test in test_vae_loss.py).

The interpreter (how the Triton kernels are tested on the CPU) accepts code the compiler rejects
-- a value whose shape differs between branches, a dtype mismatch in ``tl.dot``, a constexpr
used as a runtime value -- so every kernel is also compiled through the real pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin via ptxas) for the H100's architecture, for the constexpr
combinations the launchers use, in a fresh process without TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import require

require("triton")  # a skip without triton; a failure under CI=true

# ---- weighted_dice_loss: every launch configuration within the H100/H200 limits ----------------
_DICE_SCRIPT = r"""
import itertools, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dualdiff.kernels.weighted_dice as D

SMEM_LIMIT = 232448  # bytes per block on H100 / H200 (opt-in maximum)
target = GPUTarget("cuda", 90, 32)
full = sys.argv[1] == "full"
INTS = ("GROUPS", "TILES", "ROWS", "S", "CP", "NCHUNK", "CHUNK", "C", "C0")


def int32_offsets(ttir):
    # pointer offsets that are computed in int32 (constants and kernel arguments are fine: an
    # argument that does not fit int32 arrives as i64): none may exist, so no offset overflows
    names = set(re.findall(r"(%[\w.]+) = arith.constant", ttir)) | set(re.findall(r"(%\w+): i32", ttir))
    bad = []
    for line in ttir.splitlines():
        m = re.search(r"tt.addptr %[\w.]+, (%[\w.]+) : [^,]+, (tensor<[\dx]*)?i32", line)
        if m and m.group(1) not in names:
            bad.append(line.strip())
    return bad


def compile_one(fn, sig, consts, n_ptrs, ints="i32"):
    sig = {k: (ints if k in INTS else v) for k, v in sig.items()}
    hints = {(i,): [["tt.divisibility", 16]] for i in range(n_ptrs)}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=hints), target=target,
                       options={"num_warps": 4})
    assert ".entry" in k.asm["ptx"] and k.asm.get("cubin"), (fn, consts)
    assert k.metadata.shared <= SMEM_LIMIT, (fn, consts, k.metadata.shared)
    bad = int32_offsets(k.asm["ttir"])
    assert not bad, (fn, consts, bad[:3])
    print(fn.__name__, sig.get("x_ptr"), sig.get("g_ptr"), consts, k.metadata.shared, flush=True)


def fwd(xt, gt, act, squared, c_pad, ints="i32"):
    sig = {"x_ptr": "*" + xt, "g_ptr": "*" + gt, "part_ptr": "*fp32", "GROUPS": "i32", "S": "i32", "CP": "i32",
           "NCHUNK": "i32", "CHUNK": "i32", "ACT": "constexpr", "SQUARED": "constexpr", "C_PAD": "constexpr",
           "BLOCK": "constexpr"}
    consts = {"ACT": act, "SQUARED": squared, "C_PAD": c_pad, "BLOCK": max(16, D.TILE // c_pad)}
    compile_one(D._dice_fwd_partial_kernel, sig, consts, 3, ints)


def bwd(xt, gt, act, squared, weight, red, c_pad, ints="i32"):
    sig = {"x_ptr": "*" + xt, "g_ptr": "*" + gt, "w_ptr": "*fp32", "sums_ptr": "*fp32", "go_ptr": "*fp32",
           "dx_ptr": "*" + xt, "GROUPS": "i32", "TILES": "i32", "ROWS": "i32", "S": "i32", "CP": "i32", "C": "i32",
           "C0": "i32", "smooth_nr": "fp32", "smooth_dr": "fp32", "scale": "fp32", "ACT": "constexpr",
           "SQUARED": "constexpr", "WEIGHT": "constexpr", "REDUCTION": "constexpr", "C_PAD": "constexpr",
           "BLOCK": "constexpr"}
    consts = {"ACT": act, "SQUARED": squared, "WEIGHT": weight, "REDUCTION": red, "C_PAD": c_pad,
              "BLOCK": max(16, D.TILE // c_pad)}
    compile_one(D._dice_bwd_kernel, sig, consts, 6, ints)


def finalize(weight, red, ints="i32"):
    sig = {"part_ptr": "*fp32", "w_ptr": "*fp32", "sums_ptr": "*fp32", "loss_ptr": "*fp32", "ROWS": "i32",
           "C": "i32", "C0": "i32", "NCHUNK": "i32", "smooth_nr": "fp32", "smooth_dr": "fp32", "scale": "fp32",
           "WEIGHT": "constexpr", "REDUCTION": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"WEIGHT": weight, "REDUCTION": red, "BLOCK_R": D.FINAL_ROWS, "BLOCK_K": D.FINAL_CHUNKS}
    compile_one(D._dice_fwd_finalize_kernel, sig, consts, 4, ints)


ACTS = [D.ACT_SIGMOID, D.ACT_SOFTMAX, D.ACT_NONE]
WEIGHTS = [0, 1, 2]  # none, [B], [B, C]
REDS = [D.RED_NONE, D.RED_MEAN, D.RED_SUM]
X_TYPES, G_TYPES = ["fp32", "bf16", "fp16"], ["fp32", "u8", "fp16", "bf16"]
# C_PAD the launcher produces: 1 (sigmoid, none) and every power of two up to MAX_SOFTMAX_C (softmax)
SOFTMAX_PADS = [2 ** i for i in range(1, D.MAX_SOFTMAX_C.bit_length())]
assert SOFTMAX_PADS[-1] == D.MAX_SOFTMAX_C
n = 0
# 1. every flag combination (activation, squared, weight mode, reduction), fp32, C_PAD 1 / 4
for act, squared in itertools.product(ACTS, [False, True]):
    c_pad = 4 if act == D.ACT_SOFTMAX else 1
    fwd("fp32", "fp32", act, squared, c_pad)
    n += 1
    for weight, red in itertools.product(WEIGHTS, REDS):
        bwd("fp32", "fp32", act, squared, weight, red, c_pad)
        n += 1
for weight, red in itertools.product(WEIGHTS, REDS):
    finalize(weight, red)
    n += 1
# 2. every tile shape and logits dtype (target dtypes in turn; full: every pair), with [B, C] weights
pads = [(a, 1) for a in (D.ACT_SIGMOID, D.ACT_NONE)] + [(D.ACT_SOFTMAX, p) for p in SOFTMAX_PADS]
if not full:
    pads = pads[:2] + [(D.ACT_SOFTMAX, p) for p in (2, 8, 32, D.MAX_SOFTMAX_C)]
i = 0
for (act, c_pad), xt in itertools.product(pads, X_TYPES):
    for gt in (G_TYPES if full else [G_TYPES[i % len(G_TYPES)]]):
        fwd(xt, gt, act, True, c_pad)
        bwd(xt, gt, act, True, 2, D.RED_NONE, c_pad)
        n += 2
    i += 1
# 3. sizes past int32 (S or B*C >= 2^31): Triton passes those arguments as i64
fwd("bf16", "u8", D.ACT_SOFTMAX, False, 4, ints="i64")
bwd("bf16", "u8", D.ACT_SOFTMAX, False, 2, D.RED_MEAN, 4, ints="i64")
bwd("fp32", "fp32", D.ACT_SIGMOID, False, 1, D.RED_NONE, 1, ints="i64")
finalize(2, D.RED_NONE, ints="i64")
n += 4
print("compiled", n)
"""


def _compile_dice_configs(tmp_path, mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # cwd outside the checkout, so the installed package (with dualdiff.kernels) is imported
    proc = subprocess.run([sys.executable, "-c", _DICE_SCRIPT, mode], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_dice_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """Every flag combination (activation x squared x weight none/[B]/[B, C] x reduction), the
    three logits dtypes, the tile shapes of sigmoid and of softmax over 2, 8, 32 and 256 channels,
    and i64 sizes compile for sm_90 with at most 232,448 B of shared memory and no pointer offset
    computed in int32."""
    out = _compile_dice_configs(tmp_path, "quick")
    # 1: 6 forward + 54 backward + 9 finalize; 2: (2 + 4 tiles) x 3 dtypes x 2 kernels; 3: 4
    assert "compiled 109" in out, out


@pytest.mark.slow
def test_dice_every_launch_configuration_fits_sm90(tmp_path):
    """As above over every softmax tile (C_PAD 2..256) and every logits x target dtype pair."""
    out = _compile_dice_configs(tmp_path, "full")
    assert "compiled 313" in out, out


# ---- DualTimestepEmbedding: every launch configuration within the H100/H200 shared memory --------
_TE_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dualdiff.kernels.timestep_embedding as T

SMEM_LIMIT = 232448  # bytes per block on H100 / H200 (opt-in maximum)
target = GPUTarget("cuda", 90, 32)
full = sys.argv[1] == "full"
HIDDEN = [64, 96, 128, 256, 320, 512, 1000, 1024, 2048, 4096]
FREQ = [16, 33, 64, 256, 320]  # LIFT tiny / default (16, 64), odd, the fused maximum, past it
WEIGHTS = ["w00_ptr", "b00_ptr", "w02_ptr", "b02_ptr", "w10_ptr", "b10_ptr", "w12_ptr", "b12_ptr"]


def configs(f, h, wt):
    # the launcher's choice for (freq_dim, hidden_dim): the fused kernel's tiles depend only on
    # the padded widths and BK (F and H enter masks and loop bounds), the split kernels' not at all
    if T.use_fused(f, h):
        fp, hp, bk = T.block_sizes(f, h)
        return [("fused", wt, fp, hp, bk)]
    return [("branches", wt), ("out", wt)]


def compile_config(cfg):
    kind, wt = cfg[0], cfg[1]
    prec = T.FP32_DOT_PRECISION if wt == "fp32" else None
    if kind == "fused":
        _, _, fp, hp, bk = cfg
        sig = {"t0_ptr": "*i64", "t1_ptr": "*i64", "stride_t0": "i32", "stride_t1": "i32",
               "freqs_ptr": "*fp32", **{w: "*" + wt for w in WEIGHTS + ["wo_ptr", "bo_ptr"]},
               "out_ptr": "*" + wt, "B": "i32",
               **{k: "constexpr" for k in ("F", "HALF", "H", "FP", "HP", "BLOCK", "BK", "DOT_PREC")}}
        consts = {"F": fp, "HALF": fp // 2, "H": hp, "FP": fp, "HP": hp, "BLOCK": T.BLOCK_B, "BK": bk,
                  "DOT_PREC": prec}
        fn, hint_args = T.dual_timestep_embedding_fwd_kernel, [4] + list(range(5, 16))
        options = {"num_warps": T.NUM_WARPS, "num_stages": T.NUM_STAGES}
    elif kind == "branches":
        sig = {"t0_ptr": "*i64", "t1_ptr": "*i64", "stride_t0": "i32", "stride_t1": "i32",
               "freqs_ptr": "*fp32", **{w: "*" + wt for w in WEIGHTS}, "s_ptr": "*" + wt, "B": "i32",
               "F": "i32", "HALF": "i32", "H": "i32",
               **{k: "constexpr" for k in ("BLOCK", "BN", "BK", "BF", "DOT_PREC")}}
        consts = {"BLOCK": T.BLOCK_B, "BN": T.SPLIT_N, "BK": T.SPLIT_K, "BF": T.SPLIT_F, "DOT_PREC": prec}
        fn, hint_args = T._branches_kernel, [4] + list(range(5, 14)) + [15, 17]
        options = {"num_warps": T.SPLIT_NUM_WARPS, "num_stages": T.SPLIT_NUM_STAGES}
    else:
        sig = {"s_ptr": "*" + wt, "wo_ptr": "*" + wt, "bo_ptr": "*" + wt, "out_ptr": "*" + wt,
               "B": "i32", "H": "i32", **{k: "constexpr" for k in ("BLOCK", "BN", "BK", "DOT_PREC")}}
        consts = {"BLOCK": T.BLOCK_B, "BN": T.SPLIT_N, "BK": T.SPLIT_K, "DOT_PREC": prec}
        fn, hint_args = T._out_kernel, list(range(6))
        options = {"num_warps": T.SPLIT_NUM_WARPS, "num_stages": T.SPLIT_NUM_STAGES}
    hints = {(i,): [["tt.divisibility", 16]] for i in hint_args}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=hints), target=target,
                       options=options)
    ptx = k.asm["ptx"]
    assert ".entry" in ptx and k.asm.get("cubin"), cfg
    if wt != "fp32":  # 16-bit weights go through the tensor cores
        assert "mma" in ptx, cfg
    return k.metadata.shared


wanted = sorted({c for f, h, wt in itertools.product(FREQ, HIDDEN, ["fp32", "bf16", "fp16"])
                 for c in configs(f, h, wt)}, key=str)
if not full:  # the split kernels and the fused kernel at the target shape (freq 64, hidden 256)
    wanted = [c for c in wanted if c[0] != "fused" or c[2:4] == (64, 256)]
over = []
for cfg in wanted:
    shared = compile_config(cfg)
    print(cfg, shared, flush=True)
    if shared > SMEM_LIMIT:
        over.append((cfg, shared))
assert not over, over
print("compiled", len(wanted))
"""


def _compile_embedding_configs(tmp_path, mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", _TE_SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=900 if mode == "quick" else 2400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def test_timestep_embedding_kernels_fit_sm90_shared_memory(tmp_path):
    """The split kernels (fp32/bf16/fp16) and the fused kernel at the target shape compile for
    sm_90 with at most 232,448 B of shared memory (the old fused-only launcher needed ~320 KiB at
    hidden 1024 fp32 and raised OutOfResources at its first launch)."""
    out = _compile_embedding_configs(tmp_path, "quick")
    assert "compiled 9" in out, out  # 2 split kernels x 3 dtypes + fused (64, 256) x 3


@pytest.mark.slow
def test_timestep_embedding_every_user_shape_fits_sm90_shared_memory(tmp_path):
    """Every launch configuration the launcher picks for hidden 64..4096 (powers of two and odd
    sizes), the freq dims in use (16..320, odd 33) and fp32/bf16/fp16 weights: 27 fused tile
    shapes (padded F 16/64/256 x padded H 64/128/256 x 3 dtypes) + 2 split kernels x 3."""
    out = _compile_embedding_configs(tmp_path, "full")
    assert "compiled 33" in out, out
