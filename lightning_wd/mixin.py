"""``WDMixin``: a ``configure_optimizers`` built from declarative decay rules."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lightning_wd.plan import DecayPlan
from lightning_wd.rules import DecayRule

__all__ = ["WDMixin"]

#: Key marking a parameter group as built by WDMixin (value: the group's planned weight decay).
PLANNED_KEY = "lwd_planned_weight_decay"

_DEFAULT_OPTIMIZER: Callable[..., Optimizer] = partial(torch.optim.AdamW, lr=1e-3)


def _optimizer_default_wd(factory: Callable[..., Optimizer]) -> tuple[float | None, str]:
    """The weight_decay a factory would use when a group has none, if it is knowable without building."""
    func = factory
    keywords: dict[str, Any] = {}
    while isinstance(func, partial):
        keywords = {**func.keywords, **keywords}
        func = func.func
    if "weight_decay" in keywords:
        return float(keywords["weight_decay"]), "given to the optimizer"
    return None, ""


class WDMixin:
    """Mixin for ``LightningModule`` implementing ``configure_optimizers`` from decay rules.

    Put it before ``LightningModule`` in the bases. It reads, from the instance or the class:

    * ``decay_rules``: a list of :class:`~lightning_wd.DecayRule` in priority order
      (default :func:`lightning_wd.presets.standard`).
    * ``optimizer``: a callable taking parameter groups and returning an optimizer
      (LightningCLI's ``OptimizerCallable``); default ``AdamW(lr=1e-3)``.
    * ``scheduler``: optional; a callable taking the optimizer and returning a scheduler
      (LightningCLI's ``LRSchedulerCallable``), or a Lightning scheduler config dict whose
      ``"scheduler"`` is such a callable or a scheduler.
    * ``decay_plan_options``: keyword options for :meth:`DecayPlan.from_module`
      (``include_frozen``, ``strict``, ``merge``, ...).
    * ``show_decay_plan``: print the plan table at fit start on rank zero (default True).

    Each group keeps ``name``, ``param_names`` and ``weight_decay``; where a rule scales the
    learning rate the group's absolute ``lr`` is written, so torch schedulers work. The
    resolved plan is available as ``self.decay_plan`` after ``configure_optimizers``.

    Example::

        >>> import torch, lightning as L, lightning_wd as lwd
        >>> from functools import partial
        >>> class Model(lwd.WDMixin, L.LightningModule):
        ...     decay_rules = lwd.presets.standard(weight_decay=0.05)
        ...     show_decay_plan = False
        ...     def __init__(self, optimizer=partial(torch.optim.AdamW, lr=3e-4)):
        ...         super().__init__()
        ...         self.optimizer = optimizer
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = Model().configure_optimizers()
        >>> [(g["name"], g["weight_decay"]) for g in opt.param_groups]
        [('no_decay', 0.0), ('decay', 0.05)]
    """

    decay_rules: ClassVar[Sequence[DecayRule] | None] = None
    decay_plan_options: ClassVar[Mapping[str, Any]] = {}
    show_decay_plan: ClassVar[bool] = True

    def configure_optimizers(self) -> Any:
        """Build the optimizer (and scheduler) from ``decay_rules``, ``optimizer`` and ``scheduler``.

        Returns:
            The optimizer, or ``{"optimizer": ..., "lr_scheduler": ...}`` when a scheduler is configured.

        Raises:
            TypeError: if ``optimizer`` or ``scheduler`` is not callable or does not return an
                optimizer/scheduler.
            ValueError: if the plan cannot be built (see :meth:`DecayPlan.from_module`).
        """
        assert isinstance(self, torch.nn.Module)
        factory = getattr(self, "optimizer", None)
        if factory is None:
            factory = _DEFAULT_OPTIMIZER
        if isinstance(factory, Optimizer) or not callable(factory):
            raise TypeError(
                f"`optimizer` must be a callable that takes parameter groups (for example"
                f" functools.partial(torch.optim.AdamW, lr=3e-4)), got {type(factory).__name__} {factory!r}."
            )
        given_wd, _ = _optimizer_default_wd(factory)
        if given_wd:
            rank_zero_warn(
                f"`optimizer` was given weight_decay={given_wd}, but every parameter group built by WDMixin"
                " sets its own weight_decay from `decay_rules`, so that value is ignored. Remove it from the"
                " optimizer and set the decay in the rules."
            )
        options = dict(getattr(self, "decay_plan_options", {}) or {})
        plan = DecayPlan.from_module(self, getattr(self, "decay_rules", None), **options)
        groups = plan.param_groups()
        for g in groups:
            g[PLANNED_KEY] = g["weight_decay"]
        optimizer = factory(groups)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`optimizer` returned {type(optimizer).__name__}, not a torch.optim.Optimizer. It must build the"
                " optimizer from the parameter groups it is called with."
            )
        _check_all_planned(optimizer, plan)
        for g in optimizer.param_groups:
            if g.get("lr_scale", 1.0) != 1.0:
                g["lr"] = g["lr"] * g["lr_scale"]
                if "initial_lr" in g:
                    g["initial_lr"] = g["lr"]
        self.decay_plan = plan
        if getattr(self, "show_decay_plan", True):
            rank_zero_info(f"Weight decay plan for {type(self).__name__}:\n{plan.table()}")

        scheduler = getattr(self, "scheduler", None)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": _build_scheduler(scheduler, optimizer)}


def _check_all_planned(optimizer: Optimizer, plan: DecayPlan) -> None:
    planned = {id(p) for g in plan.groups for p in g.params}
    seen = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = planned - seen
    if missing:
        raise MisconfigurationException(
            f"The optimizer built by `optimizer` holds {len(seen)} parameters but the plan has {len(planned)}:"
            " it dropped some of the parameter groups it was given. Make `optimizer` pass its argument straight"
            " to the optimizer class."
        )


def _build_scheduler(scheduler: Any, optimizer: Optimizer) -> Any:
    if isinstance(scheduler, Mapping):
        config = dict(scheduler)
        inner = config.get("scheduler")
        if inner is None:
            raise ValueError(
                f"`scheduler` config {scheduler!r} has no 'scheduler' key. Use"
                " {'scheduler': callable_or_scheduler, 'interval': 'step', ...} as Lightning does."
            )
        if callable(inner) and not _is_scheduler(inner):
            config["scheduler"] = _call_scheduler(inner, optimizer)
        return config
    if _is_scheduler(scheduler):
        return scheduler
    if callable(scheduler):
        return _call_scheduler(scheduler, optimizer)
    raise TypeError(
        f"`scheduler` must be None, a callable taking the optimizer (for example"
        f" functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=100)) or a Lightning scheduler"
        f" config dict, got {type(scheduler).__name__} {scheduler!r}."
    )


def _is_scheduler(obj: Any) -> bool:
    return not inspect.isclass(obj) and hasattr(obj, "step") and hasattr(obj, "optimizer")


def _call_scheduler(factory: Callable[[Optimizer], Any], optimizer: Optimizer) -> Any:
    sched = factory(optimizer)
    if not hasattr(sched, "step"):
        raise TypeError(f"`scheduler` returned {type(sched).__name__}, which has no step(); return an LR scheduler.")
    return sched
