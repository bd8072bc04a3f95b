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
from typing import Literal, Union

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
Step = Union[float, Tensor]


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
                torch._foreach_mul_(tensors, 1.0 - step)
            return
        # p <- p * (1 - step * m)
        factor = torch._foreach_mul(list(mask), step)
        torch._foreach_neg_(factor)
        torch._foreach_add_(factor, 1.0)
        torch._foreach_mul_(tensors, factor)
        return

    # L1: shrunk = max(|p| - step, 0), then p <- sign(p) * shrunk (or only where the mask is 1).
    shrunk = torch._foreach_abs(tensors)
    if isinstance(step, Tensor):
        torch._foreach_add_(shrunk, step, alpha=-1)
    else:
        torch._foreach_add_(shrunk, -step)
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
    parts = []
    for group in group_by_device_and_dtype(tensors):
        norms = torch._foreach_norm(group, ord, dtype=torch.float32)
        parts.extend(n.to(device, non_blocking=True) for n in norms)
    return torch.stack(parts)


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

