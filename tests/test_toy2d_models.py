"""toy2d denoisers: the template's architecture, the dual-scale variants, stacking under vmap."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from dualdiff.models import DualScaleDenoiser, MLPDenoiser, build_toy_model
from dualdiff.models.toy2d import VARIANTS

SMALL = dict(embedding_dim=16, hidden_dim=32, hidden_layers=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def template_embedding(v, dim, scale):
    """The template's SinusoidalEmbedding.forward, restated."""
    v = v * scale
    half = dim // 2
    e = torch.log(torch.Tensor([10000.0])) / (half - 1)
    e = torch.exp(-e * torch.arange(half))
    e = v.unsqueeze(-1) * e.unsqueeze(0)
    return torch.cat((torch.sin(e), torch.cos(e)), dim=-1)


def template_trunk(seq, emb):
    """network(emb) with the template's layer order, from a state dict's tensors."""
    h = F.linear(emb, seq[0].weight, seq[0].bias)
    for blk in list(seq)[1:-2]:
        h = h + F.linear(torch.relu(h), blk.ff.weight, blk.ff.bias)
    return F.linear(torch.relu(h), seq[-1].weight, seq[-1].bias)


def template_emb(x, t, dim):
    return torch.cat((template_embedding(x[:, 0], dim, 25.0), template_embedding(x[:, 1], dim, 25.0),
                      template_embedding(t, dim, 1.0)), dim=-1)


def inputs(b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, generator=g) * 2, torch.randint(0, 100, (b,), generator=g)


def test_template_sizes_and_parameter_names():
    base = build_toy_model("baseline")
    n_base = sum(p.numel() for p in base.parameters())
    # Linear(384, 256) + 3 x Linear(256, 256) + Linear(256, 2)
    assert n_base == (384 * 256 + 256) + 3 * (256 * 256 + 256) + (256 * 2 + 2) == 296450
    assert list(base.state_dict())[:2] == ["network.0.weight", "network.0.bias"]
    assert list(base.buffers()) == []  # parameters only: stackable, nothing to keep in sync
    fixed = build_toy_model("fixed")
    assert sum(p.numel() for p in fixed.parameters()) == 2 * n_base + 6  # + the 2->2 upscale
    ada = build_toy_model("adaptive")
    w_ada = (128 * 256 + 256) + (256 * 2 + 2)
    assert sum(p.numel() for p in ada.parameters()) == 2 * n_base + 6 + w_ada
    deep = build_toy_model("adaptive_deep")
    w_deep = (128 * 256 + 256) + (256 * 128 + 128) + (128 * 2 + 2)
    assert sum(p.numel() for p in deep.parameters()) == 2 * n_base + 6 + w_deep
    acts = [type(mod) for mod in deep.weight_network]
    assert acts == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
    assert deep.weight_network[1].negative_slope == 0.2
    assert [type(mod) for mod in ada.weight_network] == [nn.Linear, nn.ReLU, nn.Linear]
    assert build_toy_model("fixed", upscale="factor").upscale is None


def test_baseline_is_the_template_forward():
    model = MLPDenoiser()  # template sizes
    x, t = inputs(33)
    ref = template_trunk(model.network, template_emb(x, t, 128))
    torch.testing.assert_close(model(x, t), ref, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["fixed", "adaptive", "adaptive_deep"])
@pytest.mark.parametrize("upscale", ["linear", "factor"])
def test_dual_scale_composition(variant, upscale):
    model = build_toy_model(variant, upscale=upscale, upscale_factor=3.0, **SMALL)
    x, t = inputs(17)
    out, w = model(x, t, return_weights=True)
    assert out.shape == (17, 2) and w.shape == (17, 2)
    torch.testing.assert_close(model(x, t), out, rtol=0, atol=0)
    xu = F.linear(x, model.upscale.weight, model.upscale.bias) if upscale == "linear" else 3.0 * x
    g = template_trunk(model.global_network, template_emb(x, t, 16))
    loc = template_trunk(model.local_network, template_emb(xu, t, 16))
    if variant == "fixed":
        torch.testing.assert_close(w, torch.full((17, 2), 0.5), rtol=0, atol=0)
    else:
        temb = template_embedding(t, 16, 1.0)
        torch.testing.assert_close(w, torch.softmax(model.weight_network(temb), -1))
    torch.testing.assert_close(out, w[:, :1] * g + w[:, 1:] * loc, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["adaptive", "adaptive_deep"])
def test_adaptive_weights_depend_on_t_only(variant):
    model = build_toy_model(variant, **SMALL)
    x, _ = inputs(50)
    t = torch.arange(50) * 2
    _, w1 = model(x, t, return_weights=True)
    _, w2 = model(torch.randn(50, 2) * 5, t, return_weights=True)
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    torch.testing.assert_close(w1.sum(-1), torch.ones(50))
    assert (w1 > 0).all() and (w1.std(0) > 0).all()  # varies with t at init already


def test_fixed_weight_option():
    model = build_toy_model("fixed", fixed_weight=0.25, **SMALL)
    x, t = inputs(9)
    _, w = model(x, t, return_weights=True)
    assert torch.equal(w, torch.tensor([[0.25, 0.75]]).expand(9, 2))


def test_extra_batch_dims_and_float_t():
    model = build_toy_model("adaptive", **SMALL)
    x, t = inputs(12)
    out = model(x.view(3, 4, 2), t.view(3, 4))
    torch.testing.assert_close(out.view(12, 2), model(x, t))
    torch.testing.assert_close(model(x, t.float()), model(x, t))


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_stacked_equals_one_by_one(variant):
    torch.manual_seed(1)
    models = [build_toy_model(variant, **SMALL) for _ in range(4)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    kw = {} if variant == "baseline" else {"return_weights": True}

    def run(p, b, x, t):
        return functional_call(base, (p, b), (x, t), kw)

    xs = torch.randn(4, 40, 2) * 2
    ts = torch.randint(0, 100, (4, 40))
    got = vmap(run)(params, buffers, xs, ts)
    for i, model in enumerate(models):
        want = model(xs[i], ts[i], **kw)
        if variant == "baseline":
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got[0][i], want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1][i], want[1], rtol=1e-5, atol=1e-6)
    # the models differ, so equal outputs are not an accident of shared weights
    out = got if variant == "baseline" else got[0]
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("variant", ["baseline", "adaptive_deep"])
def test_vmap_grad_equals_one_by_one(variant):
    torch.manual_seed(2)
    models = [build_toy_model(variant, **SMALL) for _ in range(4)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, t, eps):
        return F.mse_loss(functional_call(base, (p, b), (x, t)), eps)

    xs, ts, eps = torch.randn(4, 32, 2), torch.randint(0, 100, (4, 32)), torch.randn(4, 32, 2)
    grads = vmap(grad(loss))(params, buffers, xs, ts, eps)
    for i, model in enumerate(models):
        model.zero_grad()
        F.mse_loss(model(xs[i], ts[i]), eps[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiles_fullgraph(variant):
    model = build_toy_model(variant, **SMALL)
    x, t = inputs(8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t), model(x, t))


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_falls_on_short_run(variant):
    """Plain DDPM noise-prediction training for 150 steps on two Gaussian blobs."""
    torch.manual_seed(3)
    model = build_toy_model(variant, **SMALL)
    betas = torch.linspace(1e-4, 0.02, 100)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(4)
    data = torch.randn(4096, 2, generator=g) * 0.3 + torch.tensor([[2.0, 0.0]]) * (
        torch.randint(0, 2, (4096, 1), generator=g) * 2 - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step_loss(x0, train=True):
        t = torch.randint(0, 100, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].unsqueeze(1)
        return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)

    with torch.no_grad():
        before = sum(step_loss(data[i * 512:(i + 1) * 512]).item() for i in range(8)) / 8
    for _ in range(150):
        opt.zero_grad()
        step_loss(data[torch.randint(0, 4096, (256,), generator=g)]).backward()
        opt.step()
    with torch.no_grad():
        after = sum(step_loss(data[i * 512:(i + 1) * 512]).item() for i in range(8)) / 8
    assert math.isfinite(after) and after < 0.8 * before, (before, after)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        build_toy_model("triple")
    with pytest.raises(TypeError, match="variant"):
        build_toy_model(None)
    with pytest.raises(ValueError, match="weighting"):
        build_toy_model("adaptive", weighting="fixed")
    with pytest.raises(ValueError, match="weighting"):
        DualScaleDenoiser(weighting="learned")
    with pytest.raises(ValueError, match="upscale"):
        build_toy_model("fixed", upscale="bicubic")
    with pytest.raises(ValueError, match="embedding_dim"):
        MLPDenoiser(embedding_dim=15)
    with pytest.raises(TypeError, match="hidden_dim"):
        MLPDenoiser(hidden_dim=32.0)
    with pytest.raises(ValueError, match="fixed_weight"):
        build_toy_model("fixed", fixed_weight=1.5)
    model = build_toy_model("baseline", **SMALL)
    with pytest.raises(ValueError, match="x"):
        model(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="t"):
        model(torch.zeros(4, 2), torch.zeros(5, dtype=torch.long))
