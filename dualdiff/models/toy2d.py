"""Noise-prediction networks of the ``toy2d`` experiment (2-D points, integer timesteps).

All models map ``x [..., 2]`` (noisy points) and ``t [...]`` (timesteps, int or float) to the
predicted noise ``[..., 2]``.

**Baseline** :class:`MLPDenoiser`, as in the public template (SakanaAI/AI-Scientist
``templates/2d_diffusion/experiment.py``, from tanelp/tiny-diffusion)::

    e(v; s)  = [sin(s v f_0), .., sin(s v f_{h-1}), cos(s v f_0), .., cos(s v f_{h-1})]
               f_j = exp(-j log(10000) / (h - 1)),  h = embedding_dim / 2
    emb      = concat(e(x_0; 25), e(x_1; 25), e(t; 1))                 # 3 * embedding_dim
    network  = Linear(3E, H) -> hidden_layers x [h + Linear(H, H)(ReLU(h))] -> ReLU -> Linear(H, 2)

with the template's sizes E = 128, H = 256, 3 residual blocks (296 450 parameters). The
parameter names (``network.0.weight``, ...) are the template's.

**Dual-scale** :class:`DualScaleDenoiser` (the seed runs of the AI-Scientist example
"adaptive_dual_scale_denoising"): two networks of the baseline's shape, a *global* one on
``emb(x, t)`` and a *local* one on ``emb(u(x), t)`` with ``u`` the "upscaling" of x, combined as
``w_g(t) * global + w_l(t) * local``:

- ``weighting="fixed"``: ``w_g = w_l = 0.5`` (``fixed_weight`` sets ``w_g``; ``w_l = 1 - w_g``).
- ``weighting="adaptive"``: ``(w_g, w_l) = softmax(Linear(H, 2)(ReLU(Linear(E, H)(e(t; 1)))))``, a
  learnable timestep-conditioned weighting.
- ``weighting="adaptive_deep"``: one more hidden layer (``H -> H/2``) and LeakyReLU(0.2):
  ``softmax(Linear(H/2, 2)(lrelu(Linear(H, H/2)(lrelu(Linear(E, H)(e(t; 1)))))))``.

The "upscaling" ``u``:

- ``upscale="linear"`` (default, the seed's): a learnable affine map ``R^2 -> R^2``. The seed
  declares ``nn.Linear(2, 4)`` and reads only its first two outputs, and also declares an unused
  ``nn.Linear(2, 2)`` "downscale"; a ``Linear(2, 2)`` computes the same family of functions with
  the same initial distribution (PyTorch's default init depends only on the fan-in), without
  dead parameters. Despite its name it does not necessarily enlarge x: at init its weights are
  ``U(-1/sqrt 2, 1/sqrt 2)``, and it is learnt.
- ``upscale="factor"``: ``u(x) = upscale_factor * x`` (default 2): a literal zoom, so the local
  branch's sinusoidal features are ``upscale_factor`` times finer (effective input scale
  ``25 * upscale_factor``), which is what "local branch on an upscaled input" describes.

``forward(x, t, return_weights=True)`` also returns the weights ``[..., 2]`` (global, local) for
the weight-evolution analysis; for ``fixed`` they are the constants.

**Stacking.** The models hold parameters only (no buffers, no state changed in ``forward``,
no Python branch on tensor values), so several of them (same variant and sizes) can run as one
vectorised model::

    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    out = torch.vmap(lambda p, b, x, t: torch.func.functional_call(base, (p, b), (x, t)))(
        params, buffers, xs, ts)       # xs [M, B, 2], ts [M, B]
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "VARIANTS",
    "SinusoidalEmbedding",
    "ResidualBlock",
    "MLPDenoiser",
    "DualScaleDenoiser",
    "build_toy_model",
]

VARIANTS = ("baseline", "fixed", "adaptive", "adaptive_deep")
_WEIGHTINGS = ("fixed", "adaptive", "adaptive_deep")
_UPSCALES = ("linear", "factor")


def _frequency_step(dim: int) -> float:
    # log(10000) / (h - 1) evaluated as the template does (float32 torch ops on the CPU), kept
    # as the Python float of that float32 value: no tensor is created from host data in forward
    # (CUDA-graph capture safe), and the frequencies below are bitwise the template's
    return (torch.log(torch.tensor([10000.0], dtype=torch.float32)) / (dim // 2 - 1)).item()


def _sinusoidal_frequencies(dim: int, step: float, device) -> torch.Tensor:
    """``f_j = exp(-step * j)``, ``j < dim // 2``, float32 on ``device``."""
    return torch.exp(torch.arange(dim // 2, device=device, dtype=torch.float32) * -step)


class SinusoidalEmbedding(nn.Module):
    """``v [...] -> [..., dim]``: ``cat(sin(scale * v * f), cos(scale * v * f))`` (module docstring)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"dim: must be even and >= 4, got {dim}")
        self.dim = dim
        self.scale = float(scale)
        self.step = _frequency_step(dim)

    def forward(self, v: torch.Tensor, freqs: torch.Tensor | None = None) -> torch.Tensor:
        if freqs is None:
            freqs = _sinusoidal_frequencies(self.dim, self.step, v.device)
        arg = (v.to(torch.float32) * self.scale).unsqueeze(-1) * freqs
        return torch.cat((torch.sin(arg), torch.cos(arg)), dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"


class ResidualBlock(nn.Module):
    """``h -> h + Linear(ReLU(h))``."""

    def __init__(self, width: int):
        super().__init__()
        self.ff = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ff(self.act(h))


def _check_sizes(embedding_dim: int, hidden_dim: int, hidden_layers: int) -> None:
    for name, v, lo in (("embedding_dim", embedding_dim, 4), ("hidden_dim", hidden_dim, 2),
                        ("hidden_layers", hidden_layers, 0)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if v < lo:
            raise ValueError(f"{name}: must be >= {lo}, got {v}")
    if embedding_dim % 2:
        raise ValueError(f"embedding_dim: must be even, got {embedding_dim}")


def _trunk(embedding_dim: int, hidden_dim: int, hidden_layers: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(3 * embedding_dim, hidden_dim),
        *[ResidualBlock(hidden_dim) for _ in range(hidden_layers)],
        nn.ReLU(),
        nn.Linear(hidden_dim, 2),
    )


class _ToyDenoiser(nn.Module):
    """Shared embedding code: ``emb(x, t) = cat(e(x_0; s), e(x_1; s), e(t; 1))``."""

    def __init__(self, embedding_dim: int, input_scale: float):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.time_emb = SinusoidalEmbedding(embedding_dim)
        self.input_emb = SinusoidalEmbedding(embedding_dim, scale=input_scale)

    @staticmethod
    def _check_inputs(x: torch.Tensor, t: torch.Tensor) -> None:
        # shape-only checks: no data-dependent control flow (safe under vmap / compile)
        if x.shape[-1] != 2:
            raise ValueError(f"x: expected shape [..., 2], got {tuple(x.shape)}")
        if t.shape != x.shape[:-1]:
            raise ValueError(f"t: expected shape {tuple(x.shape[:-1])} (x without its last dim), "
                             f"got {tuple(t.shape)}")

    def _embed_x(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            (self.input_emb(x[..., 0], freqs), self.input_emb(x[..., 1], freqs)), dim=-1
        )


class MLPDenoiser(_ToyDenoiser):
    """The template's baseline: sinusoidal embeddings + residual MLP (see the module docstring).

    Args:
        embedding_dim: size E of each sinusoidal embedding (template: 128).
        hidden_dim: width H of the MLP (template: 256).
        hidden_layers: number of residual blocks (template: 3).
        input_scale: scale of the coordinates' embeddings (template: 25).
    """

    def __init__(self, embedding_dim: int = 128, hidden_dim: int = 256, hidden_layers: int = 3,
                 input_scale: float = 25.0):
        _check_sizes(embedding_dim, hidden_dim, hidden_layers)
        super().__init__(embedding_dim, input_scale)
        self.network = _trunk(embedding_dim, hidden_dim, hidden_layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x [..., 2]``, ``t [...]`` -> predicted noise ``[..., 2]``."""
        self._check_inputs(x, t)
        freqs = _sinusoidal_frequencies(self.embedding_dim, self.time_emb.step, x.device)
        emb = torch.cat((self._embed_x(x, freqs), self.time_emb(t, freqs)), dim=-1)
        return self.network(emb)


class DualScaleDenoiser(_ToyDenoiser):
    """Global branch on x + local branch on upscaled x, weighted (see the module docstring).

    Args:
        embedding_dim, hidden_dim, hidden_layers, input_scale: as :class:`MLPDenoiser`, for
            each branch.
        weighting: ``"fixed"``, ``"adaptive"`` or ``"adaptive_deep"``.
        fixed_weight: global weight of ``"fixed"`` (local = 1 - it); default 0.5.
        upscale: ``"linear"`` (learnable affine map, the seed's) or ``"factor"`` (x * factor).
        upscale_factor: the factor of ``upscale="factor"``; default 2.
        negative_slope: LeakyReLU slope of ``"adaptive_deep"``; default 0.2 (the seed's).
    """

    def __init__(self, embedding_dim: int = 128, hidden_dim: int = 256, hidden_layers: int = 3,
                 input_scale: float = 25.0, *, weighting: str = "adaptive",
                 fixed_weight: float = 0.5, upscale: str = "linear", upscale_factor: float = 2.0,
                 negative_slope: float = 0.2):
        _check_sizes(embedding_dim, hidden_dim, hidden_layers)
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {_WEIGHTINGS}, got {weighting!r}")
        if upscale not in _UPSCALES:
            raise ValueError(f"upscale: expected one of {_UPSCALES}, got {upscale!r}")
        if not 0.0 <= fixed_weight <= 1.0:
            raise ValueError(f"fixed_weight: must be in [0, 1], got {fixed_weight}")
        super().__init__(embedding_dim, input_scale)
        self.weighting = weighting
        self.fixed_weight = float(fixed_weight)
        self.upscale_mode = upscale
        self.upscale_factor = float(upscale_factor)
        self.global_network = _trunk(embedding_dim, hidden_dim, hidden_layers)
        self.local_network = _trunk(embedding_dim, hidden_dim, hidden_layers)
        self.upscale = nn.Linear(2, 2) if upscale == "linear" else None
        if weighting == "adaptive":
            self.weight_network = nn.Sequential(
                nn.Linear(embedding_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2)
            )
        elif weighting == "adaptive_deep":
            self.weight_network = nn.Sequential(
                nn.Linear(embedding_dim, hidden_dim), nn.LeakyReLU(negative_slope),
                nn.Linear(hidden_dim, hidden_dim // 2), nn.LeakyReLU(negative_slope),
                nn.Linear(hidden_dim // 2, 2),
            )
        else:
            self.weight_network = None

    def upscaled(self, x: torch.Tensor) -> torch.Tensor:
        """The local branch's input ``u(x)``."""
        if self.upscale is not None:
            return self.upscale(x)
        return x * self.upscale_factor

    def branch_weights(self, t_emb: torch.Tensor) -> torch.Tensor:
        """``[..., 2]`` (global, local) weights from the time embedding ``[..., E]``."""
        if self.weight_network is None:
            w = torch.full_like(t_emb[..., :1], self.fixed_weight)
            return torch.cat((w, 1.0 - w), dim=-1)
        return torch.softmax(self.weight_network(t_emb), dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_weights: bool = False):
        """``x [..., 2]``, ``t [...]`` -> noise ``[..., 2]`` (and the weights ``[..., 2]``)."""
        self._check_inputs(x, t)
        freqs = _sinusoidal_frequencies(self.embedding_dim, self.time_emb.step, x.device)
        t_emb = self.time_emb(t, freqs)
        g = self.global_network(torch.cat((self._embed_x(x, freqs), t_emb), dim=-1))
        loc = self.local_network(torch.cat((self._embed_x(self.upscaled(x), freqs), t_emb), dim=-1))
        w = self.branch_weights(t_emb)
        out = w[..., :1] * g + w[..., 1:] * loc
        return (out, w) if return_weights else out

    def extra_repr(self) -> str:
        up = "linear" if self.upscale is not None else f"factor={self.upscale_factor}"
        fw = f", fixed_weight={self.fixed_weight}" if self.weighting == "fixed" else ""
        return f"weighting={self.weighting}{fw}, upscale={up}"


def build_toy_model(variant: str, **kw) -> nn.Module:
    """Model of ``variant`` (one of :data:`VARIANTS`).

    ``"baseline"`` -> :class:`MLPDenoiser` (``**kw``: its sizes); ``"fixed"``, ``"adaptive"``,
    ``"adaptive_deep"`` -> :class:`DualScaleDenoiser` with that ``weighting`` (``**kw``: sizes,
    ``upscale``, ``upscale_factor``, ``fixed_weight``, ``negative_slope``).
    """
    if not isinstance(variant, str):
        raise TypeError(f"variant: expected a str, got {type(variant).__name__}")
    if variant == "baseline":
        return MLPDenoiser(**kw)
    if variant in _WEIGHTINGS:
        if "weighting" in kw:
            raise ValueError("weighting: set by variant, do not pass it")
        return DualScaleDenoiser(weighting=variant, **kw)
    raise ValueError(f"variant: unknown toy2d variant {variant!r}; choose from {', '.join(VARIANTS)}")
