"""ldm: the class-distribution UNet, conditional dropping, guidance and the DDIM timestep sequence."""
import pytest
import torch

from dualdiff.diffusion.samplers import cfg_combine, lucidrains_timesteps
from dualdiff.experiments.ldm import drop_mask, guided_model_fn
from dualdiff.models.cond_unet import LUCIDRAINS_DEFAULT_PARAMS, ClassDistUNet, CondUNetConfig

MICRO = CondUNetConfig(dim=8, dim_mults=[1, 2], channels=4, num_classes=5, groups=2, attn_heads=1, attn_dim_head=4)


def test_default_preset_has_lucidrains_parameter_count():
    with torch.device("meta"):
        net = ClassDistUNet.from_name("default")
    assert sum(p.numel() for p in net.parameters()) == LUCIDRAINS_DEFAULT_PARAMS == 172_104_196


def test_condition_is_weighted_class_embedding_and_null_ignores_dist():
    torch.manual_seed(0)
    net = ClassDistUNet(MICRO)
    d = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 1.0]])
    # d @ E: a mixture is the mixture of the class embeddings before the MLP
    want = net.class_mlp(torch.stack([(net.class_emb[0] + net.class_emb[1]) / 2, net.class_emb[4]]))
    torch.testing.assert_close(net.condition(d), want)
    null = torch.tensor([True, True])
    other = torch.rand(2, 5)
    torch.testing.assert_close(net.condition(d, null), net.condition(other, null))
    torch.testing.assert_close(net.condition(d, null)[0], net.class_mlp(net.null_emb))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    assert net(x, t, d).shape == x.shape
    torch.testing.assert_close(net(x, t, d, null), net(x, t, other, null))
    assert not torch.allclose(net(x, t, d), net(x, t, other))


def test_bad_shapes_are_named():
    net = ClassDistUNet(MICRO)
    x, t, d = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.rand(2, 5)
    with pytest.raises(ValueError, match="dist must be"):
        net(x, t, torch.rand(2, 4))
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(2, 4, 7, 7), t, d)
    with pytest.raises(ValueError, match="null_mask"):
        net(x, t, d, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="model.groups"):
        CondUNetConfig(dim=6, groups=4).validate()


def test_drop_mask_rates_and_maskless_samples_always_null():
    torch.manual_seed(0)
    n = 20000
    has = torch.arange(n) % 4 != 0  # a quarter without a mask
    m = drop_mask(has, 0.5)
    assert m[~has].all()
    rate = m[has].float().mean().item()
    assert abs(rate - 0.5) < 0.02
    assert not drop_mask(has, 0.0)[has].any() and drop_mask(has, 1.0).all()


def _formulas(u, c, s, phi, par):
    g = u + s * (c - u)
    if par:
        upd = (c - u).flatten(1).double()
        unit = c.flatten(1).double() / c.flatten(1).double().norm(dim=1, keepdim=True)
        orth = upd - (upd * unit).sum(1, keepdim=True) * unit
        g = c + (s - 1) * orth.reshape(c.shape).float()
    if phi:
        r = g * c.flatten(1).std(1).view(-1, 1, 1, 1) / g.flatten(1).std(1).view(-1, 1, 1, 1)
        g = phi * r + (1 - phi) * g
    return g


@pytest.mark.parametrize("phi", [0.0, 0.7])
@pytest.mark.parametrize("par", [False, True])
def test_cfg_combine_matches_the_formulas(phi, par):
    torch.manual_seed(1)
    u, c = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    got = cfg_combine(u, c, 3.0, phi, remove_parallel=par)
    torch.testing.assert_close(got, _formulas(u, c, 3.0, phi, par), rtol=1e-5, atol=1e-5)
    if par:  # the update left has no component along cond
        upd = (cfg_combine(u, c, 3.0, 0.0, remove_parallel=True) - c).flatten(1)
        assert (upd * c.flatten(1)).sum(1).abs().max() < 1e-3
        # keeping the whole parallel part is the classic formula
        torch.testing.assert_close(cfg_combine(u, c, 3.0, 0.0, remove_parallel=True, keep_parallel_frac=1.0),
                                   u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfg_combine(u, c, 1.0, 0.0, remove_parallel=par), c)


def test_guided_model_fn_one_batched_forward_equals_two():
    torch.manual_seed(0)
    net = ClassDistUNet(MICRO).eval()
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x, t, d = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 900]), torch.rand(3, 5)
    with torch.no_grad():
        a = guided_model_fn(net, d, 3.0, 0.7, remove_parallel=True, batched=True)(x, t)
        assert calls == [6]
        b = guided_model_fn(net, d, 3.0, 0.7, remove_parallel=True, batched=False)(x, t)
        assert calls == [6, 3, 3]
        cond, uncond = net(x, t, d, torch.zeros(3, dtype=torch.bool)), net(x, t, d, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a, cfg_combine(uncond, cond, 3.0, 0.7, remove_parallel=True), rtol=1e-4, atol=1e-5)


def test_lucidrains_timestep_sequence():
    # lucidrains: times = linspace(-1, T-1, S+1).int() reversed; pairs (t, t_next), t_next=-1 last
    ts = lucidrains_timesteps(250, 1000)
    assert ts.shape == (250,) and ts[0] == 999 and ts[-1] == 3 and (ts[:-1] - ts[1:] == 4).all()
    assert lucidrains_timesteps(3, 10).tolist() == [9, 5, 2]
    assert lucidrains_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="sampling_timesteps"):
        lucidrains_timesteps(0, 10)
