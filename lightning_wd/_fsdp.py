"""FSDP1 (``FullyShardedDataParallel`` with ``use_orig_params=True``): shapes and shard groups (pure torch).

With ``use_orig_params=True`` FSDP1 keeps every original ``nn.Parameter``: the same object, under
the same name (behind ``_fsdp_wrapped_module.`` prefixes), held by the same module. Outside the
forward and backward passes, though, its data is a 1-D view of this rank's part of a
``FlatParameter``: possibly empty, of a size that differs by rank, with the flat parameter's padding
outside every view. So:

* a rule sees each tensor as the model does only if it is given back its original shape, which
  the flat parameter records (``_shapes``, in the order of ``_params``): ``original_shapes``
  does that for the duration of planning, and marks each view with its shape for the plan's
  tables;
* the decay is elementwise: applied to each rank's view it is exact, with no communication;
* a norm or a mean over a group adds up each rank's local sums over the handle's process group,
  the *shard* group. With ``HYBRID_SHARD`` each replica group holds the same shards, so the sums
  are never added over the replicas a second time; with ``NO_SHARD`` (or a shard group of one
  process) every rank holds the tensors whole and nothing is reduced. ``layouts`` describes
  this in the functional kernels' terms: a 1-D device mesh over the shard group.

The private attributes of FSDP1 it needs (``_handle``, ``flat_param``, ``_params``, ``_shapes``,
``process_group``, ``uses_sharded_strategy``, ``_fsdp_flattened``) are read in ``_compat``, with the
package's other private reads of torch and Lightning.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_wd._compat import fsdp1_is_flat_view, fsdp1_units

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from lightning_wd.functional import _Layout

#: Attribute that marks each view with its original shape once it has been planned.
SHAPE_ATTR = "_lwd_fsdp_shape"


class ShardInfo(NamedTuple):
    """One original parameter of an FSDP1 flat parameter.

    Attributes:
        shape: The shape the model sees.
        group: The shard process group its elements are spread over, or None where every rank
            holds it whole (``NO_SHARD``, or a shard group of one process).
    """

    shape: tuple[int, ...]
    group: ProcessGroup | None


def is_flat_view(param: Tensor) -> bool:
    """Whether ``param`` is an original parameter that FSDP1 flattened into a ``FlatParameter``."""
    return fsdp1_is_flat_view(param)


def _in_use() -> bool:
    """Whether FSDP1 can have touched any tensor (its package is imported)."""
    return "torch.distributed.fsdp" in sys.modules


def shard_infos(module: nn.Module) -> dict[int, ShardInfo]:
    """``id(param) -> ShardInfo`` for every original parameter of the FSDP1 units inside ``module`` (itself included).

    Units built with ``use_orig_params=False`` have no original parameters and add nothing (their
    flat parameter is a parameter of its own, which the plan refuses).
    """
    out: dict[int, ShardInfo] = {}
    if not _in_use():
        return out
    for params, shapes, group in fsdp1_units(module):
        for param, shape in zip(params, shapes, strict=True):
            out[id(param)] = ShardInfo(tuple(shape), group)
    return out


class Views(NamedTuple):
    """What ``original_shapes`` found: the views it reshaped, and views whose unit is not inside the module."""

    reshaped: int
    unreachable: list[Tensor]


@contextlib.contextmanager
def original_shapes(module: nn.Module, params: Iterable[Tensor]) -> Iterator[Views]:
    """Give every FSDP1 view among ``params`` (tensors of ``module``) its original shape until the block ends.

    Each view's ``.data`` is replaced (as FSDP1 itself does between its sharded and unsharded
    views) by a zero-stride tensor of the original shape on the view's device and dtype, whose
    values mean nothing; identities, names, owners and ``requires_grad`` are unchanged, so rules,
    including predicates that read ``param.ndim`` or ``param.shape``, see the model's tensors.
    The views are back as they were when the block ends, also on an exception. Each view is
    marked with its shape (``SHAPE_ATTR``) for the plan's tables.

    Yields:
        How many views were reshaped, and the views whose FSDP1 unit is not inside ``module``
        (which cannot be reshaped: the unit wraps ``module`` itself, for example).
    """
    views: list[Tensor] = [p for p in params if is_flat_view(p)]
    if not views:
        yield Views(0, [])
        return
    infos = shard_infos(module)
    saved: list[tuple[Tensor, Tensor]] = []
    unreachable: list[Tensor] = []
    try:
        with torch.no_grad():
            for p in views:
                info = infos.get(id(p))
                if info is None:
                    unreachable.append(p)
                    continue
                setattr(p, SHAPE_ATTR, info.shape)
                if tuple(p.shape) != info.shape:
                    saved.append((p, p.data))
                    p.data = p.data.new_zeros(()).expand(info.shape)
        yield Views(len(saved), unreachable)
    finally:
        for p, data in saved:
            p.data = data


def wrapper_of(module: nn.Module, candidate: Any) -> nn.Module:
    """``candidate`` where it is the FSDP1 wrapper of ``module`` itself, else ``module``.

    Lightning's ``FSDPStrategy`` wraps the LightningModule itself, so the unit holding the module's
    own parameters is outside it; planning the wrapper gives the same canonical names and sees
    every unit.
    """
    if not _in_use() or candidate is module:
        return module
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(candidate, FullyShardedDataParallel) and candidate.module is module:
        return candidate
    return module


_MESHES: dict[tuple[int, str], Any] = {}


def _mesh(group: ProcessGroup, device_type: str) -> Any:
    """A 1-D device mesh over ``group`` (made once per group and device type)."""
    from torch.distributed.device_mesh import DeviceMesh

    key = (id(group), device_type)
    mesh = _MESHES.get(key)
    if mesh is None or mesh.get_group(0) is not group:  # (an id reused by a new group)
        mesh = _MESHES[key] = DeviceMesh.from_group(group, device_type)
    return mesh


def _reduction_device_type(group: ProcessGroup, param: Tensor) -> str:
    """Where sums over ``group`` are reduced: the views' device, or the GPU for NCCL (CPU-offloaded views)."""
    return (
        "cuda" if param.device.type == "cpu" and torch.distributed.get_backend(group) == "nccl" else param.device.type
    )


def layouts(params: Iterable[Tensor], infos: dict[int, ShardInfo]) -> list[_Layout] | None:
    """Each tensor's layout for the functional kernels: a view sharded over a group of several processes is
    sharded over a 1-D mesh of that group; anything else is held whole. None when nothing is sharded.

    Raises:
        KeyError: with the view's position, if a view's unit is unknown (not in ``infos``).
    """
    out: list[_Layout] = []
    for i, p in enumerate(params):
        if not is_flat_view(p):
            out.append(None)
            continue
        info = infos.get(id(p))
        if info is None:
            raise KeyError(i)
        group = info.group
        if group is None or group.size() == 1:
            out.append(None)
        else:
            out.append((_mesh(group, _reduction_device_type(group, p)), (0,)))
    return out if any(out) else None


@torch.no_grad()
def reduced_sums(
    tensors: list[Tensor],
    tensor_layouts: list[_Layout],
    group_layouts: list[_Layout],
    power: int,
    device: torch.device,
) -> Tensor:
    """``[sum |x|^power, element count]`` over the whole tensors, from each rank's local parts (float32).

    ``tensor_layouts`` are the layouts of ``tensors``; ``group_layouts`` those of every tensor of the
    group they come from, on every rank the same: each sharded layout among them is reduced with
    one ``all_reduce`` of both numbers, also where this rank has no tensor of it (an empty view has
    no gradient), so that every rank takes part in the same collectives. The count is added up
    with the sums: every rank agrees on it, and padding, outside every view, is never counted.
    """
    from lightning_wd import functional as F

    by_layout: dict[_Layout, list[Tensor]] = {layout: [] for layout in dict.fromkeys([None, *group_layouts])}
    for t, layout in zip(tensors, tensor_layouts, strict=True):
        by_layout[layout].append(t)
    total = torch.zeros(2, dtype=torch.float32, device=device)
    for layout, group in by_layout.items():
        part = torch.zeros(2, dtype=torch.float32, device=device)
        if group:
            part[0] = F._local_power_sum(group, float(power)).to(device)
            part[1] = float(sum(t.numel() for t in group))
        if layout is not None:
            mesh, dims = layout
            if mesh.device_type != device.type:  # CPU-offloaded views under NCCL: reduce on the GPU
                part = part.to(mesh.device_type)
            for dim in dims:
                torch.distributed.all_reduce(part, group=mesh.get_group(dim))
        total += part.to(device)
    return total
