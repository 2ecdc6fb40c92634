"""The demo's summary: paired per-case differences to ``fixed`` with a 95 % interval over cases,
"within noise" exactly when the interval contains 0, one figure with the headline in its title."""
from __future__ import annotations

import json

import pytest
import torch

from dualdiff.experiments.tadiff import demo_summary

N, K, H = 6, 2, 16


def _write(root, name, mask, image, case):
    d = root / name
    d.mkdir(parents=True)
    torch.save({"samples": {"image": image, "mask": mask}, "case": case}, d / "samples.pt")


def test_demo_summary_separates_real_differences_from_noise(tmp_path):
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(N, 4, H, H)
    label[:, -1, 4:10, 4:10] = 1.0
    image = torch.rand(N, 4, 3, H, H, generator=g)
    case = {"image": image, "label": label}
    truth_img = image[:, -1][:, None].repeat(1, K, 1, 1, 1)
    perfect = label[:, -1][:, None].repeat(1, K, 1, 1)
    half = perfect.clone()
    half[..., 4:7, :] = 0.0                                      # half the tumour found: Dice 2/3
    noisy = (truth_img + 0.2 * torch.randn(truth_img.shape, generator=g)).clamp(0, 1)
    _write(tmp_path, "fixed", half, noisy, case)
    _write(tmp_path, "power", perfect, noisy, case)              # Dice +1/3 on every case, same image
    wob = half.clone()
    wob[::2, :, 4:7, 4:10] = 1.0                                 # Dice 1 on even cases, 2/3 on odd
    _write(tmp_path, "learnable", wob, noisy, case)
    res = demo_summary(tmp_path, verbose=False)
    p, lrn = res["schedules"]["power"], res["schedules"]["learnable"]
    assert p["dice"]["diff"]["mean"] == pytest.approx(1 / 3, abs=1e-6)
    assert p["dice"]["within_noise"] is False                   # the same gain on every case
    assert p["ssim"]["within_noise"] is True and p["ssim"]["diff"]["mean"] == pytest.approx(0.0)
    d = lrn["dice"]["diff"]                                      # +1/3 on half the cases
    assert d["mean"] == pytest.approx(1 / 6, abs=1e-6)
    assert (d["low"] <= 0 <= d["high"]) == lrn["dice"]["within_noise"]
    assert res["cases"] == N and res["per_case"]["fixed"]["dice"] == pytest.approx([2 / 3] * N)
    md = (tmp_path / "demo.md").read_text()
    assert "power vs fixed: within noise: ssim, psnr; beyond noise: dice (+0.333)" in md
    assert "| learnable |" in md and "within noise" in md
    assert "power 1.000 vs fixed 0.667" in res["title"] and "beyond noise" in res["title"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo.json").read_text())["title"] == res["title"]


def test_demo_summary_needs_the_baseline(tmp_path):
    with pytest.raises(FileNotFoundError, match="fixed/samples.pt"):
        demo_summary(tmp_path, verbose=False)
