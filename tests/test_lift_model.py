"""LIFT dual-timestep model and single-scale baseline: shapes, parameter count, conditioning,
input checks, forward-mode AD (torch.func.jvp, Hutchinson)."""
import pytest
import torch

from dualdiff.models.lift import LIFTDualTimestepModel, LIFTModelConfig, SingleScaleUNet
from dualdiff.models.unet import UNet, count_parameters
from dualdiff.nn.layers import GroupNorm, SelfAttention2d, jvp_safe
from dualdiff.ops.hutchinson import hutchinson_vhv, hutchinson_vhv_reference, rademacher_probes



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _public_layout_count(h=(64, 128, 256, 512), e=256, freq=64):
    """Parameter count of the experiment's public LIFTDualTimestepModel, by arithmetic
    (shared time MLP + 2-layer combiner; everything else is the same layout as ours)."""
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    res = lambda i, o: 2 * i + conv(i, o, 3) + lin(e, o) + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)  # noqa: E731
    attn = lambda c: 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)  # noqa: E731
    n = lin(freq, e) + lin(e, e) + lin(2 * e, e) + lin(e, e) + conv(6, h[0], 3)
    prev = h[0]
    for c in h:
        n += res(prev, c) + res(c, c) + (attn(c) if c >= 128 else 0) + conv(c, c, 4)
        prev = c
    n += 2 * res(h[-1], h[-1]) + attn(h[-1])
    below = h[-1]
    for c in reversed(h):
        n += conv(below, below, 4) + res(below + c, c) + res(c, c) + (attn(c) if c >= 128 else 0)
        below = c
    return n + 2 * h[0] + conv(h[0], 6, 3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return LIFTDualTimestepModel(LIFTModelConfig.tiny()).eval()


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 64, 64, generator=g), torch.randn(b, 3, 32, 32, generator=g),
            torch.randint(0, 1000, (b,), generator=g), torch.randint(0, 1000, (b,), generator=g))


def test_default_parameter_count_meta():
    with torch.device("meta"):
        model = LIFTDualTimestepModel()
        base = SingleScaleUNet()
    n = count_parameters(model)
    print(f"LIFTDualTimestepModel default: {n:,} parameters; SingleScaleUNet: {count_parameters(base):,}")
    assert abs(n - 58.5e6) / 58.5e6 < 0.01
    # same layout as the public model: only the timestep embedding differs (+16,640)
    assert n - _public_layout_count() == 16640
    assert abs(count_parameters(base) - n) / n < 0.01
    # levels >= 128 channels get attention, the 64-channel one does not; all norms jvp-safe
    assert model.unet.down_levels[0].attn is None
    assert all(lvl.attn is not None for lvl in model.unet.down_levels[1:])
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert sum(isinstance(m, GroupNorm) for m in model.modules()) > 0
    assert sum(isinstance(m, SelfAttention2d) for m in model.modules()) == 7


def test_tiny_shapes_and_size(tiny):
    n = count_parameters(tiny)
    assert 100_000 < n < 1_000_000
    x64, x32, t64, t32 = _inputs(3)
    with torch.no_grad():
        e64, e32 = tiny(x64, x32, t64, t32)
    assert e64.shape == (3, 3, 64, 64) and e32.shape == (3, 3, 32, 32)
    assert e64.dtype == e32.dtype == torch.float32
    assert torch.isfinite(e64).all() and torch.isfinite(e32).all()
    # scalar timesteps broadcast; batch 1
    with torch.no_grad():
        a, b = tiny(x64[:1], x32[:1], 10, 20)
    assert a.shape == (1, 3, 64, 64) and b.shape == (1, 3, 32, 32)


def test_conditions_on_both_timesteps_and_both_inputs(tiny):
    x64, x32, t64, t32 = _inputs(2)
    with torch.no_grad():
        ref = tiny(x64, x32, t64, t32)
        other_t32 = tiny(x64, x32, t64, (t32 + 500) % 1000)
        other_x32 = tiny(x64, x32 + 1.0, t64, t32)
        # samples are independent: the batch of 2 equals two batches of 1
        first = tiny(x64[:1], x32[:1], t64[:1], t32[:1])
    for a, b in zip(ref, other_t32):
        assert (a - b).abs().max() > 1e-4
    for a, b in zip(ref, other_x32):
        assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(first[0], ref[0][:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first[1], ref[1][:1], rtol=1e-4, atol=1e-5)


def test_eps32_is_bilinear_downsample_of_channels_3_to_6(tiny):
    x64, x32, t64, t32 = _inputs(1)
    with torch.no_grad():
        emb = tiny.time_embed(t64, t32)
        up = torch.nn.functional.interpolate(x32, size=(64, 64), mode="bilinear", align_corners=False)
        out = tiny.unet(torch.cat([x64, up], 1), emb)
        e64, e32 = tiny(x64, x32, t64, t32)
    torch.testing.assert_close(e64, out[:, :3])
    torch.testing.assert_close(e32, torch.nn.functional.avg_pool2d(out[:, 3:], 2))  # exact 2x bilinear = 2x2 mean


def test_single_scale_baseline(tiny):
    torch.manual_seed(0)
    base = SingleScaleUNet(LIFTModelConfig.tiny()).eval()
    x64, _, t64, _ = _inputs(2)
    with torch.no_grad():
        y = base(x64, t64)
        y2 = base(x64, (t64 + 300) % 1000)
    assert y.shape == (2, 3, 64, 64)
    assert (y - y2).abs().max() > 1e-4
    assert base.unet.in_channels == 3 and tiny.unet.in_channels == 6


@pytest.mark.parametrize("bad, exc, name", [
    (dict(x64=torch.randn(2, 3, 32, 32)), ValueError, "x64"),
    (dict(x32=torch.randn(2, 3, 64, 64)), ValueError, "x32"),
    (dict(x32=torch.randn(3, 3, 32, 32)), ValueError, "batch"),
    (dict(t64=torch.zeros(5, dtype=torch.long)), ValueError, "t64"),
    (dict(t32=torch.zeros(2, 2)), ValueError, "t32"),
    (dict(x64=torch.zeros(2, 3, 64, 64, dtype=torch.long)), TypeError, "x64"),
])
def test_bad_inputs(tiny, bad, exc, name):
    x64, x32, t64, t32 = _inputs(2)
    args = dict(x64=x64, x32=x32, t64=t64, t32=t32)
    args.update(bad)
    with pytest.raises(exc, match=name):
        tiny(**args)


def test_bad_configs():
    with pytest.raises(ValueError, match="image_size"):
        LIFTModelConfig(channels=[16, 32, 64, 128, 256], image_size=32)
    with pytest.raises(ValueError, match="channels"):
        LIFTModelConfig(channels=[])
    with pytest.raises(ValueError, match="divisible"):
        UNet(3, 3, [12, 24], 32, norm_groups=8)


def test_jvp_eager_matches_finite_difference(tiny):
    x64, x32, t64, t32 = _inputs(1)
    u = torch.randn_like(x64)
    f = lambda z: tiny(z, x32, t64, t32)[0]  # noqa: E731
    with torch.no_grad():
        y = f(x64)
    y_jvp, ju = torch.func.jvp(f, (x64,), (u,))  # attention switches to the explicit path itself
    torch.testing.assert_close(y_jvp, y, rtol=1e-4, atol=1e-5)
    h = 1e-2
    with torch.no_grad():
        fd = (f(x64 + h * u) - f(x64 - h * u)) / (2 * h)
    err = (fd - ju).norm() / ju.norm()
    assert err < 1e-2, err
    # and the jvp w.r.t. the 32x32 input through the bilinear upsampling
    g = lambda z: tiny(x64, z, t64, t32)[1]  # noqa: E731
    u32 = torch.randn_like(x32)
    _, ju32 = torch.func.jvp(g, (x32,), (u32,))
    with torch.no_grad():
        fd32 = (g(x32 + h * u32) - g(x32 - h * u32)) / (2 * h)
    assert (fd32 - ju32).norm() / ju32.norm() < 1e-2


def test_explicit_attention_path_same_function(tiny):
    x64, x32, t64, t32 = _inputs(2)
    with torch.no_grad():
        a = tiny(x64, x32, t64, t32)
        with jvp_safe():
            b = tiny(x64, x32, t64, t32)
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)


def test_hutchinson_on_tiny_model(tiny):
    x64, x32, t64, t32 = _inputs(2)

    def f(z):  # hutchinson_vhv calls fn on the batch repeated once per probe: repeat the context
        r = z.shape[0] // x64.shape[0]
        return tiny(z, x32.repeat(r, 1, 1, 1), t64.repeat(r), t32.repeat(r))[0]
    eps = rademacher_probes(3, x64, torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = hutchinson_vhv(f, x64, eps=eps, probes=None, v=1.0 / (64 * 64))
        looped = hutchinson_vhv_reference(f, x64, eps, v=1.0 / (64 * 64))
    assert batched.shape == (2,)
    assert torch.isfinite(batched).all() and (batched > 0).all()
    torch.testing.assert_close(batched, looped, rtol=1e-3, atol=0)
