"""``DiceLoss``: a drop-in for ``monai.losses.DiceLoss`` (MONAI 1.3 - 1.6 signature) on the fused
weighted-Dice op.

Same constructor (argument for argument, same defaults), same ``forward(input, target)``, same
``class_weight`` buffer (so state_dicts load both ways), same warnings and errors, same output
shapes: a 0-d loss for "mean"/"sum"; for "none" ``[B, C', 1, ...]`` (one 1 per spatial dim;
``[C', 1, ...]`` with ``batch=True``), C' = C, or C - 1 without background. The function is

    p = act(input)           (sigmoid | softmax over C | other_act | identity)
    g = one_hot(target) if to_onehot_y else target;  drop channel 0 unless include_background
    p, g = p * m, g * m      (m: MONAI's ignore_index mask, only with ignore_index)
    tp, fp, fn = MONAI's compute_tp_fp_fn(p, g, ord = 2 if squared_pred else 1, soft_label)
    f = 1 - (2 tp + smooth_nr) / (2 tp + fp + fn + smooth_dr)      (jaccard: 2 (tp + fp + fn))
    f = f * class_weight;  reduce over (b, c)   (batch=True: tp, fp, fn summed over b first)

What runs fused (:func:`dualdiff.ops.weighted_dice_loss`, one pass over logits and target):
for dice (not jaccard) with ord 2 (``squared_pred``) or with ``soft_label=False``,
2 tp + fp + fn = Σp^ord + Σg^ord and tp = Σ p g, which is exactly the op's formula; the op then
also does the sigmoid/softmax, the background drop, the class weight (as a ``[B, C]`` weight) and
the reduction. ``to_onehot_y`` builds a uint8 one-hot (1 byte per element instead of 4) that the
op reads directly. ``batch=True`` runs the op on the input viewed as one sample
(``[1, C, B·S]``, one transposing copy). ``other_act`` and ``ignore_index`` run in PyTorch and the
op fuses the rest (``activation="none"``): listed in ``.unfused_parts``.

What falls back to MONAI's arithmetic in plain PyTorch (``.fallback_reason``, a one-time
:class:`~dualdiff.compat.FallbackWarning`): ``jaccard=True``; ``soft_label=True`` without
``squared_pred`` (tp from |p - g|); a target that requires grad (the op gives the target no
gradient); float64 or non-floating input; input with fewer than 3 dims or no elements.

Differences, all numeric-only: the fused path accumulates in fp32 and computes tp directly
(MONAI's ord-2 path computes it as (|p|² + |g|² - |p - g|²) / 2), so results agree with MONAI to
rounding (~1e-6 relative in fp32) and are more accurate for fp16/bf16 input; the loss is
returned in the dtype MONAI would return (the promotion of input and target dtypes).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch.nn.modules.loss import _Loss

from dualdiff.compat._fallback import notify_fallback
from dualdiff.ops import weighted_dice_loss

__all__ = ["DiceLoss"]

_REDUCTIONS = ("none", "mean", "sum")
_OP_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP_TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)


def _reduction_value(reduction: object) -> str:
    """MONAI's LossReduction(reduction).value without importing MONAI (it is a str enum)."""
    value = getattr(reduction, "value", reduction)
    if not isinstance(value, str) or value not in _REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid reduction: expected one of {list(_REDUCTIONS)}")
    return value


def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, *spatial] labels -> [B, num_classes, *spatial] one-hot in ``dtype`` (MONAI's rule:
    labels are cast with ``.long()``; a channel axis other than 1 is an AssertionError)."""
    if labels.dim() < 2:
        labels = labels.reshape(*labels.shape, *([1] * (2 - labels.dim())))
    if labels.shape[1] != 1:
        raise AssertionError("labels should have a channel with length equal to one.")
    shape = list(labels.shape)
    shape[1] = num_classes
    out = torch.zeros(shape, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.long(), 1)


def _ignore_mask(y: torch.Tensor, ignore_index: Optional[int]) -> Optional[torch.Tensor]:
    """MONAI's ignore mask ([B, 1, *spatial], 1 = valid) of the original target."""
    if ignore_index is None:
        return None
    if y.shape[1] == 1:
        return (y != ignore_index).float()
    if 0 <= ignore_index < y.shape[1]:
        return 1.0 - y[:, ignore_index:ignore_index + 1]
    return (y.sum(dim=1, keepdim=True) > 0).float()


class DiceLoss(_Loss):
    """Drop-in for ``monai.losses.DiceLoss``; see the module docstring for the formula, what is
    fused and what falls back. Arguments are MONAI's (same names, order and defaults), plus
    the keyword-only ``backend`` of the fused op (None: ``DUALDIFF_BACKEND`` or the fastest).

    ``forward(input [B, C, *spatial] logits/probabilities, target [B, C or 1, *spatial])`` ->
    0-d tensor ("mean"/"sum") or ``[B, C', 1, ...]`` ("none").
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Optional[Callable] = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Union[Sequence[float], float, int, torch.Tensor, None] = None,
        soft_label: bool = False,
        ignore_index: Optional[int] = None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(reduction=_reduction_value(reduction))
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.ignore_index = ignore_index
        self.soft_label = soft_label
        self.backend = backend
        self.register_buffer("class_weight", torch.as_tensor(weight) if weight is not None else None)
        self.class_weight: Optional[torch.Tensor]
        self._weight_checked: Optional[tuple] = None
        self.fallback_reason: Optional[str] = self._static_fallback_reason()
        parts = []
        if other_act is not None:
            parts.append("other_act runs in PyTorch before the fused sums")
        if ignore_index is not None:
            parts.append("the activation and the ignore_index mask run in PyTorch before the fused sums")
        if batch:
            parts.append("batch=True copies the input to [1, C, B*S] for the fused op")
        self.unfused_parts: tuple[str, ...] = tuple(parts)
        if self.fallback_reason is not None:
            notify_fallback("dualdiff.compat.DiceLoss", self.fallback_reason)

    def _static_fallback_reason(self) -> Optional[str]:
        if self.jaccard:
            return "jaccard=True: the fused op computes dice, not the Jaccard denominator 2(tp + fp + fn)"
        if self.soft_label and not self.squared_pred:
            return ("soft_label=True without squared_pred: tp = (|p| + |g| - |p - g|) / 2 (L1 norms) is not "
                    "the fused op's sum of p*g")
        return None

    # ------------------------------------------------------------------ shared preprocessing
    def _class_weight(self, num_classes: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """MONAI's class-weight rules: None if unset or one class; a [num_classes] tensor else."""
        if self.class_weight is None or num_classes == 1:
            return None
        if self.class_weight.ndim == 0:
            self.class_weight = torch.as_tensor([self.class_weight] * num_classes)
        elif self.class_weight.shape[0] != num_classes:
            raise ValueError(
                "The length of the `weight` sequence should be the same as the number of classes. "
                "If `include_background=False`, the weight should not include the background category class 0.")
        w = self.class_weight
        key = (w.data_ptr(), w._version, w.device)
        if key != self._weight_checked:  # MONAI checks every call; the values only change with the buffer
            if w.min() < 0:
                raise ValueError("the value/values of the `weight` should be no less than 0.")
            self._weight_checked = key
        return w.to(like)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input ``[B, C, *spatial]``, target ``[B, C, *spatial]`` or ``[B, 1, *spatial]`` (labels
        with ``to_onehot_y``) -> the reduced Dice loss (see the class docstring for shapes)."""
        reason = self.fallback_reason or self._dynamic_fallback_reason(input, target)
        if reason is not None:
            if reason is not self.fallback_reason:
                notify_fallback("dualdiff.compat.DiceLoss", reason)
            return self._forward_plain(input, target)
        return self._forward_fused(input, target)

    def _dynamic_fallback_reason(self, input: torch.Tensor, target: torch.Tensor) -> Optional[str]:
        if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
            return None  # let the fused path raise the op's type error
        if input.dtype not in _OP_INPUT_DTYPES:
            return f"input dtype {input.dtype}: the fused op takes float32/float16/bfloat16"
        if input.dim() < 3:
            return "input with fewer than 3 dims: no spatial axis for the fused op"
        if input.numel() == 0:
            return "empty input"
        if target.requires_grad and torch.is_grad_enabled():
            return "target requires grad: the fused op gives the target no gradient"
        return None

    def _activation_warnings(self, n_pred_ch: int) -> None:
        if self.softmax and n_pred_ch == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)

    def _prepare_target(self, target: torch.Tensor, n_pred_ch: int, dtype: torch.dtype) -> torch.Tensor:
        """to_onehot_y (with its warning and ignore_index relabelling), in ``dtype``."""
        if not self.to_onehot_y:
            return target
        if n_pred_ch == 1:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4)
            return target
        if self.ignore_index is not None and (self.ignore_index < 0 or self.ignore_index >= n_pred_ch):
            target = torch.where(target == self.ignore_index, torch.zeros_like(target), target)
        return _one_hot(target, n_pred_ch, dtype)

    def _background_warning(self, n_pred_ch: int) -> None:
        if not self.include_background and n_pred_ch == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=4)

    def _finish(self, f: torch.Tensor, spatial_dims: int) -> torch.Tensor:
        if self.reduction == "mean":
            return f.mean()
        if self.reduction == "sum":
            return f.sum()
        return f.view(list(f.shape[0:2]) + [1] * spatial_dims)

    # ------------------------------------------------------------------ fused path
    def _forward_fused(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n_pred_ch = input.shape[1]
        self._activation_warnings(n_pred_ch)
        original_target = target
        use_mask = self.ignore_index is not None
        if self.other_act is not None or use_mask:
            p = input
            if self.sigmoid:
                p = torch.sigmoid(p)
            elif self.softmax and n_pred_ch > 1:
                p = torch.softmax(p, 1)
            if self.other_act is not None:
                p = self.other_act(p)
            activation = "none"
        else:
            p = input
            activation = "sigmoid" if self.sigmoid else "softmax" if (self.softmax and n_pred_ch > 1) else "none"
        g = self._prepare_target(target, n_pred_ch, torch.uint8 if not use_mask else torch.float32)
        self._background_warning(n_pred_ch)
        c0 = 0 if self.include_background or n_pred_ch == 1 else 1
        if g.shape != p.shape:
            shown_p, shown_g = p[:, c0:], g[:, c0:]
            raise AssertionError(f"ground truth has different shape ({shown_g.shape}) from input ({shown_p.shape})")
        if use_mask:
            mask = _ignore_mask(original_target, self.ignore_index)
            p, g = p * mask, g * mask
        # the dtype MONAI returns: its one-hot target is float32; otherwise input x target promotion
        monai_g_dtype = torch.float32 if g is not target else g.dtype
        out_dtype = torch.promote_types(p.dtype, monai_g_dtype) if monai_g_dtype.is_floating_point else p.dtype
        if p.dtype not in _OP_INPUT_DTYPES:
            p = p.float()
        if g.dtype not in _OP_TARGET_DTYPES:
            g = g.to(torch.float32)
        B, C = p.shape[0], p.shape[1]
        if self.batch:
            p = p.transpose(0, 1).reshape(1, C, -1)
            g = g.transpose(0, 1).reshape(1, C, -1)
        cw = self._class_weight(C - c0, p)
        w = None
        if cw is not None:
            w = torch.cat([cw.new_zeros(c0), cw]).to(torch.float32).expand(p.shape[0], C)
        f = weighted_dice_loss(p, g, w, activation=activation, include_background=c0 == 0,
                               squared_pred=self.squared_pred, smooth_nr=self.smooth_nr,
                               smooth_dr=self.smooth_dr, reduction=self.reduction, backend=self.backend)
        if self.batch and self.reduction == "none":
            f = f[0]  # [C'] like MONAI's batch-reduced f
        if self.reduction == "none":
            f = f.view(list(f.shape[0:2]) + [1] * (input.dim() - 2))
        return f.to(out_dtype)

    # ------------------------------------------------------------------ plain path (MONAI's arithmetic)
    def _forward_plain(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.sigmoid:
            input = torch.sigmoid(input)
        n_pred_ch = input.shape[1]
        self._activation_warnings(n_pred_ch)
        if self.softmax and n_pred_ch > 1:
            input = torch.softmax(input, 1)
        if self.other_act is not None:
            input = self.other_act(input)
        original_target = target
        target = self._prepare_target(target, n_pred_ch, torch.float32)
        self._background_warning(n_pred_ch)
        if not self.include_background and n_pred_ch > 1:
            target, input = target[:, 1:], input[:, 1:]
        mask = _ignore_mask(original_target, self.ignore_index)
        if target.shape != input.shape:
            raise AssertionError(f"ground truth has different shape ({target.shape}) from input ({input.shape})")
        if mask is not None:
            input, target = input * mask, target * mask
        axes = list(range(2, input.dim()))
        if self.batch:
            axes = [0] + axes
        order = 2 if self.squared_pred else 1
        if order == 1 and not self.soft_label:
            tp = torch.sum(input * target, dim=axes)
            fp = torch.sum(input, dim=axes) - tp
            fn = torch.sum(target, dim=axes) - tp
        else:
            norm = torch.linalg.vector_norm
            pred_o = norm(input, ord=order, dim=axes)
            ground_o = norm(target, ord=order, dim=axes)
            diff = norm(input - target, ord=order, dim=axes)
            if order > 1:
                pred_o, ground_o, diff = pred_o ** order, ground_o ** order, diff ** order
            tp = (pred_o + ground_o - diff) / 2
            fp, fn = pred_o - tp, ground_o - tp
        if not self.jaccard:
            fp, fn = fp * 0.5, fn * 0.5
        f = 1 - (2 * tp + self.smooth_nr) / (2 * (tp + fp + fn) + self.smooth_dr)
        cw = self._class_weight(target.shape[1], f)
        if cw is not None:
            f = f * cw
        return self._finish(f, input.dim() - 2)
