"""benchmarks/sanitize_kernels.py (the compute-sanitizer driver of run_gpu.sh) on the CPU: it covers
every op's code paths on both GPU backends, its cases pass on the cpp backend (and the Triton
interpreter for an fp32 case), and its value check catches a wrong result."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sk():
    spec = importlib.util.spec_from_file_location("sanitize_kernels", ROOT / "benchmarks" / "sanitize_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sanitize_kernels"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("sanitize_kernels", None)


def test_cases_cover_every_kernel_path_on_both_gpu_backends(sk):
    names = [c.name for c in sk.all_cases(["cuda", "triton"])]
    for be in ("cuda", "triton"):
        mine = [n for n in names if f"[{be}]" in n]
        for dt in ("fp32", "fp16", "bf16"):
            assert any(n.startswith(f"weighted_dice[{be}]") and dt in n for n in mine)
            assert any(n.startswith(f"timestep_embedding[{be}]") and dt in n for n in mine)
            for lt in ("fp32", "fp16", "bf16"):  # every image x latent dtype pair, both losses
                for recon in ("bce", "mse"):
                    assert f"vae_loss[{be}] {recon} image {dt} latent {lt} aligned" in mine
        for C in (3, 8, 20):  # the channel buckets of the CUDA kernels
            assert any(f"softmax C={C}" in n for n in mine)
        for path in ("unaligned", "grid-stride", "KL only", "bool-target", "uint8-target",
                     "cached second launch", "B=1"):
            assert any(path in n for n in mine), (be, path)
        assert sum("grid-stride" in n for n in mine) == 2  # dice backward groups, vae forward
    assert any("split path" in n for n in names if "[triton]" in n)
    assert any("global-scratch path" in n for n in names if "[cuda]" in n)


def test_the_scratch_case_really_exceeds_shared_memory(sk):
    from dualdiff.ops.timestep_embedding import cuda_workspace_bytes

    case = next(c for c in sk.temb_cases("cuda") if "global-scratch" in c.path)
    H = int(case.path.split("H=")[1].split()[0])
    assert cuda_workspace_bytes(256, H) > sk.SMEM_OPTIN >= cuda_workspace_bytes(256, H - 64)


def test_every_case_passes_on_the_cpp_backend(sk, capsys):
    assert sk.main(["--device", "cpu", "--backends", "cpp"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "FAIL" not in out


def test_a_triton_case_passes_under_the_interpreter(sk, capsys):
    if torch.cuda.is_available():
        pytest.skip("the Triton interpreter is only used without a GPU")
    assert sk.main(["--device", "cpu", "--backends", "triton", "--only", "fused F=33"]) == 0
    assert "1 cases, 0 failed" in capsys.readouterr().out


def test_a_wrong_result_is_a_failed_case(sk, monkeypatch, capsys):
    real = sk.vae_loss
    monkeypatch.setattr(sk, "vae_loss", lambda *a, **k: tuple(1.01 * t for t in real(*a, **k)))
    assert sk.main(["--device", "cpu", "--backends", "cpp", "--only", "bce image fp32 latent fp32"]) == 1
    assert "FAIL  vae_loss[cpp] bce image fp32 latent fp32 aligned" in capsys.readouterr().out


def test_list_launches_nothing(sk, capsys, monkeypatch):
    monkeypatch.setattr(sk, "weighted_dice_loss", None)  # would raise if a case ran
    assert sk.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{len(out) - 1} cases"
