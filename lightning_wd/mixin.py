"""``WDMixin``: a ``configure_optimizers`` built from declarative decay rules."""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lightning_wd.functional import group_by_device_and_dtype, make_contiguous_
from lightning_wd.plan import DecayPlan, PlanError, _check_plan_options, _check_rules
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
    if "weight_decay" not in keywords:
        return None, ""
    try:  # LightningCLI fills in the optimizer's own defaults: only a value the user chose is worth a warning
        default = inspect.signature(func).parameters["weight_decay"].default
    except (TypeError, ValueError, KeyError):
        default = inspect.Parameter.empty
    if keywords["weight_decay"] == default:
        return None, ""
    return float(keywords["weight_decay"]), "given to the optimizer"


class WDMixin:
    """Mixin for ``LightningModule`` implementing ``configure_optimizers`` from decay rules.

    Put it before ``LightningModule`` in the bases. It reads, from the instance or the class:

    * ``decay_rules``: a list of :class:`~lightning_wd.DecayRule` in priority order
      (default :func:`lightning_wd.presets.standard`). A class attribute, or the
      ``decay_rules`` init argument, which overrides it (so LightningCLI can set the rules from
      a config file: declare ``decay_rules: list[DecayRule] | None = None`` in your ``__init__``
      and pass it on with ``super().__init__(decay_rules=decay_rules)``).
    * ``optimizer``: a callable taking parameter groups and returning an optimizer
      (LightningCLI's ``OptimizerCallable``); default ``AdamW(lr=1e-3)``.
    * ``scheduler``: optional; a callable taking the optimizer and returning a scheduler
      (LightningCLI's ``LRSchedulerCallable``), or a Lightning scheduler config dict whose
      ``"scheduler"`` is such a callable or a scheduler.
    * ``decay_plan_options``: keyword options for :meth:`DecayPlan.from_module`
      (``include_frozen``, ``strict``, ``merge``, ...); a class attribute or init argument too.
    * ``show_decay_plan``: print the plan table at fit start on rank zero (default True).
    * ``contiguous_parameters``: lay out each parameter group's tensors (per device and dtype) in
      one flat buffer (:func:`lightning_wd.functional.make_contiguous_`), so that
      :class:`~lightning_wd.WeightDecayCallback` decays a group with one kernel instead of one per
      tensor, which matters on CPU for models of many small tensors (default False). Values,
      identities and shapes are unchanged; sharded (DTensor) parameters are left as they are.

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

    decay_rules: Sequence[DecayRule] | None = None
    decay_plan_options: Mapping[str, Any] = {}
    show_decay_plan: bool = True
    contiguous_parameters: bool = False

    def __init__(
        self,
        *args: Any,
        decay_rules: Sequence[DecayRule] | None = None,
        decay_plan_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Pass ``decay_rules`` / ``decay_plan_options`` to override the class attributes.

        Args:
            *args: Passed on to the next class (``LightningModule``).
            decay_rules: Rules in priority order; None keeps the class attribute.
            decay_plan_options: Options for :meth:`DecayPlan.from_module`; None keeps the class attribute.
            **kwargs: Passed on to the next class.

        Raises:
            TypeError: if ``decay_rules`` is not a list of DecayRule or ``decay_plan_options`` not a mapping.
        """
        super().__init__(*args, **kwargs)
        if decay_rules is not None:
            self.decay_rules = list(_check_rules(decay_rules, "decay_rules"))
        if decay_plan_options is not None:
            _check_plan_options(decay_plan_options, "`decay_plan_options`")
            self.decay_plan_options = dict(decay_plan_options)

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
        show = getattr(self, "show_decay_plan", True)
        contiguous = getattr(self, "contiguous_parameters", False)
        for flag, argument in ((show, "show_decay_plan"), (contiguous, "contiguous_parameters")):
            if not isinstance(flag, bool):
                raise TypeError(f"`{argument}` must be True or False, got {type(flag).__name__} {flag!r}. Pass a bool.")
        rules = _resolved(self, "decay_rules")
        options = _resolved(self, "decay_plan_options") or {}
        _check_plan_options(options, "`decay_plan_options`")
        try:
            plan = DecayPlan.from_module(self, None if rules is None else _check_rules(rules, "decay_rules"), **options)
        except PlanError as err:
            raise PlanError(f"{err} (while planning the `decay_rules` of {type(self).__name__})") from err
        groups = plan.param_groups()
        for g in groups:
            g[PLANNED_KEY] = g["weight_decay"]
        optimizer = _call_factory(factory, groups, "optimizer")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`optimizer` returned {type(optimizer).__name__}, not a torch.optim.Optimizer. It must build the"
                " optimizer from the parameter groups it is called with."
            )
        _check_all_planned(optimizer, plan)
        _accept_unnamed_groups(optimizer, self)
        for g in optimizer.param_groups:
            if g.get("lr_scale", 1.0) != 1.0:
                g["lr"] = g["lr"] * g["lr_scale"]
                if "initial_lr" in g:
                    g["initial_lr"] = g["lr"]
        self.decay_plan = plan
        if show:
            rank_zero_info(f"Weight decay plan for {type(self).__name__}:\n{plan.table()}")

        scheduler = getattr(self, "scheduler", None)
        config = (
            optimizer
            if scheduler is None
            else {"optimizer": optimizer, "lr_scheduler": _build_scheduler(scheduler, optimizer)}
        )
        if contiguous:  # last: everything that can fail has been checked
            for group in plan.groups:
                for chunk in group_by_device_and_dtype(group.params):
                    if len(chunk) > 1 and all(type(p) is torch.nn.Parameter for p in chunk):
                        make_contiguous_(chunk)
        return config

    def on_train_start(self) -> None:
        """Give the decay back to the optimizer when a run handed over to the callback resumes without it.

        A checkpoint written with :class:`~lightning_wd.WeightDecayCallback` holds optimizer groups
        whose own ``weight_decay`` is 0 and whose decay is recorded under ``"lwd_weight_decay"``.
        Resumed without the callback, those groups would silently train with no decay at all: the
        recorded value is moved back into the group's ``weight_decay`` (the key removed) and a
        warning says so. This runs after the callbacks' ``on_train_start``, so with the callback
        present nothing changes. Overriding this hook? Call ``super().on_train_start()``.
        """
        parent = getattr(super(), "on_train_start", None)
        if parent is not None:
            parent()
        _hand_back_without_callback(self)


def _hand_back_without_callback(module: Any) -> None:
    from lightning_wd.callback import WD_KEY, WeightDecayCallback

    trainer = getattr(module, "_trainer", None)
    if trainer is None or any(isinstance(cb, WeightDecayCallback) for cb in trainer.callbacks):
        return
    moved: list[str] = []
    for optimizer in trainer.optimizers:
        for index, group in enumerate(optimizer.param_groups):
            if WD_KEY in group:
                group["weight_decay"] = float(group.pop(WD_KEY))
                moved.append(f"{group.get('name', f'pg{index + 1}')}={group['weight_decay']}")
    if moved:
        rank_zero_warn(
            f"The optimizer's parameter groups were restored from a run whose decay WeightDecayCallback applied"
            f" (`{WD_KEY}`), but this trainer has no WeightDecayCallback: without a hand-back they would get no"
            f" decay at all. Their decay is now applied by the optimizer's own `weight_decay` ({', '.join(moved)}),"
            " which is not bitwise the same as the callback's decoupled decay. Add lwd.WeightDecayCallback() to"
            " `Trainer(callbacks=...)` to keep the callback's decay."
        )


def _accept_unnamed_groups(optimizer: Optimizer, module: torch.nn.Module) -> None:
    """Let a group be added later without ``param_names`` (as ``BaseFinetuning.unfreeze_and_add_param_group`` does).

    torch refuses to mix groups with and without ``param_names`` in one optimizer, and the groups built
    here have them; so this optimizer's ``add_param_group`` names the parameters of an unnamed group
    after the module's own names for them before adding it.
    """
    if not any("param_names" in g for g in optimizer.param_groups):
        return
    module_ref = weakref.ref(module)

    def add_param_group(self: Optimizer, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "param_names" not in param_group:
            params = param_group.get("params", [])
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            owner = module_ref()
            names = {} if owner is None else {id(p): n for n, p in owner.named_parameters(remove_duplicate=False)}
            param_group = {
                **param_group,
                "params": params,
                "param_names": [names.get(id(p), f"added.{i}") for i, p in enumerate(params)],
            }
        type(self).add_param_group(self, param_group)

    optimizer.add_param_group = types.MethodType(add_param_group, optimizer)  # type: ignore[method-assign]


def _resolved(module: Any, name: str) -> Any:
    """An attribute set on the instance, or the class attribute when the instance holds None."""
    value = getattr(module, name, None)
    return getattr(type(module), name, None) if value is None else value


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


def _call_factory(factory: Callable[[Any], Any], arg: Any, argument: str) -> Any:
    """``factory(arg)``; a TypeError or ValueError it raises is re-raised naming ``argument``."""
    try:
        return factory(arg)
    except (TypeError, ValueError) as err:
        kind = TypeError if isinstance(err, TypeError) else ValueError
        what = "parameter groups" if argument == "optimizer" else "optimizer"
        raise kind(
            f"`{argument}` raised {type(err).__name__}({err}) when called with the {what}. Make it a callable that"
            f" takes the {what} alone and has valid values for everything else (bind them with functools.partial,"
            " as LightningCLI does)."
        ) from err


def _call_scheduler(factory: Callable[[Optimizer], Any], optimizer: Optimizer) -> Any:
    sched = _call_factory(factory, optimizer, "scheduler")
    if not hasattr(sched, "step"):
        raise TypeError(f"`scheduler` returned {type(sched).__name__}, which has no step(); return an LR scheduler.")
    return sched
