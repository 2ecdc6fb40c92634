"""Swap MONAI's ``DiceLoss`` for :class:`dualdiff.compat.DiceLoss` inside an existing script
(Liger-Kernel's ``apply_liger_kernel_to_*`` style), reversibly.

    import dualdiff.patch
    dualdiff.patch.patch_monai_dice()      # before the script builds its losses
    ...                                    # monai.losses.DiceLoss(...) now builds the fused one
    dualdiff.patch.unpatch()               # restores MONAI's class everywhere it was replaced

    with dualdiff.patch.monai_dice_patched():
        loss_fn = monai.losses.DiceLoss(sigmoid=True)   # a dualdiff.compat.DiceLoss

Replaced: ``monai.losses.DiceLoss`` / ``.Dice`` / ``.dice`` (MONAI's aliases), the same names in
the module ``monai.losses.dice`` (so MONAI's own ``DiceCELoss`` / ``DiceFocalLoss`` build the fused Dice
too), and every module-level name in an already imported module that is bound to MONAI's class
(``from monai.losses import DiceLoss`` done before patching). Not replaced: loss objects that
already exist, subclasses of MONAI's class (e.g. ``MaskedDiceLoss``) and references held inside
functions or containers.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

__all__ = ["patch_monai_dice", "unpatch", "monai_dice_patched", "is_patched"]

# (module object, attribute name, original value) for every replacement, in order
_REPLACED: list[tuple[object, str, object]] = []
_ORIGINAL: list[type] = []


def is_patched() -> bool:
    """Whether :func:`patch_monai_dice` is in effect."""
    return bool(_ORIGINAL)


def patch_monai_dice(*, scan_modules: bool = True) -> type:
    """Replace MONAI's DiceLoss with dualdiff.compat.DiceLoss; returns the original class.

    ``scan_modules``: also rebind module-level names already bound to MONAI's class in every
    imported module (``sys.modules``). Patching twice is a no-op. Raises ImportError without MONAI.
    """
    import monai.losses

    # the module, not monai.losses.dice (MONAI binds that name to the DiceLoss alias `dice`)
    monai_dice = sys.modules["monai.losses.dice"]

    from dualdiff.compat.monai import DiceLoss as FusedDice

    if _ORIGINAL:
        return _ORIGINAL[0]
    original = monai_dice.DiceLoss
    _ORIGINAL.append(original)
    targets = {id(monai.losses): monai.losses, id(monai_dice): monai_dice}
    if scan_modules:
        for mod in list(sys.modules.values()):
            if mod is not None and id(mod) not in targets and not getattr(mod, "__name__", "").startswith("dualdiff."):
                targets[id(mod)] = mod
    for mod in targets.values():
        try:
            names = [k for k, v in list(vars(mod).items()) if v is original]
        except TypeError:  # a module without a plain __dict__
            continue
        for name in names:
            _REPLACED.append((mod, name, original))
            setattr(mod, name, FusedDice)
    return original


def unpatch() -> None:
    """Undo :func:`patch_monai_dice`: every replaced name gets MONAI's class back."""
    while _REPLACED:
        mod, name, value = _REPLACED.pop()
        setattr(mod, name, value)
    _ORIGINAL.clear()


@contextlib.contextmanager
def monai_dice_patched(*, scan_modules: bool = True) -> Iterator[type]:
    """Context manager: :func:`patch_monai_dice` on entry, :func:`unpatch` on exit (if this block
    patched; an outer patch stays in effect)."""
    owner = not is_patched()
    original = patch_monai_dice(scan_modules=scan_modules)
    try:
        yield original
    finally:
        if owner:
            unpatch()
