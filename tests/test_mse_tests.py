"""The seed's MSE tests: definitions checked on models with known outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.diffusion import make_schedule
from dualdiff.metrics.mse_tests import format_mse_table, run_mse_tests, save_mse_results


class Identity(nn.Module):
    def forward(self, x64, x32, t64, t32):
        return x64, x32


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("lift_cosine", 1000)


def test_definitions_on_identity_model(schedule, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    x32 = F.avg_pool2d(x, 2)
    r = run_mse_tests(Identity(), x, schedule, timestep=500, batch_size=2, seed=10)
    assert r["num_samples"] == 5 and r["timestep"] == 500
    a = schedule.alphas_cumprod[500].float()
    # rebuild the draws: batch k uses Generator(seed + k), 64x64 noise first
    want1_64 = want1_32 = 0.0
    for k, s in enumerate(range(0, 5, 2)):
        gk = torch.Generator().manual_seed(10 + k)
        b64, b32 = x[s:s + 2], x32[s:s + 2]
        n64, n32 = torch.randn(b64.shape, generator=gk), torch.randn(b32.shape, generator=gk)
        q64, q32 = a.sqrt() * b64 + (1 - a).sqrt() * n64, a.sqrt() * b32 + (1 - a).sqrt() * n32
        want1_64 += float(((q64 - n64) ** 2).mean(dim=(1, 2, 3)).sum())
        want1_32 += float(((q32 - n32) ** 2).mean(dim=(1, 2, 3)).sum())
    t1 = r["test1_both_noisy"]
    assert t1["mse_64"] == pytest.approx(want1_64 / 5, rel=1e-5)
    assert t1["mse_32"] == pytest.approx(want1_32 / 5, rel=1e-5)
    assert t1["total_mse"] == pytest.approx((t1["mse_64"] + t1["mse_32"]) / 2)
    # clean scales: input is the clean image, target zero noise
    assert r["test2a_clean32_noisy64"]["mse_32"] == pytest.approx(float((x32 ** 2).mean()), rel=1e-5)
    assert r["test2b_clean64_noisy32"]["mse_64"] == pytest.approx(float((x ** 2).mean()), rel=1e-5)
    assert r["test2a_clean32_noisy64"]["mse_64"] == pytest.approx(t1["mse_64"], rel=1e-6)
    # num_samples is exact, not rounded up to a batch
    r3 = run_mse_tests(Identity(), x, schedule, num_samples=3, batch_size=2, seed=10)
    assert r3["num_samples"] == 3
    table = format_mse_table(r)
    assert "Test 2b" in table and f"{t1['mse_64']:.5f}" in table
    s = x.shape[-1]  # columns titled with the two scales' sizes; files without the key are 64x64
    assert r["image_size"] == s and table.splitlines()[1].split()[1:] == ["MSE", f"{s}x{s}", "MSE", f"{s // 2}x{s // 2}", "total"]
    assert "MSE 64x64  MSE 32x32" in format_mse_table({k: v for k, v in r.items() if k != "image_size"})
    p = save_mse_results(r, tmp_path / "mse.json")
    import json
    assert json.loads(p.read_text())["test1_both_noisy"]["mse_64"] == pytest.approx(t1["mse_64"])


def test_timesteps_passed_to_model(schedule):
    seen = []

    class Spy(nn.Module):
        def forward(self, x64, x32, t64, t32):
            seen.append((int(t64[0]), int(t32[0])))
            return torch.zeros_like(x64), torch.zeros_like(x32)

    x = torch.zeros(2, 3, 8, 8)
    r = run_mse_tests(Spy(), x, schedule, timestep=321)
    assert seen == [(321, 321), (321, 0), (0, 321)]
    assert r["test2b_clean64_noisy32"]["mse_64"] == 0.0
    with pytest.raises(ValueError, match="timestep"):
        run_mse_tests(Spy(), x, schedule, timestep=1000)
    with pytest.raises(ValueError, match="num_samples"):
        run_mse_tests(Spy(), x, schedule, num_samples=3)
