"""The Triton kernels of weighted_dice_loss and DualTimestepEmbedding compile for sm_90 without a
GPU (vae_loss has its own such test in test_vae_loss.py).

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

pytest.importorskip("triton")

_SCRIPT = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dualdiff.kernels.weighted_dice as D
import dualdiff.kernels.timestep_embedding as T

target = GPUTarget("cuda", 90, 32)


def compile_one(fn, sig, consts, n_args, options):
    hints = {(i,): [["tt.divisibility", 16]] for i in range(n_args)}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=hints),
                       target=target, options=options)
    assert ".entry" in k.asm["ptx"] and k.asm.get("cubin"), fn
    return k


n = 0
# ---- weighted_dice_loss: forward partial sums, finalize, backward
for (xt, gt), act, squared in itertools.product([("fp32", "fp32"), ("bf16", "u8"), ("fp16", "fp16")],
                                                [D.ACT_SIGMOID, D.ACT_SOFTMAX, D.ACT_NONE], [False, True]):
    for c in ((4,) if act != D.ACT_SOFTMAX else (3, 4)):  # softmax: C_PAD from the channel count
        c_pad = triton.next_power_of_2(c if act == D.ACT_SOFTMAX else 1)
        block = max(16, D.TILE // c_pad)
        sig = {"x_ptr": "*" + xt, "g_ptr": "*" + gt, "part_ptr": "*fp32", "S": "i32", "CP": "i32",
               "NCHUNK": "i32", "CHUNK": "i32", "ACT": "constexpr", "SQUARED": "constexpr",
               "C_PAD": "constexpr", "BLOCK": "constexpr"}
        compile_one(D._dice_fwd_partial_kernel, sig,
                    {"ACT": act, "SQUARED": squared, "C_PAD": c_pad, "BLOCK": block}, 3, {"num_warps": 4})
        for has_w, red in itertools.product([False, True], [D.RED_NONE, D.RED_MEAN, D.RED_SUM]):
            sig = {"x_ptr": "*" + xt, "g_ptr": "*" + gt, "w_ptr": "*fp32", "sums_ptr": "*fp32",
                   "go_ptr": "*fp32", "dx_ptr": "*" + xt, "S": "i32", "CP": "i32", "C": "i32", "C0": "i32",
                   "smooth_nr": "fp32", "smooth_dr": "fp32", "scale": "fp32", "ACT": "constexpr",
                   "SQUARED": "constexpr", "HAS_WEIGHT": "constexpr", "REDUCTION": "constexpr",
                   "C_PAD": "constexpr", "BLOCK": "constexpr"}
            compile_one(D._dice_bwd_kernel, sig,
                        {"ACT": act, "SQUARED": squared, "HAS_WEIGHT": has_w, "REDUCTION": red,
                         "C_PAD": c_pad, "BLOCK": block}, 6, {"num_warps": 4})
            n += 1
        n += 1
for has_w, red in itertools.product([False, True], [D.RED_NONE, D.RED_MEAN, D.RED_SUM]):
    sig = {"part_ptr": "*fp32", "w_ptr": "*fp32", "sums_ptr": "*fp32", "loss_ptr": "*fp32", "ROWS": "i32",
           "C": "i32", "C0": "i32", "NCHUNK": "i32", "smooth_nr": "fp32", "smooth_dr": "fp32",
           "scale": "fp32", "HAS_WEIGHT": "constexpr", "REDUCTION": "constexpr", "BLOCK_R": "constexpr",
           "BLOCK_K": "constexpr"}
    compile_one(D._dice_fwd_finalize_kernel, sig,
                {"HAS_WEIGHT": has_w, "REDUCTION": red, "BLOCK_R": D.FINAL_ROWS, "BLOCK_K": D.FINAL_CHUNKS},
                4, {"num_warps": 4})
    n += 1

# ---- DualTimestepEmbedding forward: the benchmark shape (F 64, H 256) and an odd one
for (f, h), wt, tt in itertools.product([(64, 256), (20, 48)], ["fp32", "bf16", "fp16"], ["i64", "fp32"]):
    fp, hp, bk = T.block_sizes(f, h)
    weights = ["w00_ptr", "b00_ptr", "w02_ptr", "b02_ptr", "w10_ptr", "b10_ptr", "w12_ptr", "b12_ptr",
               "wo_ptr", "bo_ptr"]
    sig = {"t0_ptr": "*" + tt, "t1_ptr": "*" + tt, "stride_t0": "i32", "stride_t1": "i32",
           "freqs_ptr": "*fp32", **{w: "*" + wt for w in weights}, "out_ptr": "*" + wt, "B": "i32",
           **{k: "constexpr" for k in ("F", "HALF", "H", "FP", "HP", "BLOCK", "BK", "DOT_PREC")}}
    consts = {"F": f, "HALF": f // 2, "H": h, "FP": fp, "HP": hp, "BLOCK": T.BLOCK_B, "BK": bk,
              "DOT_PREC": T.FP32_DOT_PRECISION if wt == "fp32" else None}
    hints = {(i,): [["tt.divisibility", 16]] for i in [4] + list(range(5, 16))}  # not the t pointers
    k = triton.compile(ASTSource(fn=T.dual_timestep_embedding_fwd_kernel, signature=sig, constexprs=consts,
                                 attrs=hints),
                       target=target, options={"num_warps": T.NUM_WARPS, "num_stages": T.NUM_STAGES})
    assert ".entry" in k.asm["ptx"] and k.asm.get("cubin")
    if wt != "fp32":  # 16-bit weights go through the tensor cores
        assert "mma" in k.asm["ptx"] or "wgmma" in k.asm["ptx"], (f, h, wt)
    n += 1
print("compiled", n)
"""


def test_dice_and_timestep_embedding_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # cwd outside the checkout, so the installed package (with dualdiff.kernels) is imported
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # dice: 3 dtype pairs x (sigmoid, none: 1 channel count; softmax: 2) x 2 = 24 forward variants,
    # each with 6 backward variants, + 6 finalize; timestep embedding: 2 shapes x 3 x 2 = 12
    assert "compiled 186" in proc.stdout, proc.stdout
