"""dualdiff.metrics.image against scikit-image and closed forms."""
import numpy as np
import pytest
import torch

from dualdiff.metrics.image import dice_at_threshold, mae, psnr, ravd, ssim

from tests.conftest import require  # noqa: E402

skm = require("skimage.metrics")  # a skip without scikit-image; a failure under CI=true


def _pair(b=3, c=3, h=17, w=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    y = (x + 0.1 * torch.randn(b, c, h, w, generator=g)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("shape", [(3, 3, 17, 23), (1, 1, 7, 7), (2, 4, 32, 9)])
@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage(shape, data_range):
    x, y = _pair(*shape)
    x, y = x * data_range, y * data_range
    got = ssim(x, y, data_range=data_range)
    assert got.shape == (shape[0],)
    for b in range(shape[0]):
        ref = skm.structural_similarity(x[b].numpy().astype(np.float64), y[b].numpy().astype(np.float64),
                                        data_range=data_range, channel_axis=0)
        assert got[b].item() == pytest.approx(ref, abs=1e-10)


def test_psnr_matches_skimage_and_identity_is_inf():
    x, y = _pair()
    got = psnr(x, y, data_range=1.0)
    for b in range(x.shape[0]):
        ref = skm.peak_signal_noise_ratio(x[b].double().numpy(), y[b].double().numpy(), data_range=1.0)
        assert got[b].item() == pytest.approx(ref, rel=1e-10)
    assert torch.isinf(psnr(x, x)).all()
    assert ssim(x, x).allclose(torch.ones(3, dtype=torch.float64))


def test_mae_ravd_dice_closed_forms():
    x, y = _pair()
    assert mae(x, y).allclose((x - y).abs().mean((1, 2, 3)).double())
    g = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    g[0, 0, :2, :2] = True                       # 4 voxels
    p = torch.zeros(2, 1, 4, 4)
    p[0, 0, :2, :3] = 0.9                        # 6 voxels above 0.5, 4 overlapping
    r = ravd(p, g)
    assert r[0].item() == pytest.approx(0.5) and r[1].item() == 0.0
    d = dice_at_threshold(p, g, 0.5)
    assert d[0].item() == pytest.approx(2 * 4 / (6 + 4)) and d[1].item() == 1.0
    assert dice_at_threshold(p, g, 0.95)[0].item() == 0.0
    p[1, 0, 0, 0] = 1.0
    assert torch.isinf(ravd(p, g)[1])


def test_bad_inputs_name_the_argument():
    x, y = _pair()
    with pytest.raises(ValueError, match="target shape"):
        ssim(x, y[:, :2])
    with pytest.raises(ValueError, match="H and W >= 7"):
        ssim(x[..., :5, :5], y[..., :5, :5])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, y, data_range=0)
    with pytest.raises(ValueError, match="4-D"):
        ssim(x[0], y[0])
    with pytest.raises(ValueError, match="threshold"):
        dice_at_threshold(x, y > 0.5, 1.5)
