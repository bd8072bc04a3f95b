"""Decay kernels and group norms over lists of tensors (pure torch, no Lightning).

Every function takes a list of tensors and works with ``torch._foreach_*`` kernels, so a
whole parameter group costs a handful of kernel launches whatever its number of
tensors. Lists mixing devices or dtypes are correct but slower (and ``apply_decay_`` with a
tensor step needs one device): callers that run every step split them once with
``group_by_device_and_dtype`` and keep the pieces.

Where a single-pass operator exists that foreach kernels lack, a few large tensors (at most 8, or
32k elements each on average, such as a contiguous group's one buffer) are worked on one by one,
and on CPU in blocks that stay in cache: the L1 soft threshold is ``softshrink`` written in place,
the sum of absolute values (``mean_abs``), the engine's cautious mask, its copies of the parameters
and the norm of a logged step go block by block (or tensor by tensor). The
Python calls are then bounded by the tensors' size, not their number; the soft threshold and the
mask give the bits of the foreach paths, and the sum differs from the foreach norm only in the
order of its float32 additions.

A step size may be a Python number or a 0-dim tensor (for example one that depends on
a norm computed on the device, or on an AMP scaler's ``found_inf``): neither forces a
host synchronisation. All in-place functions end in ``_`` and run under ``no_grad``.

Every public function checks its arguments before it touches a tensor, and an in-place one
that refuses its input leaves every tensor as it was. The checks look at classes, dtypes,
devices and shapes (one C-speed pass over the list, never over the elements): a Python step
must be a finite number >= 0, while a tensor step is used as given, because checking its
value would need a host synchronisation.

Sharded tensors (``DTensor``, as FSDP2's ``fully_shard`` and tensor parallelism make them):

* the decay is elementwise, so ``apply_decay_`` and ``cautious_mask`` are given each
  process's local shards (``t.to_local()``, which shares the DTensor's storage) and are exact
  for ``Shard`` and ``Replicate`` placements;
* ``global_norm``, ``mean_abs`` and ``rms`` accept DTensors, plain tensors, or a
  mix of both, and return the value over the *whole* tensors on every process: each process
  reduces its local shards, tensors that share a device mesh and sharded mesh dimensions
  together, and adds up each such partial result with one ``all_reduce`` per sharded mesh
  dimension (never one per tensor). Replicated mesh dimensions and plain tensors (taken as
  the same on every process) are counted once. Every process of the mesh must call them,
  with the same list, in the same order.

Examples:
    >>> import torch, lightning_wd as lwd
    >>> params = [torch.ones(2), torch.full((3,), -2.0)]
    >>> lwd.functional.apply_decay_(params, 0.1)  # p <- p * (1 - 0.1), one foreach kernel
    >>> params
    [tensor([0.9000, 0.9000]), tensor([-1.8000, -1.8000, -1.8000])]
    >>> lwd.functional.global_norm(params)
    tensor(3.3675)
"""

from __future__ import annotations

import ctypes
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from operator import attrgetter, is_
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_wd import _native
from lightning_wd._compat import DTENSOR_TYPES, REPLICATE, STRIDED_SHARD_TYPES

__all__ = [
    "apply_decay_",
    "apply_decay_toward_",
    "cautious_mask",
    "flat_view",
    "global_norm",
    "group_by_device_and_dtype",
    "make_contiguous_",
    "mean_abs",
    "rms",
]

#: A step size: a Python number or a 0-dim tensor.
Step = float | Tensor


if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor


_DTENSOR = DTENSOR_TYPES
_REPLICATE = REPLICATE
_STRIDED_SHARD = STRIDED_SHARD_TYPES

#: How a tensor's elements are spread over processes: ``None`` for a tensor every process holds
#: whole (a plain tensor, or a DTensor replicated on every mesh dimension), else the device mesh and
#: the mesh dimensions its elements are sharded over.
_Layout: TypeAlias = "tuple[DeviceMesh, tuple[int, ...]] | None"

#: The tensor classes almost every list holds (the rest are checked with ``issubclass``).
_PLAIN_CLASSES = frozenset({Tensor, torch.nn.Parameter})
_dtype_of = attrgetter("dtype")
_device_of = attrgetter("device")
_shape_of = attrgetter("shape")


#: What to pass, by argument, in a message refusing a list.
_EXAMPLES = {"mask": "one 0/1 tensor per tensor, such as `cautious_mask(after, before)`"}


def _tensor_list(tensors: Any, argument: str = "tensors") -> list[Tensor]:
    """``tensors`` as a list, or a TypeError naming ``argument`` unless it is a list (any iterable) of tensors.

    The entries are checked by class, one C-speed pass (``set(map(type, ...))``), not a Python loop.
    """
    example = _EXAMPLES.get(argument, "`list(model.parameters())`")
    if isinstance(tensors, (Tensor, str, bytes, Mapping)) or not isinstance(tensors, Iterable):
        hint = " (one tensor: wrap it in a list, `[t]`)" if isinstance(tensors, Tensor) else ""
        raise TypeError(
            f"`{argument}` must be a list of tensors, got {type(tensors).__name__}{hint}. Pass for example {example}."
        )
    out = tensors if type(tensors) is list else list(tensors)
    classes = set(map(type, out))
    if not classes <= _PLAIN_CLASSES and not all(issubclass(c, Tensor) for c in classes):
        i, bad = next((i, t) for i, t in enumerate(out) if not isinstance(t, Tensor))
        raise TypeError(
            f"`{argument}` must be a list of tensors, but `{argument}[{i}]` is {type(bad).__name__} {bad!r:.80}."
            f" Pass tensors only, for example {example}."
        )
    return out


def _float_dtypes(tensors: list[Tensor], argument: str = "tensors") -> set[torch.dtype]:
    """The dtypes of ``tensors`` (one C-speed pass); a TypeError naming ``argument`` unless all are floating point."""
    dtypes = set(map(_dtype_of, tensors))
    if not all(d.is_floating_point for d in dtypes):
        bad = next(d for d in dtypes if not d.is_floating_point)
        i = next(i for i, t in enumerate(tensors) if t.dtype == bad)
        raise TypeError(
            f"`{argument}` must hold floating-point tensors, but `{argument}[{i}]` has dtype {bad}, which a decay"
            " step cannot scale in place. Pass only floating-point tensors, for example"
            " `[p for p in params if p.is_floating_point()]`."
        )
    return dtypes


def _check_step(step: Any) -> None:
    """Refuse a step that is neither a finite Python number >= 0 nor a 0-dim floating-point tensor.

    A tensor step's value is not checked: that would need a host synchronisation.
    """
    cls = type(step)
    if cls is float or cls is int:  # the common case first
        if 0 <= step < math.inf:
            return
    elif isinstance(step, Tensor):
        if step.dim() != 0:
            raise ValueError(
                f"`step` must be a number or a 0-dim tensor, got a tensor of shape {tuple(step.shape)}. Pass one"
                " step size for the whole list, for example `step.reshape(())` or a Python float."
            )
        if not step.is_floating_point():
            raise TypeError(
                f"`step` must be a number or a 0-dim floating-point tensor, got a tensor of dtype {step.dtype}."
                " Pass a floating-point step, for example `step.float()`."
            )
        return
    elif isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(
            f"`step` must be a number >= 0 or a 0-dim floating-point tensor, got {cls.__name__} {step!r:.80}."
            " Pass the step size η·λ as a float, for example step=1e-4 (lr 1e-3 times weight decay 0.1)."
        )
    elif 0 <= step < math.inf:
        return
    raise ValueError(
        f"`step` must be a finite number >= 0, got {step!r} (a negative step grows the tensors, a NaN or"
        " infinite one destroys them). Pass the step size η·λ, for example step=1e-4 (lr 1e-3 times weight"
        " decay 0.1), or 0.0 for no decay."
    )


def _check_numel(numel: Any) -> None:
    if numel is None or (type(numel) is int and numel >= 0):
        return
    if isinstance(numel, bool) or not isinstance(numel, int):
        raise TypeError(
            f"`numel` must be None or an int >= 0, got {type(numel).__name__} {numel!r:.80}. Pass the total element"
            " count, for example `sum(t.numel() for t in tensors)`, or None to have it counted."
        )
    if numel < 0:
        raise ValueError(
            f"`numel` must be an int >= 0, got {numel}. Pass the total element count, for example"
            " `sum(t.numel() for t in tensors)`, or None to have it counted."
        )


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """Split ``tensors`` into lists of one device and dtype each, keeping their order.

    Raises:
        TypeError: if ``tensors`` is not a list of tensors.

    Examples:
        >>> a, b, c = torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.ones(3)
        >>> [[t.shape[0] for t in ts] for ts in group_by_device_and_dtype([a, b, c])]
        [[2, 3], [2]]
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in _tensor_list(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())


def _is_plain(t: Tensor) -> bool:
    return type(t) in (Tensor, torch.nn.Parameter)


@torch.no_grad()
def make_contiguous_(tensors: Sequence[Tensor]) -> Tensor:
    """Move ``tensors`` into one flat buffer, in order; each keeps its identity, shape and values.

    Afterwards every tensor's ``.data`` is a view of the returned buffer, so that an elementwise
    pass over all of them (a decay step) is one kernel over the buffer instead of one per tensor:
    on CPU, where ``torch._foreach_*`` calls the operator once per tensor, that is what brings the
    decay of thousands of small parameters to the speed of one large one. Call it once the
    parameters are on their device (``Module.to`` gives each its own storage again) and before
    the optimizer holds state for them; ``WDMixin`` does it per parameter group
    with ``contiguous_parameters = True``.

    Args:
        tensors: Plain tensors or parameters of one device and dtype (not DTensors), each once.

    Returns:
        The 1-D buffer holding them all.

    Raises:
        TypeError: if ``tensors`` is not a list of tensors.
        ValueError: if ``tensors`` is empty, mixes devices or dtypes, holds a tensor twice, or holds a
            tensor subclass such as a DTensor (whose storage is a shard).

    Examples:
        >>> a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.zeros(3))
        >>> buffer = make_contiguous_([a, b])
        >>> buffer
        tensor([1., 1., 1., 1., 0., 0., 0.])
        >>> buffer.mul_(0.5)[:2]
        tensor([0.5000, 0.5000])
        >>> a
        Parameter containing:
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]], requires_grad=True)
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        raise ValueError("`tensors` is empty; give the parameters to lay out in one buffer.")
    if len(group_by_device_and_dtype(tensors)) > 1:
        raise ValueError(
            "`tensors` mixes devices or dtypes, which one buffer cannot hold. Split them first with"
            " `group_by_device_and_dtype(tensors)` and lay out each list on its own."
        )
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError("`tensors` holds a tensor more than once (a tied parameter?); give each tensor once.")
    odd = [type(t).__name__ for t in tensors if not _is_plain(t)]
    if odd:
        raise ValueError(
            f"`tensors` holds {odd[0]} tensors, whose storage is not theirs alone to move (a DTensor's is a shard)."
            " Give plain tensors or nn.Parameters."
        )
    first = tensors[0]
    buffer = torch.empty(sum(t.numel() for t in tensors), dtype=first.dtype, device=first.device)
    offset = 0
    for t in tensors:
        n = t.numel()
        buffer[offset : offset + n].copy_(t.detach().reshape(-1))
        offset += n
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data = buffer[offset : offset + n].view(t.shape)
        offset += n
    return buffer


def flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """One 1-D view covering ``tensors`` when they lie back to back in one storage, else None.

    True for the parameters laid out by ``make_contiguous_`` (in that order, none replaced
    since); the view shares their memory, so an elementwise in-place operation on it updates
    them all at once.

    Raises:
        TypeError: if ``tensors`` is not a list of tensors.

    Examples:
        >>> buffer = torch.arange(6.0)
        >>> a, b = buffer[:2].view(1, 2), buffer[2:]
        >>> flat_view([a, b]).mul_(10)
        tensor([ 0., 10., 20., 30., 40., 50.])
        >>> flat_view([b, a]) is None, flat_view([a]) is None
        (True, False)
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        return None
    first = tensors[0]
    if not _is_plain(first):
        return None
    storage = first.untyped_storage().data_ptr()
    size = first.element_size()
    end = first.data_ptr()
    for t in tensors:
        if (
            not _is_plain(t)
            or t.dtype != first.dtype
            or t.device != first.device
            or t.data_ptr() != end
            or not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        end += t.numel() * size
    total = (end - first.data_ptr()) // size
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (total,), (1,))


def _on(step: Step, device: torch.device) -> Step:
    return step.to(device, non_blocking=True) if isinstance(step, Tensor) else step


#: Dtypes for which a 0-dim factor of the same dtype multiplies exactly as a Python number does.
_EXACT_FACTOR_DTYPES = (torch.float32, torch.float64)


def _factor(value: float, tensors: list[Tensor], dtypes: set[torch.dtype] | None = None) -> Step:
    """``value`` as a 0-dim tensor where that multiplies ``tensors`` faster, else ``value`` itself.

    On CPU, ``torch._foreach_mul*`` with a Python number wraps it into a new tensor for every
    tensor of the list, which dominates the cost for many small tensors; a 0-dim tensor of the
    list's own dtype is passed as it is, and gives bit-identical results for float32 and float64
    (the number is rounded to that dtype either way). Everywhere else (other devices, reduced
    precisions, which compute with a Python number in float32, mixed dtypes, tensor subclasses)
    the number is kept. ``dtypes``, the set of the tensors' dtypes where the caller has it, saves a
    pass over the list.
    """
    first = tensors[0]
    dtype = first.dtype
    if (
        first.is_cpu
        and dtype in _EXACT_FACTOR_DTYPES
        and type(first) in _PLAIN_CLASSES
        and (len(dtypes) == 1 if dtypes is not None else all(map(is_, map(_dtype_of, tensors), repeat(dtype))))
    ):
        return torch.scalar_tensor(value, dtype=dtype)
    return value


def _add_(tensors: list[Tensor], value: float) -> None:
    """``t += value`` for every tensor; fast on CPU as ``_factor`` explains.

    The ``List`` overload is the one that takes a 0-dim tensor as it is (``Tensor`` would not).
    """
    addend = _factor(value, tensors)
    if isinstance(addend, Tensor):
        torch._foreach_add_(tensors, [addend] * len(tensors))
    else:
        torch._foreach_add_(tensors, addend)


def _check_decay_ord(ord: Any) -> None:
    if type(ord) is not int or ord not in (1, 2):
        raise ValueError(
            f"`ord` must be 1 (L1 soft threshold) or 2 (multiplicative decay), got {type(ord).__name__} {ord!r:.80};"
            " use any of the following: 1, 2."
        )


def _check_mask(mask: Any, tensors: list[Tensor], devices: set[torch.device]) -> list[Tensor]:
    """``mask`` as a list: one non-complex tensor per tensor, of its shape and on its device.

    Adds the tensors' devices to ``devices`` on the way.
    """
    masks = _tensor_list(mask, "mask")
    if len(masks) != len(tensors):
        raise ValueError(
            f"`mask` has {len(masks)} tensors for {len(tensors)} tensors; give one mask per tensor, in the same order"
            " (for example `cautious_mask(after, before)` of the same list)."
        )
    for i, (m, t) in enumerate(zip(masks, tensors, strict=True)):
        if m.shape != t.shape:
            raise ValueError(
                f"`mask[{i}]` has shape {tuple(m.shape)} for a tensor of shape {tuple(t.shape)}; give each mask the"
                " shape of its tensor, in the same order as `tensors`."
            )
        device = t.device
        devices.add(device)
        if m.device != device:
            raise ValueError(
                f"`mask[{i}]` is on {m.device} for a tensor on {t.device}; put each mask on its tensor's device,"
                f" for example `m.to({str(t.device)!r})`."
            )
        if m.is_complex():
            raise TypeError(
                f"`mask[{i}]` has dtype {m.dtype}; a mask holds 0 and 1. Pass a floating-point, integer or bool mask."
            )
    return masks


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

    Every argument is checked before any tensor is touched: a refused call leaves them all as
    they were. The checks cost one C-speed pass over the list's classes and dtypes (and, for a
    tensor step, devices); a mask is checked tensor by tensor.

    Args:
        tensors: Floating-point tensors to decay, modified in place (ideally one device and dtype;
            with a tensor ``step``, one device).
        step: Step size ``η·λ`` (or ``λ`` for lr-independent decay): a finite Python number >= 0,
            or a 0-dim floating-point tensor, which is used as given (its value is not checked:
            that would need a host synchronisation). With ``ord=2`` a step above 1 flips signs.
        ord: 2 for the multiplicative (L2) decay, 1 for the L1 soft threshold.
        mask: Optional 0/1 tensors selecting the coordinates to decay, one per tensor, each of its
            tensor's shape and device.

    Raises:
        TypeError: if ``tensors`` or ``mask`` is not a list of tensors, a tensor is not floating point,
            a mask is complex, or ``step`` is neither a number (bool excluded) nor a floating-point tensor.
        ValueError: if ``step`` is a negative, NaN or infinite number or a tensor of more than 0
            dimensions, ``ord`` is not 1 or 2, ``mask`` does not have one tensor per tensor of the same
            shape and device, or a tensor ``step`` comes with tensors on several devices.

    Examples:
        >>> p = [torch.tensor([1.0, -2.0]), torch.tensor([0.05])]
        >>> apply_decay_(p, 0.1)
        >>> p
        [tensor([ 0.9000, -1.8000]), tensor([0.0450])]
        >>> apply_decay_(p, 0.1, ord=1)
        >>> p
        [tensor([ 0.8000, -1.7000]), tensor([0.])]
        >>> apply_decay_(p, -0.1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: `step` must be a finite number >= 0, got -0.1 (a negative step grows the tensors, ...
        >>> p  # a refused call changes nothing
        [tensor([ 0.8000, -1.7000]), tensor([0.])]
    """
    tensors = _tensor_list(tensors)
    _check_step(step)
    _check_decay_ord(ord)
    devices: set[torch.device] = set()
    masks = None if mask is None else _check_mask(mask, tensors, devices)
    if not tensors:
        return
    dtypes = _float_dtypes(tensors)
    if isinstance(step, Tensor) and not tensors[0].is_cpu:
        # The step is moved to the first tensor's device, which other devices cannot read; a first
        # tensor on the CPU keeps it there, where tensors on any device can.
        if masks is None:
            devices = set(map(_device_of, tensors))
        if len(devices) > 1:
            raise ValueError(
                f"`tensors` spans devices {sorted(map(str, devices))}, but a tensor `step` lives on one. Split the"
                " list with `group_by_device_and_dtype(tensors)` and decay each part, or pass a Python number."
            )
    _apply_decay_(tensors, step, ord, masks, dtypes)


def _apply_decay_(
    tensors: list[Tensor],
    step: Step,
    ord: int,
    mask: list[Tensor] | None,
    dtypes: set[torch.dtype] | None = None,
    numel: int | None = None,
) -> None:
    """``apply_decay_`` without its checks, for callers that have checked their lists once (call under no_grad).

    ``dtypes`` (the set of the tensors' dtypes) and ``numel`` (their element count), where the caller
    has them, save passes over the list.
    """
    if not tensors:
        return
    step = _on(step, tensors[0].device)
    if ord == 1 and not isinstance(step, Tensor) and _exact_dtypes(tensors, dtypes):
        _soft_threshold_(tensors, step, mask, numel)
        return

    if ord == 2:
        if mask is None:
            if isinstance(step, Tensor):
                torch._foreach_mul_(tensors, 1 - step)
            else:
                torch._foreach_mul_(tensors, _factor(1.0 - step, tensors, dtypes))
            return
        # p <- p * (1 - step * m), as 1 + m * (-step): the same bits as -(m * step) + 1, one pass fewer
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
    torch._foreach_mul_(shrunk, mask)
    torch._foreach_add_(tensors, shrunk)


#: Lists of at most this many tensors, or of tensors of at least this many elements on average, are
#: worked on tensor by tensor where a single-pass operator exists that foreach kernels lack: the
#: Python call per tensor is then negligible beside the pass over its memory.
_FEW_TENSORS = 8
_LARGE_TENSOR = 1 << 15
#: Elements per block where large CPU tensors are worked on in blocks: a block's intermediate values
#: stay in cache (1 MiB of float32), and each block costs two to four operator calls of a few µs, so
#: smaller blocks pay more calls than they save. Of 2^16 to 2^19 on the machines of BENCHMARKS.md:
#: 2^18 was 7-12 % faster than 2^17 for the measure and 9 % for the cautious mask on two AMD EPYC
#: machines (512 KiB and 1 MiB of L2 per core), where 2^17 had been the fastest on an Intel Xeon (2 MiB).
_BLOCK = 1 << 18


def _few_large(tensors: Sequence[Tensor], numel: int | None = None) -> bool:
    """Whether ``tensors`` are few (at most 8) or large (32k elements each on average; ``numel``: their
    element count if known, else counted in one C-speed pass): lists worth working on tensor by tensor."""
    count = len(tensors)
    if count <= _FEW_TENSORS:
        return True
    return (numel if numel is not None else sum(map(Tensor.numel, tensors))) >= count * _LARGE_TENSOR


def _exact_dtypes(tensors: list[Tensor], dtypes: set[torch.dtype] | None) -> bool:
    """Whether every tensor is float32 or float64 (where a Python step rounds to the tensors' dtype in every kernel)."""
    found = dtypes if dtypes is not None else set(map(_dtype_of, tensors))
    return found <= set(_EXACT_FACTOR_DTYPES)


def _soft_threshold_(tensors: list[Tensor], step: float, mask: list[Tensor] | None, numel: int | None) -> None:
    """``p <- p - clamp(p, -step, step)`` (= ``sign(p) max(|p| - step, 0)``), or only where ``mask`` is 1.

    Float32 and float64 tensors only (the caller checks): there the step rounds to the tensors' dtype
    in every kernel, so each path gives the bits of ``sign(p) * max(|p| - step, 0)``. A few large
    tensors (a contiguous group's one buffer) take ``softshrink`` written in place: one pass over
    memory; longer lists take three foreach passes (clamp into a new buffer, then subtract).
    """
    if mask is None and _few_large(tensors, numel):
        softshrink = torch.ops.aten.softshrink.out
        for t in tensors:
            softshrink(t, step, out=t)
        return
    clipped = list(torch._foreach_clamp_max(tensors, step))
    torch._foreach_clamp_min_(clipped, -step)
    if mask is not None:
        torch._foreach_mul_(clipped, mask)
    torch._foreach_sub_(tensors, clipped)


def _cautious_kernel(p: Tensor, b: Tensor, step: Tensor, soft: bool) -> None:
    """The cautious mask and decay of one flat tensor in one pass, for ``torch.compile`` (``fused=True``)."""
    moved = (p - b) * b < 0
    decayed = p - torch.clamp(p, -step, step) if soft else p - p * step
    p.copy_(torch.where(moved, decayed, p))


#: Elements per row of ``_abs_sum_kernel``: each row is summed in registers (no cascade of partial
#: sums over the whole tensor, which halves the speed of a compiled 1-D sum on CPU), then the rows.
_ROW = 1 << 12


def _abs_sum_kernel(x: Tensor) -> Tensor:
    """``sum |x|`` of one flat tensor, for ``torch.compile``: its whole rows of ``_ROW`` elements row by row,
    then the last elements, in one call; one read of memory and no scratch (float64 sums in float64, other
    dtypes in float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    whole = x.numel() - x.numel() % _ROW
    return x[:whole].view(-1, _ROW).abs().sum(1, dtype=dtype).sum() + x[whole:].abs().sum(dtype=dtype)


#: ``_cautious_kernel`` and ``_abs_sum_kernel`` compiled on first use; the reason, once compiling one
#: failed (or no C++ compiler was found for a CPU kernel), and whether a ``fused=True`` caller was told.
_FUSED: dict[str, Any] = {"kernel": None, "abs_sum": None, "failed": None, "warned": False}

#: Elements of one device and dtype from which ``fused=None`` (the default) decays a cautious group of a
#: few large CPU tensors, and measures a relative one, by the compiled kernels: 8M (32 MiB of float32).
#: There the cautious kernel saves about 2 passes of a ``mul_`` a step (3 ms on the benchmark machine,
#: BENCHMARKS.md), so its compile (5-12 s once per process there) is repaid within 2,000-4,000 steps;
#: the measure saves about 0.6 of a pass, repaid within 6,000-13,000 steps, and sooner for larger
#: groups. Smaller groups, and other devices, stay on the eager paths unless ``fused=True`` asks.
_AUTO_FUSED_NUMEL = 1 << 23

#: The C++ compilers the CPU kernel can be built with (``torch._inductor``'s choices).
_CXX = ("g++", "c++", "clang++", "cl")


def _fuse_by_default(tensors: Sequence[Tensor], numel: int | None, kernel: str = "kernel") -> bool:
    """Whether ``fused=None`` takes the compiled ``kernel`` (a key of ``_FUSED``) for ``tensors``: at least
    ``_AUTO_FUSED_NUMEL`` elements of a few large CPU tensors, on a machine with a C++ compiler (looked for
    until the kernel is compiled)."""
    if _FUSED["failed"] is not None or tensors[0].device.type != "cpu":
        return False
    total = numel if numel is not None else sum(map(Tensor.numel, tensors))
    if total < _AUTO_FUSED_NUMEL:
        return False
    if _FUSED[kernel] is None and not any(map(shutil.which, _CXX)):
        _FUSED["failed"] = "no C++ compiler found (one of " + ", ".join(_CXX) + ")"
        return False
    return True


def _fused_cautious_(
    tensors: list[Tensor], before: list[Tensor], step: Step, ord: int, numel: int | None = None, warn: bool = True
) -> int:
    """``_cautious_decay_`` of a few large tensors by one compiled kernel each: how many it decayed.

    The kernel reads ``p`` and ``b`` once and writes ``p`` once (the foreach path makes about five
    passes). It is compiled once per process (dynamic shapes; the step is a 0-dim tensor, so a
    schedule does not recompile). Where compiling fails (no C++ compiler on CPU, an unsupported
    device), the tensors not yet decayed are left to the caller's foreach path, for this and every
    later step: none is decayed twice. ``warn`` (``fused=True``): one warning says why, the first time
    a caller that asked for the kernel does not get it; the default ``fused=None`` falls back quietly.
    """
    done = 0
    if _FUSED["failed"] is None and _fusable(tensors, before, numel):
        done = _run_fused(tensors, before, step, ord)
    if warn:
        _warn_unfused("the cautious decay kernel", "the decay continues on the foreach path, with the same result")
    return done


def _warn_unfused(kernel: str, instead: str) -> None:
    """Tell a ``fused=True`` caller, once per process, that compiling failed and why."""
    if _FUSED["failed"] is not None and not _FUSED["warned"]:
        _FUSED["warned"] = True
        warnings.warn(
            f"fused=True could not compile {kernel} with torch.compile ({_FUSED['failed']}); {instead}. Install a"
            " C++ compiler (CPU) or pass fused=False to silence this.",
            UserWarning,
            stacklevel=3,
        )


def _run_fused(tensors: list[Tensor], before: list[Tensor], step: Step, ord: int) -> int:
    """The compiled kernel over each tensor and its copy, until compiling fails: how many it decayed."""
    first = tensors[0]
    opmath = torch.float64 if first.dtype == torch.float64 else torch.float32
    # a copy to the device that does not wait for it (no host synchronisation, as in `_on`)
    size = (step if isinstance(step, Tensor) else torch.tensor(step)).to(first.device, opmath, non_blocking=True)
    for done, (t, b) in enumerate(zip(tensors, before, strict=True)):
        if not t.numel():  # nothing to decay (and no shape worth a compile)
            continue
        try:
            _compiled("kernel", _cautious_kernel)(t.view(-1), b.view(-1), size, ord == 1)
        except Exception as err:  # the compiler's failure: the foreach path decays what is left
            _compile_failed(err)
            return done
    return len(tensors)


def _compiled(key: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` compiled by ``torch.compile`` (dynamic shapes, one graph), once per process: ``_FUSED[key]``."""
    if _FUSED[key] is None:
        _FUSED[key] = torch.compile(kernel, dynamic=True, fullgraph=True)
    return _FUSED[key]


def _compile_failed(err: Exception) -> None:
    """Record why compiling failed (its first line): every later call of either kernel takes the eager path."""
    _FUSED["failed"] = f"{type(err).__name__}: {next(iter(str(err).strip().splitlines()), '')}"


def _fusable(tensors: Sequence[Tensor], before: Sequence[Tensor], numel: int | None) -> bool:
    """Whether ``tensors`` and their copies suit the compiled kernel: a few large contiguous float tensors."""
    dtype, device = tensors[0].dtype, tensors[0].device
    return (
        _few_large(tensors, numel)
        and dtype.is_floating_point
        and all(
            type(t) in _PLAIN_CLASSES and t.dtype == dtype and t.device == device and t.is_contiguous()
            for t in (*tensors, *before)
        )
    )


#: How ``_copies`` copies a few large contiguous CPU tensors: ``"memmove"`` (the C library's), ``"copy_"``
#: (torch's kernel) or ``"stream"`` (``_native``'s copy with non-temporal stores, where it is built),
#: whichever made the fastest of the first copies of at least ``_TIMED_COPY_BYTES`` (``_copy_into``):
#: ``"method"`` for callers that may use ``_native``, ``"plain"`` for those that may not (the faster of
#: the first two); None until chosen, with the seconds per byte of the copies timed so far. No way is
#: faster everywhere: ``memmove`` took 1.6-1.8 passes of a ``mul_`` against 2.1 for torch's on one AMD
#: EPYC machine of BENCHMARKS.md, 2.2-2.4 against 1.8-2.0 on another, where the stream took 1.3-1.5.
#: All give the same bits.
_COPY: dict[str, Any] = {"method": None, "plain": None, "memmove": [], "copy_": [], "stream": []}
_PLAIN_WAYS = ("memmove", "copy_")
_TIMED_COPY_BYTES = 1 << 20
_TIMED_COPIES = 3
_clock = time.perf_counter


def _copy_into(copy: Tensor, t: Tensor, native: bool = True, fresh: bool = False) -> None:
    """``copy[:] = t`` (contiguous CPU tensors of one shape and dtype) by the fastest way of ``_COPY``.

    Until the way is chosen, copies of at least ``_TIMED_COPY_BYTES`` take the ways in turn (the
    stream only with ``native`` and ``_native`` built) and are timed, and once each has been timed
    ``_TIMED_COPIES`` times the way with the shortest time per byte is kept for the process. The copies
    timed are the ones the engine needs, as it makes them in its steps (a copy timed alone, with the
    tensors in cache, favours the wrong way), so choosing costs nothing extra; a copy into ``fresh``
    memory (just allocated: its pages fault in as it is written, several times the copy's own cost) is
    made but not timed. The timings are shared:
    a caller without ``native`` (``fused=False``) chooses between the other two ways for itself and
    leaves the stream to be timed by the first caller that may use it.
    """
    nbytes = t.numel() * t.element_size()
    key = "method" if native else "plain"
    chosen = _COPY[key]
    if chosen is not None or nbytes < _TIMED_COPY_BYTES or fresh:
        _copy_by(chosen or "memmove", copy, t, nbytes)
        return
    ways = (*_PLAIN_WAYS, "stream") if native and _native.library() is not None else _PLAIN_WAYS
    way = min(ways, key=lambda w: len(_COPY[w]))
    start = _clock()
    _copy_by(way, copy, t, nbytes)
    _COPY[way].append((_clock() - start) / nbytes)
    # the plain choice is made from these timings too; a caller without the stream never makes the other
    for key, among in (("plain", _PLAIN_WAYS), ("method", ways if native else None)):
        if among and _COPY[key] is None and all(len(_COPY[w]) >= _TIMED_COPIES for w in among):
            _COPY[key] = min(among, key=lambda w: min(_COPY[w]))


def _copy_by(way: str, copy: Tensor, t: Tensor, nbytes: int) -> None:
    if way == "copy_":
        copy.copy_(t.detach())
    elif way == "stream":
        _native.stream_copy(copy, t, nbytes)
    else:
        ctypes.memmove(copy.data_ptr(), t.data_ptr(), nbytes)


def _copies(
    tensors: list[Tensor], numel: int | None = None, spare: list[Tensor] | None = None, native: bool = True
) -> list[Tensor]:
    """Copies of ``tensors`` (one device and dtype), the same bits.

    Few or large contiguous CPU tensors (``_few_large``) are copied one by one, by the C library's
    ``memmove``, torch's copy kernel or (with ``native``) ``_native``'s streaming copy, whichever
    ``_copy_into`` found the fastest on this machine (they differ by 15-40 % on the machines of
    BENCHMARKS.md). ``spare`` (a list the caller keeps
    from one call to the next) then receives the copies, and the next call copies into those of them
    whose shape and dtype still match instead of allocating: memory freed between steps goes back to
    the C library and often to the kernel, and a new copy would fault every page in again (5x the
    copy's own time for tensors of 16 MiB and more). Others are copied by one foreach kernel, and
    ``spare`` is emptied.
    """
    if _few_large(tensors, numel) and all(
        type(t) in _PLAIN_CLASSES and t.is_cpu and t.is_contiguous() for t in tensors
    ):
        old = spare if spare is not None and len(spare) == len(tensors) else [None] * len(tensors)
        out = []
        for t, copy in zip(tensors, old, strict=True):
            fresh = copy is None or copy.shape != t.shape or copy.dtype != t.dtype or copy.data_ptr() == t.data_ptr()
            if copy is None or fresh:
                copy = torch.empty_like(t, memory_format=torch.contiguous_format)
            if t.numel():  # (an empty tensor may have no address at all)
                _copy_into(copy, t, native, fresh)
            out.append(copy)
        if spare is not None:
            spare[:] = out
        return out
    if spare is not None:
        spare.clear()
    return list(torch._foreach_mul(tensors, _factor(1.0, tensors, {tensors[0].dtype})))


def _cautious_decay_(
    tensors: list[Tensor],
    before: list[Tensor],
    step: Step,
    ord: int,
    fused: bool | None = None,
    numel: int | None = None,
) -> None:
    """Decay only where ``(tensors - before) * before < 0``, using ``before`` as the scratch (it is consumed).

    The engine's cautious step, in fewer passes and one temporary less than ``cautious_mask``
    followed by ``apply_decay_``: ``before`` becomes ``q = sign(min((p - b) b, 0))``, -1 where
    the update moved the coordinate toward zero and 0 elsewhere, and then

    * ``ord=2``: ``p <- p + step * p * q`` (one ``addcmul``: ``p (1 - step)`` where ``q = -1``, to
      the last bit of a fused multiply-add, and ``p`` exactly elsewhere);
    * ``ord=1``: ``p <- p + q * clamp(p, -step, step)`` (the soft threshold where ``q = -1``).

    Few or large (``_few_large``) float32/float64 tensors on CPU are worked on in blocks of 2^18 elements, with two
    scratch blocks instead of a temporary the size of the tensors, and fewer operations: the mask
    ``m = [(p - b) b < 0]`` (1 where ``q = -1``) is formed in a scratch block, and ``p <- p - step * p * m``
    (``p - m * clamp(p, -step, step)`` for ``ord=1``), the same bits as with ``q``: multiplying by -1
    or 1 is exact.

    Unless ``fused`` is False, the same tensors, where ``_native``'s C loops are built, are decayed by one
    loop each instead: one read of each tensor and its copy and one write, the compiled kernel's bits
    (``p - p step``, ``p - clamp(p, -step, step)``). Elsewhere, with ``fused=True``, a few large tensors
    of any floating dtype and device are decayed by one compiled kernel each (``_fused_cautious_``), the
    rest as above; with ``fused=None``, only where ``_fuse_by_default`` says the kernel pays for its
    compile (large CPU groups), quietly falling back.

    Call under no_grad with lists of one device and dtype, checked by the caller.
    """
    if not tensors:
        return
    if _native_ready(tensors, before, numel, fused):
        # one C loop per tensor: one read of it and its copy, one write (the compiled kernel's bits)
        value = float(_on(step, tensors[0].device)) if isinstance(step, Tensor) else step
        for t, b in zip(tensors, before, strict=True):
            if t.numel():
                _native.cautious_(t, b, value, ord == 1)
        return
    if fused or (fused is None and _fuse_by_default(tensors, numel)):
        done = _fused_cautious_(tensors, before, step, ord, numel, warn=bool(fused))
        numel = None if done else numel
        if done == len(tensors):
            return
        tensors, before = tensors[done:], before[done:]
    step = _on(step, tensors[0].device)
    if _in_blocks(tensors, before, numel) and (ord == 2 or not isinstance(step, Tensor)):
        scratch = torch.empty((2, min(_BLOCK, max(map(Tensor.numel, tensors)))), dtype=tensors[0].dtype)
        for t, b in zip(tensors, before, strict=True):
            for block, old in zip(t.view(-1).split(_BLOCK), b.view(-1).split(_BLOCK), strict=True):
                n = block.numel()
                _cautious_block_(block, old, scratch[0, :n], scratch[1, :n], step, ord)
        return
    delta = list(torch._foreach_sub(tensors, before))
    torch._foreach_mul_(before, delta)
    del delta
    torch._foreach_clamp_max_(before, 0.0)
    torch._foreach_sign_(before)
    if ord == 2:
        if isinstance(step, Tensor):
            torch._foreach_mul_(before, step)
            torch._foreach_addcmul_(tensors, tensors, before)
        else:
            torch._foreach_addcmul_(tensors, tensors, before, value=step)
        return
    if isinstance(step, Tensor) or not _exact_dtypes(tensors, None):
        torch._foreach_neg_(before)  # the 0/1 mask of apply_decay_
        _apply_decay_(tensors, step, ord, before)
        return
    clipped = list(torch._foreach_clamp_max(tensors, step))
    torch._foreach_clamp_min_(clipped, -step)
    torch._foreach_addcmul_(tensors, clipped, before)


def _decay_and_square_sum_(
    tensors: list[Tensor],
    step: Step,
    dtypes: set[torch.dtype] | None,
    numel: int | None = None,
    native: bool = True,
) -> Tensor | None:
    """``p <- p (1 - step)`` (``_apply_decay_`` with ``ord=2`` and no mask, the same bits) and ``sum p²`` after it.

    For few or large (``_few_large``) float32/float64 CPU tensors: with ``native`` and the C loops of
    ``_native`` built, one loop per tensor decays and sums (one pass over memory); else the square sum
    is taken block by block right after each block is decayed, while it is in cache (the sum costs
    0.5-0.8 of a pass more). Returns the sum (float32, 0-dim), or None, having changed nothing, for
    other tensors.

    Call under no_grad with lists of one device and dtype, checked by the caller.
    """
    if not tensors or not _in_blocks(tensors, [], numel):
        return None
    factor = 1 - _on(step, tensors[0].device) if isinstance(step, Tensor) else _factor(1.0 - step, tensors, dtypes)
    if native and _native.library() is not None:  # (the tensors are _in_blocks, checked above)
        # one loop decays and sums each tensor: the factor as the tensors' dtype holds it, the same bits
        value = float(factor)
        total = math.fsum(_native.decay_sumsq_(t, value) for t in tensors if t.numel())
        return torch.tensor(total, dtype=torch.float32)
    sums = []
    for t in tensors:
        for block in t.view(-1).split(_BLOCK):
            block.mul_(factor)
            sums.append(torch.dot(block, block))
    return torch.stack(sums).sum().float()


def _in_blocks(tensors: Sequence[Tensor], others: Sequence[Tensor], numel: int | None = None) -> bool:
    """Whether ``tensors`` (and ``others``, one per tensor) are few or large (``_few_large``) contiguous
    float32/float64 CPU tensors."""
    dtype = tensors[0].dtype
    return (
        _few_large(tensors, numel)
        and dtype in _EXACT_FACTOR_DTYPES
        and all(
            type(t) in _PLAIN_CLASSES and t.is_cpu and t.dtype == dtype and t.is_contiguous()
            for t in (*tensors, *others)
        )
    )


def _native_ready(
    tensors: Sequence[Tensor], others: Sequence[Tensor], numel: int | None, fused: bool | None = None
) -> bool:
    """Whether ``_native``'s C loops take ``tensors`` (and ``others``): ``fused`` not False, the tensors
    ``_in_blocks`` (few or large contiguous float32/float64 CPU tensors of one dtype), and the loops built."""
    return fused is not False and bool(tensors) and _in_blocks(tensors, others, numel) and _native.library() is not None


def _cautious_block_(p: Tensor, b: Tensor, mask: Tensor, scratch: Tensor, step: Step, ord: int) -> None:
    """``_cautious_decay_`` of one block ``p`` with its copy ``b`` (read only) and two scratch blocks of its size."""
    torch.sub(p, b, out=mask)
    mask.mul_(b)
    torch.lt(mask, 0.0, out=mask)  # 1.0 where the update moved the coordinate toward zero, else 0.0
    if ord == 2:
        if isinstance(step, Tensor):
            p.addcmul_(p, mask.mul_(step), value=-1.0)
        else:
            p.addcmul_(p, mask, value=-step)
        return
    bound = float(step)  # (ord=1 comes here with a Python step only)
    torch.clamp(p, -bound, bound, out=scratch)
    p.addcmul_(scratch, mask, value=-1.0)


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

    Raises:
        TypeError: if ``after`` or ``before`` is not a list of tensors.
        ValueError: if ``before`` does not have one tensor of the same shape per tensor of ``after``.

    Examples:
        >>> before = [torch.tensor([1.0, 1.0, -1.0, -1.0])]
        >>> after = [torch.tensor([0.5, 1.5, -0.5, -1.5])]
        >>> cautious_mask(after, before)
        [tensor([1., 0., 1., 0.])]
    """
    after, before = _tensor_list(after, "after"), _tensor_list(before, "before")
    if len(before) != len(after):
        raise ValueError(
            f"`before` has {len(before)} tensors for {len(after)} tensors in `after`; give the same parameters, in"
            " the same order, as they were before the optimizer step (for example `[p.detach().clone() for p in"
            " params]` taken just before it)."
        )
    if list(map(_shape_of, after)) != list(map(_shape_of, before)):  # (foreach ops would broadcast)
        i, a, b = next((i, a, b) for i, (a, b) in enumerate(zip(after, before, strict=True)) if a.shape != b.shape)
        raise ValueError(
            f"`before[{i}]` has shape {tuple(b.shape)} but `after[{i}]` has shape {tuple(a.shape)}; give the same"
            " parameters, in the same order, as they were before the optimizer step."
        )
    return _cautious_mask(after, before)


def _cautious_mask(after: list[Tensor], before: list[Tensor]) -> list[Tensor]:
    """``cautious_mask`` without its checks, for callers that have checked their lists (call under no_grad)."""
    delta = list(torch._foreach_sub(after, before))
    torch._foreach_mul_(delta, before)
    torch._foreach_sign_(delta)
    torch._foreach_neg_(delta)
    torch._foreach_clamp_min_(delta, 0.0)
    return delta


def _check_reference(reference: Any, tensors: list[Tensor]) -> list[Tensor]:
    """``reference`` as a list: one tensor per tensor, of its shape, dtype and device."""
    refs = _tensor_list(reference, "reference")
    if len(refs) != len(tensors):
        raise ValueError(
            f"`reference` has {len(refs)} tensors for {len(tensors)} tensors; give one reference per tensor, in the"
            " same order (for example `[p.detach().clone() for p in params]` taken at the start)."
        )
    for i, (r, t) in enumerate(zip(refs, tensors, strict=True)):
        if r.shape != t.shape or r.dtype != t.dtype or r.device != t.device:
            raise ValueError(
                f"`reference[{i}]` is {tuple(r.shape)} {r.dtype} on {r.device} for a tensor {tuple(t.shape)} {t.dtype}"
                f" on {t.device}; give each reference the shape, dtype and device of its tensor, for example"
                " `r.to(t)`."
            )
    return refs


@torch.no_grad()
def apply_decay_toward_(
    tensors: Sequence[Tensor],
    reference: Sequence[Tensor],
    step: Step,
    *,
    ord: Literal[1, 2] = 2,
    mask: Sequence[Tensor] | None = None,
) -> None:
    """Apply one weight-decay step toward reference values ``p0`` instead of toward zero, in place.

    * ``ord=2``: ``p <- p - step * (p - p0)`` (L2-SP, Li et al. 2018: the penalty ``λ/2 ‖p - p0‖²``).
    * ``ord=1``: ``p <- p0 + sign(p - p0) * max(|p - p0| - step, 0)``, the soft threshold of ``p - p0``,
      which puts coordinates that moved less than ``step`` exactly back on ``p0``.

    With ``mask`` (0/1 tensors shaped like ``tensors``), only the coordinates where it is 1 are
    decayed. Every argument is checked before any tensor is touched.

    Args:
        tensors: Floating-point tensors to decay, modified in place.
        reference: One tensor per tensor, of its shape, dtype and device: the values decayed toward.
        step: Step size ``η·λ``: a finite Python number >= 0, or a 0-dim floating-point tensor
            (used as given). With ``ord=2`` a step above 1 overshoots ``p0``.
        ord: 2 for the multiplicative (L2) decay, 1 for the L1 soft threshold.
        mask: Optional 0/1 tensors selecting the coordinates to decay, one per tensor.

    Raises:
        TypeError: as ``apply_decay_``, and if ``reference`` is not a list of tensors.
        ValueError: as ``apply_decay_``, and if ``reference`` does not have one tensor of the same
            shape, dtype and device per tensor.

    Examples:
        >>> p, p0 = [torch.tensor([1.0, -2.0, 0.5])], [torch.tensor([0.0, -1.0, 0.45])]
        >>> apply_decay_toward_(p, p0, 0.5)
        >>> p
        [tensor([ 0.5000, -1.5000,  0.4750])]
        >>> apply_decay_toward_(p, p0, 0.1, ord=1)
        >>> p
        [tensor([ 0.4000, -1.4000,  0.4500])]
    """
    tensors = _tensor_list(tensors)
    _check_step(step)
    _check_decay_ord(ord)
    refs = _check_reference(reference, tensors)
    masks = None if mask is None else _check_mask(mask, tensors, set())
    if not tensors:
        return
    _float_dtypes(tensors)
    if isinstance(step, Tensor) and len(set(map(_device_of, tensors))) > 1:
        raise ValueError(
            "`tensors` spans several devices, but a tensor `step` lives on one. Split the list with"
            " `group_by_device_and_dtype(tensors)` and decay each part, or pass a Python number."
        )
    _apply_decay_toward_(tensors, refs, step, ord, masks)


def _apply_decay_toward_(
    tensors: list[Tensor], reference: list[Tensor], step: Step, ord: int, mask: list[Tensor] | None
) -> None:
    """``apply_decay_toward_`` without its checks (one device and dtype; call under no_grad)."""
    if not tensors:
        return
    step = _on(step, tensors[0].device)
    if ord == 2:
        if mask is not None:
            torch._foreach_lerp_(tensors, reference, list(torch._foreach_mul(mask, step)))
        elif isinstance(step, Tensor):
            torch._foreach_lerp_(tensors, reference, [step.to(tensors[0].dtype)] * len(tensors))
        else:
            torch._foreach_lerp_(tensors, reference, step)  # p + step (p0 - p): no temporary
        return
    # L1: target = p0 + sign(d) * max(|d| - step, 0) with d = p - p0; p <- target (or only where the mask is 1)
    target = list(torch._foreach_sub(tensors, reference))
    shrunk = list(torch._foreach_abs(target))
    if isinstance(step, Tensor):
        torch._foreach_add_(shrunk, step, alpha=-1)
    else:
        _add_(shrunk, -step)
    torch._foreach_clamp_min_(shrunk, 0.0)
    torch._foreach_sign_(target)
    torch._foreach_mul_(target, shrunk)
    torch._foreach_add_(target, reference)
    if mask is None:
        torch._foreach_copy_(tensors, target)
        return
    torch._foreach_sub_(target, tensors)
    torch._foreach_mul_(target, mask)
    torch._foreach_add_(tensors, target)


def _cautious_mask_toward(after: list[Tensor], before: list[Tensor], reference: list[Tensor]) -> list[Tensor]:
    """Coordinates the optimizer's update moved toward ``reference``: ``(after - before) (before - p0) < 0``."""
    delta = list(torch._foreach_sub(after, before))
    torch._foreach_mul_(delta, torch._foreach_sub(before, reference))
    torch._foreach_sign_(delta)
    torch._foreach_neg_(delta)
    torch._foreach_clamp_min_(delta, 0.0)
    return delta


def _angle(before: list[Tensor], after: list[Tensor], layouts: Sequence[_Layout] | None) -> tuple[Tensor, Tensor]:
    """``(‖after - before‖ / ‖before‖, angle between before and after in radians)`` over the whole list.

    The angle is ``2 asin(‖b/‖b‖ - a/‖a‖‖ / 2)``, exact for small angles (``acos`` of the cosine
    loses them to rounding). Reduced-precision tensors are measured in float32.
    """
    before = [t.float() for t in before]
    after = [t.float() for t in after]
    norm_before = _global_norm(before, layouts).clamp_min(torch.finfo(torch.float32).tiny)
    norm_after = _global_norm(after, layouts).clamp_min(torch.finfo(torch.float32).tiny)
    ratio = _global_norm(list(torch._foreach_sub(after, before)), layouts) / norm_before
    unit = list(torch._foreach_mul(before, norm_before.reciprocal()))
    torch._foreach_sub_(unit, torch._foreach_mul(after, norm_after.reciprocal()))
    chord = _global_norm(unit, layouts)
    return ratio, 2 * torch.asin((chord / 2).clamp(max=1.0))


def _is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    return isinstance(t, _DTENSOR)


def _layout(t: Tensor) -> _Layout:
    """The ``_Layout`` of ``t``: the mesh dimensions over which a DTensor's elements are sharded.

    Raises:
        ValueError: if ``t`` is a DTensor with a placement other than ``Shard`` and ``Replicate``
            (a ``Partial`` one holds addends, not elements; norms reduce it first).
    """
    if not _is_dtensor(t):
        return None
    sharded = []
    for dim, placement in enumerate(t.placements):
        if placement.is_shard() or isinstance(placement, _STRIDED_SHARD):
            sharded.append(dim)
        elif not placement.is_replicate():
            raise ValueError(
                f"`tensors` holds a DTensor with placements {tuple(t.placements)}; norms and the decay work on local"
                " shards, which hold the tensor's elements only for Shard and Replicate placements. Redistribute it"
                " first, for example `t.redistribute(placements=[Replicate()])`."
            )
    return (t.device_mesh, tuple(sharded)) if sharded else None


@torch.no_grad()
def _split(tensors: Sequence[Tensor]) -> tuple[Sequence[Tensor], list[_Layout] | None]:
    """Each tensor's local part and ``_Layout`` (None for a list without DTensors).

    A ``Partial`` DTensor is reduced first (one collective for that tensor).
    """
    if not any(issubclass(cls, _DTENSOR) for cls in set(map(type, tensors))):  # (by class: a C-speed pass)
        return tensors, None
    local: list[Tensor] = []
    layouts: list[_Layout] = []
    for t in tensors:
        if _is_dtensor(t):
            if any(p.is_partial() for p in t.placements):
                t = t.redistribute(t.device_mesh, [_REPLICATE() if p.is_partial() else p for p in t.placements])
            layouts.append(_layout(t))
            local.append(t.to_local())
        else:
            local.append(t)
            layouts.append(None)
    return local, layouts


#: Dtypes whose norms are computed in float32.
_NARROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _norms(tensors: Sequence[Tensor], ord: float) -> Tensor:
    """Per-tensor norms of ``tensors`` (any devices and dtypes), as float32 on the first tensor's device."""
    device = tensors[0].device
    # One stack and one copy per device/dtype group, not one copy per tensor. The norm is computed in
    # float32 for float32 and narrower dtypes, and in the tensors' own dtype otherwise (float64: torch
    # refuses to narrow it inside the kernel), then cast.
    parts = [
        (
            torch.stack(torch._foreach_norm(group, ord, dtype=torch.float32))
            if group[0].dtype in _NARROW_DTYPES
            else torch.stack(torch._foreach_norm(group, ord)).float()
        ).to(device, non_blocking=True)
        for group in _by_device_and_dtype(tensors)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """``group_by_device_and_dtype`` with a C-speed test for the common list of one device and dtype."""
    if len(set(map(_dtype_of, tensors))) == 1 and len(set(map(_device_of, tensors))) == 1:
        return [tensors if isinstance(tensors, list) else list(tensors)]
    return group_by_device_and_dtype(tensors)


def _abs_sum(tensors: Sequence[Tensor], fused: bool | None = False) -> Tensor:
    """``sum |x|`` over all elements of ``tensors`` (float32, 0-dim, on the first tensor's device).

    On CPU, the foreach L1 norm reduces element by element, several times slower than a pass over
    memory; few or large float32/float64 tensors (``_few_large``: a contiguous group's buffer, a
    model's weight matrices) are instead summed in blocks that stay in cache: absolute values into
    one scratch block, then the vectorised sum (1.6-2x a ``mul_`` pass, the two operations per block
    costing more than the memory they read), or, unless ``fused`` is False, by ``_native``'s C loop
    where it is built (one read, summed in float64). Elsewhere ``fused`` (as the engine's): ``True``, or
    ``None`` where ``_fuse_by_default`` says it pays, sums few or large contiguous tensors of one floating dtype by
    ``_abs_sum_kernel`` compiled by ``torch.compile`` instead, one call per tensor and one read (about
    one ``mul_`` pass for a few large tensors); where compiling fails, as above. Everything else is
    reduced with the foreach norms.
    """
    if _native_ready(tensors, (), None, fused):  # one C loop per tensor, one read, summed in float64
        looped = math.fsum(_native.abs_sum(t.detach()) for t in tensors if t.numel())
        return torch.tensor(looped, dtype=torch.float32)
    if fused or (fused is None and _fuse_by_default(tensors, None, "abs_sum")):
        total = _fused_abs_sum(tensors) if _FUSED["failed"] is None and _fusable(tensors, (), None) else None
        if fused:
            _warn_unfused("the measure's kernel", "the measure is taken on the eager path, with the same value")
        if total is not None:
            return total
    if not _in_blocks(tensors, ()):
        return _norms(tensors, 1).sum()
    dtype = tensors[0].dtype
    sums = []
    scratch = torch.empty(min(_BLOCK, max(map(Tensor.numel, tensors))), dtype=dtype)
    for t in tensors:
        for block in t.detach().reshape(-1).split(_BLOCK):
            out = scratch[: block.numel()]
            torch.abs(block, out=out)
            sums.append(out.sum())
    return torch.stack(sums).sum().float()


def _fused_abs_sum(tensors: Sequence[Tensor]) -> Tensor | None:
    """``sum |x|`` by the compiled ``_abs_sum_kernel``, one call per tensor, or None where compiling fails
    (recorded in ``_FUSED``: every later call takes the eager path)."""
    sums = []
    try:
        for t in tensors:
            if t.numel():  # (an empty tensor adds nothing, and has no shape worth a compile)
                sums.append(_compiled("abs_sum", _abs_sum_kernel)(t.detach().view(-1)))
    except Exception as err:  # the compiler's failure: the caller measures on the eager path
        _compile_failed(err)
        return None
    if not sums:
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    return torch.stack(sums).sum().float()


def _local_power_sum(tensors: Sequence[Tensor], ord: float, fused: bool | None = False) -> Tensor:
    """``sum |x|^ord`` (``max |x|`` for ``ord=inf``) over the elements of ``tensors`` (float32, 0-dim)."""
    if ord == math.inf:
        # An empty tensor (an empty shard) adds nothing, but has no max: leave it out.
        nonempty = [t for t in tensors if t.numel()]
        if not nonempty:
            return torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        return _norms(nonempty, ord).amax()
    if ord == 1:
        return _abs_sum(tensors, fused)
    norms = _norms(tensors, ord)
    if ord == 2:
        return norms.square().sum()
    return norms.pow(ord).sum()


def _power_sum(
    tensors: Sequence[Tensor], layouts: Sequence[_Layout] | None, ord: float, fused: bool | None = False
) -> Tensor:
    """``sum |x|^ord`` (``max |x|`` for ``ord=inf``) over all elements of the whole tensors.

    ``tensors`` are local parts and ``layouts`` their ``_Layout`` (None: all held whole): the sums
    of tensors that share a layout are added up over each sharded mesh dimension with one
    ``all_reduce``; the result is a float32 0-dim tensor on the first tensor's device, the same on
    every process.
    """
    if layouts is None or not any(layouts):
        return _local_power_sum(tensors, ord, fused)
    by_layout: dict[_Layout, list[Tensor]] = {}
    for t, layout in zip(tensors, layouts, strict=True):
        by_layout.setdefault(layout, []).append(t)
    device = tensors[0].device
    parts = []
    for layout, group in by_layout.items():
        part = _local_power_sum(group, ord, fused)
        if layout is not None:
            mesh, dims = layout
            op = dist.ReduceOp.MAX if ord == math.inf else dist.ReduceOp.SUM
            for dim in dims:
                dist.all_reduce(part, op=op, group=mesh.get_group(dim))
        parts.append(part.to(device, non_blocking=True))
    if len(parts) == 1:
        return parts[0]
    stacked = torch.stack(parts)
    return stacked.amax() if ord == math.inf else stacked.sum()


def _check_ord(ord: float) -> None:
    if isinstance(ord, bool) or not isinstance(ord, (int, float)) or not ord > 0:
        raise ValueError(
            f"`ord` must be a number > 0 (1.0, 2.0, math.inf, ...), got {ord!r}; pass for example ord=2.0 for the"
            " Euclidean norm."
        )


def _root(total: Tensor, ord: float) -> Tensor:
    if ord == math.inf or ord == 1:
        return total
    return total.sqrt() if ord == 2 else total.pow(1.0 / ord)


def _global_norm(tensors: Sequence[Tensor], layouts: Sequence[_Layout] | None, ord: float = 2.0) -> Tensor:
    """``global_norm`` of local parts with their ``_Layout`` (for example sharded updates)."""
    return _root(_power_sum(tensors, layouts, ord), ord)


def _mean_abs(
    tensors: Sequence[Tensor], layouts: Sequence[_Layout] | None, numel: int, fused: bool | None = False
) -> Tensor:
    """``mean_abs`` of local parts with their ``_Layout``; ``numel`` is the whole tensors' count."""
    return _power_sum(tensors, layouts, 1.0, fused) / max(numel, 1)


def _rms(tensors: Sequence[Tensor], layouts: Sequence[_Layout] | None, numel: int) -> Tensor:
    """``rms`` of local parts with their ``_Layout``; ``numel`` is the whole tensors' count."""
    return _power_sum(tensors, layouts, 2.0).div(max(numel, 1)).sqrt()


@torch.no_grad()
def global_norm(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The norm of all elements of ``tensors`` taken together, as a float32 0-dim tensor.

    DTensors count with all their elements on every process (see the module's notes): every
    process of their mesh must call this with the same list.

    Args:
        tensors: The tensors (at least one): plain tensors and DTensors, of any dtype, float64 included.
        ord: Order of the norm, a number > 0 (``2.0`` Euclidean, ``1.0`` sum of absolute values,
            ``math.inf`` largest absolute value).

    Raises:
        TypeError: if ``tensors`` is not a list of tensors.
        ValueError: if ``tensors`` is empty, ``ord`` is not a number > 0, or a DTensor has a placement
            other than Shard, Replicate and Partial.

    Examples:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
        >>> global_norm([torch.tensor([3.0], dtype=torch.float64), torch.tensor([-4.0])], ord=1.0)
        tensor(7.)
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        raise ValueError("`tensors` is empty; a norm needs at least one tensor. Pass at least one tensor.")
    _check_ord(ord)
    return _global_norm(*_split(tensors), ord)


def _numel(tensors: Sequence[Tensor]) -> int:
    return sum(map(Tensor.numel, tensors))  # a DTensor's numel is that of the whole tensor


@torch.no_grad()
def mean_abs(tensors: Sequence[Tensor], numel: int | None = None) -> Tensor:
    """Mean absolute value over all elements of ``tensors`` (float32, 0-dim).

    DTensors count with all their elements on every process, as in ``global_norm``.

    Args:
        tensors: The tensors (at least one): plain tensors and DTensors, float64 included.
        numel: Total element count (an int >= 0), of the whole tensors, if known (saves a Python pass
            over the list).

    Raises:
        TypeError: if ``tensors`` is not a list of tensors, or ``numel`` is not None or an int (bool excluded).
        ValueError: if ``tensors`` is empty, ``numel`` is negative, or a DTensor has a placement other than
            Shard, Replicate and Partial.

    Examples:
        >>> mean_abs([torch.tensor([1.0, -3.0]), torch.tensor([2.0])])
        tensor(2.)
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        raise ValueError("`tensors` is empty; a mean needs at least one tensor. Pass at least one tensor.")
    _check_numel(numel)
    return _mean_abs(*_split(tensors), numel if numel is not None else _numel(tensors))


@torch.no_grad()
def rms(tensors: Sequence[Tensor], numel: int | None = None) -> Tensor:
    """Root mean square over all elements of ``tensors`` (float32, 0-dim).

    DTensors count with all their elements on every process, as in ``global_norm``.

    Args:
        tensors: The tensors (at least one): plain tensors and DTensors, float64 included.
        numel: Total element count (an int >= 0), of the whole tensors, if known (saves a Python pass
            over the list).

    Raises:
        TypeError: if ``tensors`` is not a list of tensors, or ``numel`` is not None or an int (bool excluded).
        ValueError: if ``tensors`` is empty, ``numel`` is negative, or a DTensor has a placement other than
            Shard, Replicate and Partial.

    Examples:
        >>> rms([torch.tensor([3.0]), torch.tensor([-4.0, 0.0, 0.0])])
        tensor(2.5000)
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        raise ValueError("`tensors` is empty; a mean needs at least one tensor. Pass at least one tensor.")
    _check_numel(numel)
    return _rms(*_split(tensors), numel if numel is not None else _numel(tensors))
