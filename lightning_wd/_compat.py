"""Every private attribute of torch and Lightning that the package reads or writes, in one place.

Each of them has been in every release from the oldest supported one (see ``pyproject.toml``) to the
newest tested; each function here says what it reaches and what it does where that is missing, so a
release that renames one breaks one function, found by the tests of this module, not a code path
deep inside a training run. Nothing here imports Lightning: the trainer objects are read by duck
typing, so the core (engine, functional) can use this module too.

One family of underscored torch names is called where it is used instead: the ``torch._foreach_*``
kernels in ``functional``, the multi-tensor operators that ``torch.optim`` itself is built on. They are
torch's kernel layer rather than an attribute of an object, have the same signatures in every supported
release, and every decay test exercises them on both the oldest and the newest torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

__all__ = [
    "DTENSOR_TYPES",
    "REPLICATE",
    "STRIDED_SHARD_TYPES",
    "backward_skipped",
    "batches_that_stepped",
    "fsdp1_is_flat_view",
    "fsdp1_units",
    "inner_optimizer",
    "keep_step_pre_hook_last",
    "mark_wrapped_by_lr_scheduler",
    "should_update_logs",
    "wrapped_by_lr_scheduler",
]


def _find(*paths: str) -> Any:
    """The first of ``module:attribute`` that imports, else None (torch moved DTensor out of ``_tensor``)."""
    for path in paths:
        module, _, attr = path.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, RuntimeError):  # (RuntimeError: torch built without distributed)
            continue
    return None


#: torch's DTensor class (``torch.distributed.tensor`` since 2.5, ``torch.distributed._tensor`` before).
DTENSOR_TYPES: tuple[type, ...] = tuple(
    c for c in [_find("torch.distributed.tensor:DTensor", "torch.distributed._tensor:DTensor")] if c is not None
)
#: DTensor's ``Replicate`` placement, or None where DTensor is unavailable.
REPLICATE: Any = _find("torch.distributed.tensor:Replicate", "torch.distributed._tensor:Replicate")
#: The placement of a shard with a stride (FSDP2 over tensor parallelism), not a subclass of ``Shard``
#: in recent torch (private, ``placement_types._StridedShard``); empty where torch has none.
STRIDED_SHARD_TYPES: tuple[type, ...] = tuple(
    c for c in [_find("torch.distributed.tensor.placement_types:_StridedShard")] if c is not None
)


def inner_optimizer(optimizer: Any) -> Any:
    """The optimizer that Lightning's ``LightningOptimizer`` or Fabric's ``_FabricOptimizer`` wraps, else None.

    Both keep it in ``_optimizer`` (public ``optimizer`` only on Fabric's); accelerate's
    ``AcceleratedOptimizer`` keeps it in the public ``optimizer``, read by the caller.
    """
    return getattr(optimizer, "_optimizer", None)


def wrapped_by_lr_scheduler(step: Any) -> bool:
    """Whether torch's LR scheduler has wrapped this ``optimizer.step`` (see ``mark_wrapped_by_lr_scheduler``)."""
    return bool(getattr(step, "_wrapped_by_lr_sched", False))


def mark_wrapped_by_lr_scheduler(step: Any) -> None:
    """Mark a replaced ``optimizer.step`` as torch's LR schedulers mark theirs.

    torch's ``LRScheduler`` warns "Seems like `optimizer.step()` has been overridden after learning rate
    scheduler initialization" unless the step carries ``_wrapped_by_lr_sched``; a wrapper that keeps
    counting steps for the scheduler carries it over.
    """
    step._wrapped_by_lr_sched = True


def keep_step_pre_hook_last(optimizer: Any, hook_id: int) -> None:
    """Move the optimizer's step pre-hook ``hook_id`` after every other, so it runs right before the update.

    torch runs the global pre-hooks, then the optimizer's ``_optimizer_step_pre_hooks`` (an ordered
    dict by handle id) in order; a hook registered later would otherwise run after it. Does nothing
    where the dict or the hook is missing.
    """
    hooks = getattr(optimizer, "_optimizer_step_pre_hooks", None)
    if hooks is None or hook_id not in hooks or next(reversed(hooks)) == hook_id:
        return
    hooks.move_to_end(hook_id)


def should_update_logs(trainer: Any) -> bool:
    """Whether the trainer logs at this step (``log_every_n_steps``), as ``self.log`` decides it.

    Reads ``trainer._logger_connector.should_update_logs``; where that is missing, every step logs.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def batches_that_stepped(trainer: Any) -> int:
    """The step Lightning's loggers are given (``fit_loop.epoch_loop._batches_that_stepped``).

    It differs from ``global_step`` under manual optimization with several optimizers (which counts
    each optimizer's steps); where it is missing, ``global_step``.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    value = getattr(loop, "_batches_that_stepped", None)
    return int(trainer.global_step if value is None else value)


def backward_skipped(trainer: Any) -> bool:
    """Whether the fit loop runs steps without backward (``fit_loop._skip_backward``).

    Lightning's ``StochasticWeightAveraging`` sets it for its batch-norm update epoch, in which the
    optimizer still steps once, on the stale gradients of the last real step; False where it is missing.
    """
    return bool(getattr(getattr(trainer, "fit_loop", None), "_skip_backward", False))


def _fsdp1_flat_param(param: Any) -> bool:
    """Whether ``param`` is an FSDP1 ``FlatParameter`` (marked ``_is_flat_param``, or its own class in older torch)."""
    return getattr(param, "_is_flat_param", False) is True or type(param).__name__ == "FlatParameter"


def fsdp1_flattened(param: Any) -> bool:
    """Whether ``param`` is an FSDP1 ``FlatParameter`` or an original parameter that FSDP1 flattened."""
    return getattr(param, "_fsdp_flattened", False) is True or _fsdp1_flat_param(param)


def fsdp1_is_flat_view(param: Any) -> bool:
    """Whether ``param`` is an original parameter that FSDP1 (``use_orig_params=True``) flattened.

    FSDP1 marks such a view ``_fsdp_flattened``; the ``FlatParameter`` itself is marked
    ``_is_flat_param`` in recent torch and is its own class in older releases.
    """
    if getattr(param, "_fsdp_flattened", False) is not True:
        return False
    return not _fsdp1_flat_param(param)


def fsdp1_units(module: Any) -> Iterator[tuple[list[Any], list[Any], Any]]:
    """``(original parameters, their shapes, shard group or None)`` of each FSDP1 unit inside ``module``.

    Reads each module's ``_handle`` (a ``FlatParamHandle``), its ``flat_param``'s ``_params`` and
    ``_shapes``, and the handle's ``process_group`` and ``uses_sharded_strategy`` (the group is None
    for ``NO_SHARD``). Units with ``use_orig_params=False`` keep no original parameters: skipped.
    """
    for mod in module.modules():
        handle: Any = getattr(mod, "_handle", None)
        if type(handle).__name__ != "FlatParamHandle":
            continue
        flat = handle.flat_param
        params = getattr(flat, "_params", None)
        if params is None:
            continue
        yield list(params), list(flat._shapes), handle.process_group if handle.uses_sharded_strategy else None
