"""Decay kernels and group norms over lists of tensors (pure torch, no Lightning).

Every function takes a list of tensors and works with ``torch._foreach_*`` kernels, so a
whole parameter group costs a handful of kernel launches whatever its number of
tensors. Lists mixing devices or dtypes are correct but slower: callers that run every
step split them once with :func:`group_by_device_and_dtype` and keep the pieces.

A step size may be a Python number or a 0-dim tensor (for example one that depends on
a norm computed on the device, or on an AMP scaler's ``found_inf``): neither forces a
host synchronisation. All in-place functions end in ``_`` and run under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, is_
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "apply_decay_",
    "cautious_mask",
    "global_norm",
    "group_by_device_and_dtype",
    "mean_abs",
    "rms",
]

#: A step size: a Python number or a 0-dim tensor.
Step = float | Tensor


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """Split ``tensors`` into lists of one device and dtype each, keeping their order.

    Example::

        >>> a, b, c = torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.ones(3)
        >>> [[t.shape[0] for t in ts] for ts in group_by_device_and_dtype([a, b, c])]
        [[2, 3], [2]]
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())


def _on(step: Step, device: torch.device) -> Step:
    return step.to(device, non_blocking=True) if isinstance(step, Tensor) else step


_dtype_of = attrgetter("dtype")
#: Dtypes for which a 0-dim factor of the same dtype multiplies exactly as a Python number does.
_EXACT_FACTOR_DTYPES = (torch.float32, torch.float64)


def _factor(value: float, tensors: list[Tensor]) -> Step:
    """``value`` as a 0-dim tensor where that multiplies ``tensors`` faster, else ``value`` itself.

    On CPU, ``torch._foreach_mul*`` with a Python number wraps it into a new tensor for every
    tensor of the list, which dominates the cost for many small tensors; a 0-dim tensor of the
    list's own dtype is passed as it is, and gives bit-identical results for float32 and float64
    (the number is rounded to that dtype either way). Everywhere else (other devices, reduced
    precisions, which compute with a Python number in float32, mixed dtypes, tensor subclasses)
    the number is kept.
    """
    first = tensors[0]
    dtype = first.dtype
    if (
        first.is_cpu
        and dtype in _EXACT_FACTOR_DTYPES
        and type(first) in (Tensor, torch.nn.Parameter)
        and all(map(is_, map(_dtype_of, tensors), repeat(dtype)))
    ):
        return torch.scalar_tensor(value, dtype=dtype)
    return value


def _add_(tensors: list[Tensor], value: float) -> None:
    """``t += value`` for every tensor; fast on CPU as :func:`_factor` explains.

    The ``List`` overload is the one that takes a 0-dim tensor as it is (``Tensor`` would not).
    """
    addend = _factor(value, tensors)
    if isinstance(addend, Tensor):
        torch._foreach_add_(tensors, [addend] * len(tensors))
    else:
        torch._foreach_add_(tensors, addend)


@torch.no_grad()
def apply_decay_(
    tensors: Sequence[Tensor],
    step: Step,
    *,
    ord: Literal[1, 2] = 2,
    mask: Sequence[Tensor] | None = None,
) -> None:
    """Apply one weight-decay step in place.

    * ``ord=2`` (multiplicative): ``p <- p * (1 - step)``.
    * ``ord=1`` (proximal L1): ``p <- sign(p) * max(|p| - step, 0)``, the soft threshold,
      which sets small coordinates exactly to zero instead of overshooting.

    With ``mask`` (tensors of 0/1 shaped like ``tensors``), only the coordinates where the
    mask is 1 are decayed; the others are left exactly as they are.

    Args:
        tensors: Tensors to decay, modified in place (ideally one device and dtype).
        step: Step size ``η·λ`` (or ``λ`` for lr-independent decay); a number or a 0-dim tensor.
        ord: 2 for the multiplicative (L2) decay, 1 for the L1 soft threshold.
        mask: Optional 0/1 tensors selecting the coordinates to decay.

    Raises:
        ValueError: if ``ord`` is not 1 or 2, or ``mask`` does not have one tensor per tensor.

    Example::

        >>> p = [torch.tensor([1.0, -2.0]), torch.tensor([0.05])]
        >>> apply_decay_(p, 0.1)
        >>> p
        [tensor([ 0.9000, -1.8000]), tensor([0.0450])]
        >>> apply_decay_(p, 0.1, ord=1)
        >>> p
        [tensor([ 0.8000, -1.7000]), tensor([0.])]
    """
    if ord not in (1, 2):
        raise ValueError(f"`ord` must be 1 (L1 soft threshold) or 2 (multiplicative decay), got {ord!r}.")
    if not tensors:
        return
    tensors = list(tensors)
    if mask is not None and len(mask) != len(tensors):
        raise ValueError(f"`mask` has {len(mask)} tensors for {len(tensors)} tensors; give one mask per tensor.")
    step = _on(step, tensors[0].device)

    if ord == 2:
        if mask is None:
            if isinstance(step, Tensor):
                torch._foreach_mul_(tensors, 1 - step)
            else:
                torch._foreach_mul_(tensors, _factor(1.0 - step, tensors))
            return
        # p <- p * (1 - step * m), as 1 + m * (-step): the same bits as -(m * step) + 1, one pass fewer
        mask = list(mask)
        factor = list(torch._foreach_mul(mask, -step if isinstance(step, Tensor) else _factor(-step, mask)))
        _add_(factor, 1.0)
        torch._foreach_mul_(tensors, factor)
        return

    # L1: shrunk = max(|p| - step, 0), then p <- sign(p) * shrunk (or only where the mask is 1).
    shrunk = list(torch._foreach_abs(tensors))
    if isinstance(step, Tensor):
        torch._foreach_add_(shrunk, step, alpha=-1)
    else:
        _add_(shrunk, -step)
    torch._foreach_clamp_min_(shrunk, 0.0)
    if mask is None:
        torch._foreach_sign_(tensors)
        torch._foreach_mul_(tensors, shrunk)
        return
    # p <- p + m * (sign(p) * shrunk - p)
    signs = torch._foreach_sign(tensors)
    torch._foreach_mul_(shrunk, signs)
    torch._foreach_sub_(shrunk, tensors)
    torch._foreach_mul_(shrunk, list(mask))
    torch._foreach_add_(tensors, shrunk)


@torch.no_grad()
def cautious_mask(after: Sequence[Tensor], before: Sequence[Tensor]) -> list[Tensor]:
    """Coordinates that the optimizer's update moved toward zero.

    ``m = 1`` where ``(after - before) * before < 0`` (the update points against the sign of
    the parameter), else ``0``; ``before`` is the parameter before the optimizer step.

    Args:
        after: Parameters after the optimizer step.
        before: The same parameters before the step.

    Returns:
        New 0/1 tensors shaped and typed like ``after``.

    Example::

        >>> before = [torch.tensor([1.0, 1.0, -1.0, -1.0])]
        >>> after = [torch.tensor([0.5, 1.5, -0.5, -1.5])]
        >>> cautious_mask(after, before)
        [tensor([1., 0., 1., 0.])]
    """
    delta = list(torch._foreach_sub(list(after), list(before)))
    torch._foreach_mul_(delta, list(before))
    torch._foreach_sign_(delta)
    torch._foreach_neg_(delta)
    torch._foreach_clamp_min_(delta, 0.0)
    return delta


def _norms(tensors: Sequence[Tensor], ord: float) -> Tensor:
    """Per-tensor norms of ``tensors`` (any devices and dtypes), as float32 on the first tensor's device."""
    device = tensors[0].device
    # One stack and one copy per device/dtype group, not one copy per tensor.
    parts = [
        torch.stack(torch._foreach_norm(group, ord, dtype=torch.float32)).to(device, non_blocking=True)
        for group in group_by_device_and_dtype(tensors)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def global_norm(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The norm of all elements of ``tensors`` taken together, as a float32 0-dim tensor.

    Args:
        tensors: The tensors (at least one).
        ord: Order of the norm (``2.0`` Euclidean, ``1.0`` sum of absolute values, ``inf`` max).

    Example::

        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if not tensors:
        raise ValueError("`tensors` is empty; a norm needs at least one tensor.")
    return torch.linalg.vector_norm(_norms(tensors, ord), ord)


def _numel(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() for t in tensors)


@torch.no_grad()
def mean_abs(tensors: Sequence[Tensor], numel: int | None = None) -> Tensor:
    """Mean absolute value over all elements of ``tensors`` (float32, 0-dim).

    Args:
        tensors: The tensors (at least one).
        numel: Total element count if known (saves a Python pass over the list).

    Example::

        >>> mean_abs([torch.tensor([1.0, -3.0]), torch.tensor([2.0])])
        tensor(2.)
    """
    if not tensors:
        raise ValueError("`tensors` is empty; a mean needs at least one tensor.")
    return _norms(tensors, 1.0).sum() / max(numel if numel is not None else _numel(tensors), 1)


@torch.no_grad()
def rms(tensors: Sequence[Tensor], numel: int | None = None) -> Tensor:
    """Root mean square over all elements of ``tensors`` (float32, 0-dim).

    Example::

        >>> rms([torch.tensor([3.0]), torch.tensor([-4.0, 0.0, 0.0])])
        tensor(2.5000)
    """
    if not tensors:
        raise ValueError("`tensors` is empty; a mean needs at least one tensor.")
    n = max(numel if numel is not None else _numel(tensors), 1)
    return _norms(tensors, 2.0).square().sum().div(n).sqrt()
