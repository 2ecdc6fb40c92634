"""M independent models of one architecture run as one vectorised module.

:class:`StackedModels` holds the parameters (and buffers) of ``M`` models of the same class and
sizes stacked along a new leading dimension (``weight [M, out, in]`` ...) and runs them all at
once with ``torch.vmap(torch.func.functional_call(base, ...))``: one forward / backward / optimizer
step advances every member. Member ``m`` sees only ``args[...][m]`` and its own parameters, so
with a loss that is a *sum* of per-member losses each member's gradient is exactly the gradient
it would get alone.

What changes when the members share one optimizer:

* element-wise optimizers (SGD, Adam, AdamW, ...) treat every element independently, so a step
  on the stack equals a step on each member;
* gradient-norm clipping must be **per member** (a global norm over the stack would couple the
  runs): :meth:`clip_grad_norm_` does that, member by member, with the same arithmetic as
  ``torch.nn.utils.clip_grad_norm_`` on that member alone; :class:`dualdiff.train.Trainer`
  calls it instead of its global clipping when ``grad_clip`` is set.

Usage::

    models = [build_toy_model("adaptive") for _ in range(4)]
    stack = StackedModels(models)                 # parameters: stack.<name with '.' -> '__'>
    out, w = stack(x, t, return_weights=True)     # x [4, B, 2], t [4, B] -> [4, B, 2], [4, B, 2]
    sds = stack.state_dicts()                     # 4 plain state dicts with the original names
    m2 = stack.unstack(2)                         # member 2 as an ordinary module

Requirements on the model class: ``forward`` must be vmappable (no data-dependent Python
control flow, no ``.item()``, no in-place updates of buffers); all members must have identical
parameter/buffer names and shapes.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

__all__ = ["StackedModels"]

_SEP = "__"  # replaces '.' in a member's parameter names (module attribute names cannot hold dots)


def _key(name: str) -> str:
    return name.replace(".", _SEP)


class StackedModels(nn.Module):
    """``M`` models of one architecture as stacked parameters, run with ``vmap`` (module docs).

    Args:
        models: the members (same class, same parameter/buffer names and shapes, same device
            and dtype). Their current values are copied; the list is not kept.

    Attributes:
        num_models: ``M``.
        param_names: the members' parameter names (``weight`` of ``network.0`` is
            ``"network.0.weight"``); stacked parameter ``name`` is the attribute ``name`` with
            ``'.'`` replaced by ``'__'``, of shape ``[M, *member_shape]``.
        last_grad_norms: ``[M]`` per-member gradient norms before the last
            :meth:`clip_grad_norm_` (None before the first call).
        clip_mode: ``"exact"`` or ``"batched"``, the implementation of :meth:`clip_grad_norm_`.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("models: need at least one model to stack")
        if not all(isinstance(m, nn.Module) for m in models):
            raise TypeError("models: every member must be an nn.Module")
        first = models[0]
        shapes = {n: (p.shape, p.dtype) for n, p in first.named_parameters()}
        bshapes = {n: (b.shape, b.dtype) for n, b in first.named_buffers()}
        for i, m in enumerate(models[1:], 1):
            if type(m) is not type(first):
                raise TypeError(f"models: member {i} is a {type(m).__name__}, member 0 a "
                                f"{type(first).__name__}; stack one architecture at a time")
            if {n: (p.shape, p.dtype) for n, p in m.named_parameters()} != shapes or \
                    {n: (b.shape, b.dtype) for n, b in m.named_buffers()} != bshapes:
                raise ValueError(f"models: member {i}'s parameters/buffers differ in names, "
                                 "shapes or dtypes from member 0's")
        if not shapes:
            raise ValueError("models: the members have no parameters")
        params, buffers = stack_module_state(models)
        self.num_models = len(models)
        self.param_names = list(params)
        self.buffer_names = list(buffers)
        for n, p in params.items():
            if _SEP in n:
                raise ValueError(f"models: parameter name {n!r} contains {_SEP!r}")
            self.register_parameter(_key(n), nn.Parameter(p.detach().clone(),
                                                          requires_grad=p.requires_grad))
        for n, b in buffers.items():
            self.register_buffer(_key(n), b.detach().clone())
        # structure only: a parameter-free copy on the meta device, NOT a submodule (its
        # tensors are replaced by the stacked slices inside functional_call)
        self.__dict__["_base"] = copy.deepcopy(first).to("meta")
        self.last_grad_norms: torch.Tensor | None = None
        self.clip_mode = "exact"

    # --- running ------------------------------------------------------------------------

    @property
    def base(self) -> nn.Module:
        """The member architecture (on the meta device: structure only, no values)."""
        return self._base

    def stacked_parameters(self) -> dict[str, torch.Tensor]:
        """``{member parameter name: stacked tensor [M, ...]}`` (the live parameters)."""
        return {n: getattr(self, _key(n)) for n in self.param_names}

    def stacked_buffers(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, _key(n)) for n in self.buffer_names}

    def forward(self, *args, **kwargs):
        """Run every member: each positional tensor arg has a leading dimension ``M`` (member
        ``m`` gets ``arg[m]``); keyword args are passed unchanged to every member. Outputs
        (tensors or tuples of them) get a leading dimension ``M``."""
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"args[{i}]: expected a tensor with a leading dimension of "
                                f"{self.num_models} (one slice per member), got {type(a).__name__}")
            if a.dim() == 0 or a.shape[0] != self.num_models:
                raise ValueError(f"args[{i}]: expected leading dimension {self.num_models} (one "
                                 f"slice per member), got shape {tuple(a.shape)}")
        base = self._base

        def one(p, b, *a):
            return functional_call(base, (p, b), a, kwargs, strict=True)

        return torch.vmap(one, in_dims=(0, 0) + (0,) * len(args), randomness="error")(
            self.stacked_parameters(), self.stacked_buffers(), *args)

    # --- per-member gradient clipping ---------------------------------------------------

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor:
        """``[M]``: each member's total L2 gradient norm (missing grads count as zero)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(self.num_models, device=next(self.parameters()).device)
        return torch.stack([torch.nn.utils.get_total_norm([g[m] for g in grads])
                            for m in range(self.num_models)])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each member's gradient to total L2 norm ``max_norm`` separately.

        Member ``m``'s gradients are scaled by ``min(1, max_norm / (norm_m + 1e-6))``, the rule of
        ``torch.nn.utils.clip_grad_norm_``. :attr:`clip_mode` picks the implementation:

        * ``"exact"`` (default): member by member, ``get_total_norm`` on the member's slices:
          the same arithmetic as ``clip_grad_norm_`` on the member alone (2 + M*5 launches);
        * ``"batched"``: one ``_foreach_norm`` over every member's slices and one row-wise norm
          ``[M, P] -> [M]`` (fewer kernel launches on a GPU; the norms may differ from
          ``"exact"`` in the last bits).

        Returns the largest member norm (before clipping; non-finite if any member's is) for
        logging; all ``M`` norms are kept in :attr:`last_grad_norms`.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm: must be > 0, got {max_norm}")
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            self.last_grad_norms = torch.zeros(self.num_models)
            return self.last_grad_norms.max()
        M = self.num_models
        members = [[g[m] for g in grads] for m in range(M)]  # views into the stacked grads
        if self.clip_mode == "batched":
            flat = [s for member in members for s in member]
            norms = torch.stack(torch._foreach_norm(flat, 2.0)).view(M, len(grads))
            total = torch.linalg.vector_norm(norms, 2.0, dim=1)
        else:
            total = torch.stack([torch.nn.utils.get_total_norm(member) for member in members])
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for m, member in enumerate(members):
            torch._foreach_mul_(member, coef[m])
        self.last_grad_norms = total
        return total.max()

    # --- back to individual models ------------------------------------------------------

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """``M`` state dicts with the members' original names (detached copies)."""
        stacked = {**self.stacked_parameters(), **self.stacked_buffers()}
        return [{n: t[m].detach().clone() for n, t in stacked.items()}
                for m in range(self.num_models)]

    def member_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s state dict (detached copies, original names)."""
        index = self._check_index(index)
        stacked = {**self.stacked_parameters(), **self.stacked_buffers()}
        return {n: t[index].detach().clone() for n, t in stacked.items()}

    def unstack(self, index: int | None = None):
        """Member ``index`` as an ordinary module of the members' class (on the stack's
        device), or the list of all members when ``index`` is None."""
        if index is None:
            return [self.unstack(m) for m in range(self.num_models)]
        model = copy.deepcopy(self._base)
        model.load_state_dict(self.member_state_dict(index), assign=True)
        return model

    @torch.no_grad()
    def load_member_state_dict(self, index: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Overwrite member ``index`` with ``state_dict`` (names/shapes of one member)."""
        index = self._check_index(index)
        names = set(self.param_names) | set(self.buffer_names)
        if set(state_dict) != names:
            missing, extra = names - set(state_dict), set(state_dict) - names
            raise KeyError(f"state_dict: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for n, t in {**self.stacked_parameters(), **self.stacked_buffers()}.items():
            if state_dict[n].shape != t.shape[1:]:
                raise ValueError(f"state_dict[{n!r}]: expected shape {tuple(t.shape[1:])}, "
                                 f"got {tuple(state_dict[n].shape)}")
            t[index].copy_(state_dict[n])

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if not -self.num_models <= index < self.num_models:
            raise IndexError(f"index: {index} out of range for {self.num_models} models")
        return index % self.num_models

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, member={type(self._base).__name__}"
