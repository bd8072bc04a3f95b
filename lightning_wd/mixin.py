"""``WDMixin``: a ``configure_optimizers`` built from declarative decay rules."""

from __future__ import annotations

import inspect
import math
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr
from torch.optim import Optimizer

from lightning_wd import _fsdp
from lightning_wd.engine import migrate_legacy_groups_
from lightning_wd.functional import group_by_device_and_dtype, make_contiguous_
from lightning_wd.plan import PLANNED_KEY, DecayPlan, PlanError, _check_plan_options, _check_rules
from lightning_wd.rules import DecayRule
from lightning_wd.trace import is_sharded

__all__ = ["OptimizerSpec", "WDMixin"]

#: Key under which the plan hands each group's lr scale to ``configure_optimizers`` (removed once applied).
LR_SCALE_KEY = "lwd_lr_scale"

_DEFAULT_OPTIMIZER: Callable[..., Optimizer] = partial(torch.optim.AdamW, lr=1e-3)


def _warn_chosen_wd(factory: Callable[..., Optimizer], argument: str) -> None:
    """Warn that a ``weight_decay`` the user gave ``factory`` is ignored (each group has the rules' λ)."""
    chosen = _chosen_wd(factory)
    if chosen:
        rank_zero_warn(
            f"`{argument}` was given weight_decay={chosen}, but every parameter group built by WDMixin sets its own"
            " weight_decay from the decay rules, so that value is ignored. Remove it from the optimizer and set the"
            " decay in the rules."
        )


def _chosen_wd(factory: Callable[..., Optimizer]) -> float | None:
    """The weight_decay bound in a factory, if the user chose it (not the optimizer's own default)."""
    func = factory
    keywords: dict[str, Any] = {}
    candidates: list[Any] = []
    while isinstance(func, partial):
        keywords = {**func.keywords, **keywords}
        candidates.extend(func.args)  # jsonargparse's partial holds the class as a positional argument
        func = func.func
    if "weight_decay" not in keywords:
        return None
    # LightningCLI fills in the optimizer's own defaults: only a value the user chose is worth a warning
    default = inspect.Parameter.empty
    for candidate in (func, *candidates):
        try:
            default = inspect.signature(candidate).parameters["weight_decay"].default
            break
        except (TypeError, ValueError, KeyError):
            continue
    if keywords["weight_decay"] == default:
        return None
    return float(keywords["weight_decay"])


class WDMixin:
    """Mixin for ``LightningModule`` implementing ``configure_optimizers`` from decay rules.

    Put it before ``LightningModule`` in the bases. It reads, from the instance or the class:

    * ``decay_rules``: a list of ``DecayRule`` in priority order
      (default ``lightning_wd.presets.standard``). A class attribute, or the
      ``decay_rules`` init argument, which overrides it (so LightningCLI can set the rules from
      a config file: declare ``decay_rules: list[DecayRule] | None = None`` in your ``__init__``
      and pass it on with ``super().__init__(decay_rules=decay_rules)``).
    * ``optimizer``: a callable taking parameter groups and returning an optimizer
      (LightningCLI's ``OptimizerCallable``); default ``AdamW(lr=1e-3)``.
    * ``lr`` (or ``learning_rate``): optional, an attribute or hyper-parameter; when set, it is the
      optimizer's learning rate, over the factory's (Lightning's convention: ``Tuner.lr_find`` reads and
      sets it, so the suggested lr is the one the fit uses).
    * ``scheduler``: optional; a callable taking the optimizer and returning a scheduler
      (LightningCLI's ``LRSchedulerCallable``), or a Lightning scheduler config dict whose
      ``"scheduler"`` is such a callable or a scheduler.
    * ``decay_plan_options``: keyword options for ``DecayPlan.from_module``
      (``include_frozen``, ``strict``, ``merge``, ...); a class attribute or init argument too.
    * ``show_decay_plan``: print the plan table at fit start on rank zero (default True).
    * ``trace_roles``: when the module has an ``example_input_array`` (the attribute Lightning's
      ``ModelSummary`` uses), trace one forward pass on it (no grad, on the meta device where
      possible) and take each parameter's role from how it is used, structure deciding only what the
      pass does not touch (default True; set False to decide every role from structure). The plan
      table shows the evidence.
    * ``contiguous_parameters``: lay out each parameter group's tensors (per device and dtype) in
      one flat buffer (``lightning_wd.functional.make_contiguous_``), so that
      ``WeightDecayCallback`` decays a group with one kernel instead of one per
      tensor, which matters on CPU for models of many small tensors (default False). Values,
      identities and shapes are unchanged; sharded (DTensor) parameters are left as they are.

    * ``decay_optimizers``: several optimizers (a GAN's generator and discriminator, a backbone and a
      head), as a mapping from the name you give each to an ``OptimizerSpec`` (its submodules, factory,
      rules and scheduler). Their groups are named ``"<name>/<group>"``, and so are their logged
      metrics (``wd/generator/decay/param_norm``). Each trainable parameter belongs to exactly one.

    Each group keeps ``name``, ``param_names`` and ``weight_decay``; where a rule scales the
    learning rate the group's absolute ``lr`` is written, so torch schedulers work. The
    resolved plan is available as ``self.decay_plan`` after ``configure_optimizers``.

    Examples:
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
    decay_optimizers: Mapping[str, OptimizerSpec] | None = None
    decay_plan: DecayPlan | None
    decay_plans: dict[str, DecayPlan]
    decay_plan_options: Mapping[str, Any] = {}
    show_decay_plan: bool = True
    contiguous_parameters: bool = False
    trace_roles: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse to replace, silently, a ``configure_optimizers`` that another base class defines.

        Raises:
            TypeError: if ``WDMixin`` stands before a base with its own ``configure_optimizers`` and the
                class does not say which one it wants.
        """
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        provider = next((k for k in mro if "configure_optimizers" in k.__dict__), None)
        if provider is not WDMixin:
            return
        shadowed = [
            k
            for k in mro[mro.index(WDMixin) + 1 :]
            if "configure_optimizers" in k.__dict__ and k.__name__ != "LightningModule"
        ]
        if shadowed:
            base = shadowed[0].__name__
            raise TypeError(
                f"`{cls.__name__}` puts WDMixin before {base}, which defines its own `configure_optimizers`:"
                f" WDMixin's would silently replace it (and {base}'s optimizer, lr and scheduler). Say which one you"
                f" want in the class body: `configure_optimizers = lwd.WDMixin.configure_optimizers` to build the"
                f" optimizer from `decay_rules`, `optimizer` and `scheduler`; or"
                f" `configure_optimizers = {base}.configure_optimizers` to keep {base}'s, with"
                " lwd.WeightDecayCallback(rules=...) to decay it."
            )

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
            decay_plan_options: Options for ``DecayPlan.from_module``; None keeps the class attribute.
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

        With ``decay_optimizers``, one optimizer per entry, in its order (``self.optimizers()`` in
        manual optimization returns them in that order).

        Returns:
            The optimizer, or ``{"optimizer": ..., "lr_scheduler": ...}`` when a scheduler is configured;
            with ``decay_optimizers``, a list of those, one per entry.

        Raises:
            TypeError: if ``optimizer`` or ``scheduler`` is not callable or does not return an
                optimizer/scheduler, or ``decay_optimizers`` is not a mapping of names to ``OptimizerSpec``.
            ValueError: if the plan cannot be built (see ``DecayPlan.from_module``), or the entries of
                ``decay_optimizers`` name unknown submodules, share a parameter or leave one out.

        Examples:
            >>> import torch, lightning as L, lightning_wd as lwd
            >>> class Model(lwd.WDMixin, L.LightningModule):
            ...     show_decay_plan = False
            ...     scheduler = staticmethod(lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=10))
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.net = torch.nn.Linear(4, 4)
            >>> config = Model().configure_optimizers()
            >>> sorted(config), [g["name"] for g in config["optimizer"].param_groups]
            (['lr_scheduler', 'optimizer'], ['no_decay', 'decay'])
        """
        assert isinstance(self, torch.nn.Module)
        show = getattr(self, "show_decay_plan", True)
        contiguous = getattr(self, "contiguous_parameters", False)
        for flag, argument in ((show, "show_decay_plan"), (contiguous, "contiguous_parameters")):
            if not isinstance(flag, bool):
                raise TypeError(f"`{argument}` must be True or False, got {type(flag).__name__} {flag!r}. Pass a bool.")
        specs = _resolved(self, "decay_optimizers")
        if specs is None:
            spec = OptimizerSpec(None, getattr(self, "optimizer", None), None, getattr(self, "scheduler", None))
            built = [_Built.make(self, "", spec, list(self.parameters()), [""], _lr_attribute(self))]
            self.decay_plan = built[0].plan
        else:
            parts = _partition(self, _check_specs(specs))
            base_lr = _lr_attribute(self)
            if base_lr is not None and len(parts) > 1:
                rank_zero_warn(
                    f"`lr` is {base_lr}, but `decay_optimizers` builds {len(parts)} optimizers, each with the lr of"
                    " its own `optimizer` factory; `lr` is not used. Set each entry's lr in its factory."
                )
                base_lr = None
            built = []
            for name, spec, ps, prefixes in parts:  # one traced forward pass serves every optimizer's plan
                shared = built[0].plan.trace if built else None
                built.append(_Built.make(self, name, spec, ps, prefixes, base_lr, shared))
            self.decay_plans = {b.name: b.plan for b in built}
            self.decay_plan = built[0].plan if len(built) == 1 else None
        if show:
            for b in built:
                title = f"Weight decay plan for {type(self).__name__}" + (f", optimizer {b.name!r}" if b.name else "")
                rank_zero_info(f"{title}:\n{b.plan.table()}")
        configs = [b.config() for b in built]
        if contiguous:  # last: everything that can fail has been checked
            for b in built:
                for group in b.plan.groups:
                    for chunk in group_by_device_and_dtype(group.params):
                        plain = all(type(p) is torch.nn.Parameter and not _fsdp.is_flat_view(p) for p in chunk)
                        if len(chunk) > 1 and plain:  # (FSDP1's views live in its flat parameters)
                            make_contiguous_(chunk)
        return configs[0] if specs is None else configs

    def __setattr__(self, name: str, value: Any) -> None:
        """Keep the rules when LightningCLI's ``--optimizer`` / ``--lr_scheduler`` replace ``configure_optimizers``.

        LightningCLI builds the optimizer it is given over ``model.parameters()``, one group, and sets its
        own ``configure_optimizers`` on the instance. That optimizer is kept, with every setting the command
        line gave it, but its one group is replaced by the plan's groups before the fit uses it (see
        ``_regroup``), so the rules hold either way.
        """
        if name == "configure_optimizers" and _lightning_cli_override(value) is not None:
            value = types.MethodType(_adopting(value), self)
        super().__setattr__(name, value)

    def on_train_start(self) -> None:
        """Give λ back to ``weight_decay`` in groups restored from a checkpoint of an older release.

        Checkpoints written before each group's λ lived in its own ``weight_decay`` held it under
        ``"lwd_weight_decay"``, with ``weight_decay`` 0. Resumed without
        ``WeightDecayCallback`` (which moves it back itself), those groups would
        silently train with no decay: the value is moved back, with a warning. Overriding this hook?
        Call ``super().on_train_start()``.
        """
        parent = getattr(super(), "on_train_start", None)
        if parent is not None:
            parent()
        trainer = getattr(self, "_trainer", None)
        moved = [m for opt in (trainer.optimizers if trainer is not None else []) for m in migrate_legacy_groups_(opt)]
        if moved:
            rank_zero_warn(
                "The optimizer's parameter groups were restored from a checkpoint that kept their decay under"
                f" `lwd_weight_decay`; it is back in each group's own `weight_decay` ({', '.join(moved)}), which the"
                " optimizer applies itself here. Add lwd.WeightDecayCallback() to `Trainer(callbacks=...)` to apply"
                " it after the step instead."
            )


@dataclass(frozen=True)
class OptimizerSpec:
    """One of several optimizers of a ``WDMixin`` module: which submodules it trains, and how.

    Give them as the module's ``decay_optimizers``, a mapping from the name you choose to a spec. The
    name is the optimizer's in the parameter groups (``"generator/decay"``) and in the logged metrics
    (``wd/generator/decay/param_norm``).

    Args:
        modules: The submodules this optimizer trains: an attribute path (``"generator"``,
            ``"backbone.head"``), a list of them, or None for every trainable parameter that no other
            entry takes (at most one entry). Each trainable parameter must belong to exactly one entry.
        optimizer: A callable taking parameter groups and returning the optimizer (LightningCLI's
            ``OptimizerCallable``); None uses the module's ``optimizer``, else ``AdamW(lr=1e-3)``.
        rules: Decay rules for these parameters; None uses the module's ``decay_rules`` (default
            ``presets.standard()``). The rules are resolved over the whole model, so names, tied
            parameters and ``no_weight_decay()`` hooks are the model's, and the groups keep the
            parameters of ``modules``.
        scheduler: A callable taking the optimizer and returning a scheduler, or a Lightning scheduler
            config dict, as the module's ``scheduler``; None for none.
        plan_options: Options for ``DecayPlan.from_module``; None uses the module's ``decay_plan_options``.

    Raises:
        TypeError: on a value of the wrong type (named in the message).

    Examples:
        >>> import torch, lightning as L, lightning_wd as lwd
        >>> from functools import partial
        >>> class GAN(lwd.WDMixin, L.LightningModule):
        ...     decay_optimizers = {
        ...         "generator": lwd.OptimizerSpec("generator", partial(torch.optim.Adam, lr=2e-4)),
        ...         "discriminator": lwd.OptimizerSpec("discriminator", partial(torch.optim.Adam, lr=1e-4)),
        ...     }
        ...     show_decay_plan = False
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.automatic_optimization = False
        ...         self.generator = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.LayerNorm(4))
        ...         self.discriminator = torch.nn.Linear(4, 1)
        >>> [[g["name"] for g in c.param_groups] for c in GAN().configure_optimizers()]
        [['generator/no_decay', 'generator/decay'], ['discriminator/no_decay', 'discriminator/decay']]
    """

    modules: str | Sequence[str] | None = None
    optimizer: Callable[..., Optimizer] | None = None
    rules: Sequence[DecayRule] | None = None
    scheduler: Any = None
    plan_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        modules = self.modules
        paths = [modules] if isinstance(modules, str) else modules
        if paths is not None and (
            not isinstance(paths, Sequence) or not paths or not all(isinstance(m, str) for m in paths)
        ):
            raise TypeError(
                f"`modules` must be an attribute path of a submodule (such as 'generator'), a non-empty list of them,"
                f" or None for the parameters no other optimizer takes; got {type(modules).__name__} {modules!r}."
            )
        if self.optimizer is not None and (isinstance(self.optimizer, Optimizer) or not callable(self.optimizer)):
            raise TypeError(
                f"`optimizer` must be a callable that takes parameter groups (for example"
                f" functools.partial(torch.optim.Adam, lr=2e-4)) or None, got {type(self.optimizer).__name__}"
                f" {self.optimizer!r}."
            )
        if self.rules is not None:
            object.__setattr__(self, "rules", list(_check_rules(self.rules, "rules")))
        if self.plan_options is not None:
            _check_plan_options(self.plan_options, "`plan_options`")

    @property
    def paths(self) -> list[str] | None:
        """``modules`` as a list of attribute paths (None for the rest)."""
        return [self.modules] if isinstance(self.modules, str) else None if self.modules is None else list(self.modules)


def _check_specs(specs: Any) -> list[tuple[str, OptimizerSpec]]:
    if not isinstance(specs, Mapping) or not specs:
        raise TypeError(
            f"`decay_optimizers` must be a non-empty mapping from the optimizer's name to lwd.OptimizerSpec, such as"
            f" {{'generator': lwd.OptimizerSpec('generator'), 'discriminator': lwd.OptimizerSpec('discriminator')}};"
            f" got {type(specs).__name__} {specs!r}."
        )
    out = []
    for name, spec in specs.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise TypeError(
                f"`decay_optimizers` keys are the optimizers' names (non-empty strings without '/'), got {name!r}."
                " Use a name such as 'generator'."
            )
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(
                f"`decay_optimizers[{name!r}]` must be an lwd.OptimizerSpec, got {type(spec).__name__} {spec!r}."
                f" Write lwd.OptimizerSpec(modules=..., optimizer=..., rules=...)."
            )
        out.append((name, spec))
    rest = [n for n, s in out if s.modules is None]
    if len(rest) > 1:
        raise TypeError(
            f"`decay_optimizers` entries {rest} all have modules=None (the parameters no other entry takes); at most"
            " one can. Give the others their submodules."
        )
    return out


def _partition(
    module: torch.nn.Module, specs: list[tuple[str, OptimizerSpec]]
) -> list[tuple[str, OptimizerSpec, Sequence[torch.Tensor], list[str]]]:
    """Each entry's trainable parameters (by identity, registration order), checked to cover the model once."""
    options = {**(_resolved(module, "decay_plan_options") or {})}
    trainable = [
        (n, p) for n, p in module.named_parameters() if p.requires_grad or options.get("include_frozen", False)
    ]
    owner: dict[int, str] = {}
    chosen: dict[str, set[int]] = {}
    for name, spec in specs:
        if spec.paths is None:
            continue
        ids: set[int] = set()
        for path in spec.paths:
            try:
                sub = module.get_submodule(path)
            except AttributeError:
                children = [n for n, _ in module.named_children()]
                raise ValueError(
                    f"`decay_optimizers[{name!r}]` names submodule {path!r}, which {type(module).__name__} does not"
                    f" have. Use an attribute path such as one of {children}."
                ) from None
            ids.update(id(p) for p in sub.parameters())
        for pname, p in trainable:
            if id(p) in ids and owner.setdefault(id(p), name) != name:
                raise ValueError(
                    f"Parameter {pname!r} belongs to both optimizer {owner[id(p)]!r} and {name!r} in"
                    " `decay_optimizers`: it would be stepped and decayed twice. Give each submodule to one entry"
                    " (a tied weight goes with one of its owners)."
                )
        chosen[name] = ids
    rest = next((n for n, s in specs if s.paths is None), None)
    left = [pname for pname, p in trainable if id(p) not in owner]
    if left and rest is None:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise ValueError(
            f"`decay_optimizers` leaves {len(left)} trainable parameter(s) out of every optimizer ({shown}): they"
            " would never be trained. Add their submodules to an entry, give one entry modules=None (the rest), or"
            " freeze them (requires_grad=False)."
        )
    out: list[tuple[str, OptimizerSpec, Sequence[torch.Tensor], list[str]]] = []
    for name, spec in specs:
        if spec.paths is None:
            params = [p for _, p in trainable if id(p) not in owner]
            prefixes = [""]
        else:
            params = [p for _, p in trainable if owner.get(id(p)) == name]
            prefixes = spec.paths
        if not params:
            raise ValueError(
                f"`decay_optimizers[{name!r}]` has no trainable parameter (modules={spec.modules!r}); torch cannot"
                " build an optimizer over nothing. Remove the entry or give it a submodule with trainable parameters."
            )
        out.append((name, spec, params, prefixes))
    return out


@dataclass
class _Built:
    """One optimizer built from its plan, with its scheduler config."""

    name: str
    plan: DecayPlan
    optimizer: Optimizer
    scheduler: Any

    @classmethod
    def make(
        cls,
        module: torch.nn.Module,
        name: str,
        spec: OptimizerSpec,
        params: Sequence[torch.Tensor] | None,
        prefixes: list[str],
        base_lr: float | None,
        trace: Any = None,
    ) -> _Built:
        where = f"decay_optimizers[{name!r}]." if name else ""
        factory = spec.optimizer or getattr(module, "optimizer", None) or _DEFAULT_OPTIMIZER
        if isinstance(factory, Optimizer) or not callable(factory):
            raise TypeError(
                f"`{where}optimizer` must be a callable that takes parameter groups (for example"
                f" functools.partial(torch.optim.AdamW, lr=3e-4)), got {type(factory).__name__} {factory!r}."
            )
        _warn_chosen_wd(factory, f"{where}optimizer")
        rules = spec.rules if spec.rules is not None else _resolved(module, "decay_rules")
        options = spec.plan_options if spec.plan_options is not None else _resolved(module, "decay_plan_options")
        options = options or {}
        _check_plan_options(options, f"`{where}plan_options`" if name else "`decay_plan_options`")
        try:
            plan = DecayPlan.from_module(
                _planned(module),
                None if rules is None else _check_rules(rules, "decay_rules"),
                **({"trace": trace} if trace is not None else {"example_inputs": _example_inputs(module)}),
                **options,
            )
        except PlanError as err:
            what = f"the rules of optimizer {name!r}" if name else "the `decay_rules`"
            raise PlanError(f"{err} (while planning {what} of {type(module).__name__})") from err
        if params is not None:
            plan = plan._subset(params, prefixes)
        groups = plan.param_groups(lr_scale_key=LR_SCALE_KEY)
        if name:
            for g in groups:
                g["name"] = f"{name}/{g['name']}"
        optimizer = _call_factory(factory, groups, f"{where}optimizer")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`{where}optimizer` returned {type(optimizer).__name__}, not a torch.optim.Optimizer. It must build"
                " the optimizer from the parameter groups it is called with."
            )
        _check_all_planned(optimizer, plan)
        _plan_added_groups(optimizer, module, rules, options, name)
        if base_lr is not None:  # Lightning's convention (the lr finder sets it): it wins over the factory's lr
            optimizer.defaults["lr"] = base_lr
        for g in optimizer.param_groups:
            scale = g.pop(LR_SCALE_KEY, 1.0)
            if base_lr is not None:
                g["lr"] = base_lr
            if scale != 1.0:  # the absolute lr, and no `lr_scale` key that timm's schedulers would apply again
                g["lr"] = g["lr"] * scale
            if "initial_lr" in g:
                g["initial_lr"] = g["lr"]
        scheduler = None if spec.scheduler is None else _build_scheduler(spec.scheduler, optimizer, where)
        return cls(name, plan, optimizer, scheduler)

    def config(self) -> Any:
        return (
            self.optimizer if self.scheduler is None else {"optimizer": self.optimizer, "lr_scheduler": self.scheduler}
        )


def _lightning_cli_override(value: Any) -> tuple[Optimizer, Any] | None:
    """The optimizer and scheduler in a ``configure_optimizers`` that LightningCLI's ``--optimizer`` set, else None."""
    fn = getattr(value, "__func__", None)
    if not isinstance(fn, partial) or not {"optimizer", "lr_scheduler"} <= fn.keywords.keys():
        return None
    optimizer = fn.keywords["optimizer"]
    return (optimizer, fn.keywords["lr_scheduler"]) if isinstance(optimizer, Optimizer) else None


def _adopting(cli_method: Any) -> Callable[[Any], Any]:
    def configure_optimizers(module: Any) -> Any:
        optimizer, scheduler = _lightning_cli_override(cli_method)  # type: ignore[misc]
        _regroup(module, optimizer, scheduler)
        return cli_method()

    return configure_optimizers


def _regroup(module: Any, optimizer: Optimizer, scheduler: Any) -> None:
    """Replace, in place, the one group of an optimizer built over ``module.parameters()`` by the plan's groups.

    The group's settings (lr, betas, and ``initial_lr`` or ``max_lr`` from a scheduler) go to every new
    group, with the rules' λ and lr scale; a scheduler built on the optimizer gets its per-group lists
    (``base_lrs``, ``lr_lambdas``, ...) repeated for the new groups, lr values scaled as their group.

    Raises:
        MisconfigurationException: if the optimizer does not hold exactly the module's parameters in one
            group, or has already stepped.
    """
    specs = _resolved(module, "decay_optimizers")
    if specs is not None:
        raise MisconfigurationException(
            f"LightningCLI's `--optimizer` builds one optimizer over all of {type(module).__name__}'s parameters, but"
            f" its `decay_optimizers` declares {len(specs)} ({', '.join(map(repr, specs))}). Drop `--optimizer` /"
            " `--lr_scheduler` (each OptimizerSpec has its own factory and scheduler), or drop `decay_optimizers`."
        )
    params = list(module.parameters())
    groups = optimizer.param_groups
    if len(groups) != 1 or [id(p) for p in groups[0]["params"]] != [id(p) for p in params] or optimizer.state:
        raise MisconfigurationException(
            f"LightningCLI's optimizer for {type(module).__name__} is not one unused group over the model's parameters,"
            " so WDMixin cannot apply `decay_rules` to it. Give the optimizer to the model instead: declare"
            " `optimizer: OptimizerCallable` in its __init__ and pass `--model.optimizer=...` (config:"
            " model.optimizer), then WDMixin builds it from the rules' groups."
        )
    (original,) = groups
    own = original.get("weight_decay")
    if own is not None:
        _warn_chosen_wd(partial(type(optimizer), weight_decay=own), "--optimizer")  # type: ignore[call-arg]
    rules = _resolved(module, "decay_rules")
    options = _resolved(module, "decay_plan_options") or {}
    plan = DecayPlan.from_module(module, None if rules is None else _check_rules(rules, "decay_rules"), **options)
    settings = {k: v for k, v in original.items() if k != "params"}
    new_groups, scales = [], []
    for g in plan.param_groups(lr_scale_key=LR_SCALE_KEY):
        scale = g.pop(LR_SCALE_KEY)
        merged = {**settings, **g}
        for key, value in settings.items():  # lr, initial_lr, max_lr, min_lr: as the rule scales the group
            if key.endswith("lr") and isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = value * scale
        new_groups.append(merged)
        scales.append(scale)
    optimizer.param_groups.clear()
    for g in new_groups:
        optimizer.add_param_group(g)
    if scheduler is not None:
        _repeat_per_group(scheduler, scales)
    _plan_added_groups(optimizer, module, rules, options, "")
    module.decay_plan = plan
    if getattr(module, "show_decay_plan", True):
        rank_zero_info(f"Weight decay plan for {type(module).__name__} (LightningCLI's optimizer):\n{plan.table()}")


def _repeat_per_group(scheduler: Any, scales: list[float]) -> None:
    """Grow a scheduler's one-entry per-group lists to one entry per group (lr values scaled)."""
    for inner in getattr(scheduler, "_schedulers", None) or []:  # SequentialLR, ChainedScheduler
        _repeat_per_group(inner, scales)
    for key, value in list(vars(scheduler).items()):
        if isinstance(value, list) and len(value) == 1 and key != "_schedulers":
            (only,) = value
            if key.endswith("lrs") and isinstance(only, (int, float)) and not isinstance(only, bool):
                setattr(scheduler, key, [only * s for s in scales])
            else:
                setattr(scheduler, key, [only] * len(scales))


def _plan_added_groups(
    optimizer: Optimizer, module: torch.nn.Module, rules: Any, options: Mapping[str, Any], prefix: str
) -> None:
    """Make groups added during training (``BaseFinetuning.unfreeze_and_add_param_group``) follow the rules.

    This optimizer's ``add_param_group`` splits a group added without its own ``weight_decay`` into one
    group per decay-rule group, each with the rules' λ in its ``weight_decay`` (and lr scale), as
    ``configure_optimizers`` built the first ones; a group given its own ``weight_decay`` is added as it
    is (the user chose its λ). torch refuses to mix groups with and without ``param_names``, and the
    groups built here have them, so the added groups are named after the module's own names.
    """
    module_ref = weakref.ref(module)

    def add_param_group(self: Optimizer, param_group: dict[str, Any]) -> None:
        owner = module_ref()
        if not isinstance(param_group, dict) or owner is None:
            type(self).add_param_group(self, param_group)
            return
        for group in _split_by_rules(owner, self, param_group, rules, options, prefix):
            type(self).add_param_group(self, group)

    optimizer.add_param_group = types.MethodType(add_param_group, optimizer)  # type: ignore[method-assign]


def _split_by_rules(
    module: torch.nn.Module,
    optimizer: Optimizer,
    param_group: dict[str, Any],
    rules: Any,
    options: Mapping[str, Any],
    prefix: str,
) -> list[dict[str, Any]]:
    params = param_group.get("params", [])
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    group = {**param_group, "params": params}
    if "param_names" not in group and any("param_names" in g for g in optimizer.param_groups):
        group["param_names"] = [names.get(id(p), f"added.{i}") for i, p in enumerate(params)]
    if "weight_decay" in param_group or not params:
        return [group]
    first = getattr(module, "decay_plan", None) or next(
        iter((getattr(module, "decay_plans", None) or {}).values()), None
    )
    trace = getattr(first, "trace", None)  # the roles the first groups were planned by
    plan = DecayPlan.from_module(_planned(module), rules, trace=trace, **{**options, "include_frozen": True})
    of = {id(p): g for g in plan.groups for p in g.params}
    label = str(param_group.get("name", f"pg{len(optimizer.param_groups) + 1}"))
    if prefix and not label.startswith(prefix + "/"):
        label = f"{prefix}/{label}"
    split: dict[str, list[torch.Tensor]] = {}
    for p in params:
        planned = of.get(id(p))
        split.setdefault(planned.name if planned is not None else "no_decay", []).append(p)
    by_name = {g.name: g for g in plan.groups}
    lr = param_group.get("lr", optimizer.defaults.get("lr"))
    out = []
    for rule_group, ps in split.items():
        planned = by_name.get(rule_group)
        wd, scale = (planned.weight_decay, planned.lr_scale) if planned is not None else (0.0, 1.0)
        sub = {**group, "params": ps, "name": f"{label}/{rule_group}", "weight_decay": wd, PLANNED_KEY: True}
        if "param_names" in group:
            sub["param_names"] = [names.get(id(p), f"added.{i}") for i, p in enumerate(ps)]
        if scale != 1.0 and lr is not None:
            sub["lr"] = lr * scale
        out.append(sub)
    return out


def _example_inputs(module: Any) -> Any:
    """The module's ``example_input_array`` to trace the roles with, or None when ``trace_roles`` is False
    (or, with a warning, when the module is sharded: it can no longer be traced).

    Raises:
        TypeError: if ``trace_roles`` is not a bool.
    """
    flag = getattr(module, "trace_roles", True)
    if not isinstance(flag, bool):
        raise TypeError(
            f"`trace_roles` must be True or False, got {type(flag).__name__} {flag!r}. Pass a bool: True to take"
            " the roles from a forward pass on `example_input_array`, False to take them from structure."
        )
    inputs = getattr(module, "example_input_array", None) if flag else None
    if inputs is not None and is_sharded(_planned(module)):  # (the wrapper, where there is one, holds the module)
        rank_zero_warn(
            f"{type(module).__name__}'s `example_input_array` is not traced: the module is sharded (FSDP) by the"
            " time configure_optimizers runs, and a forward pass on it would run the sharding's gathers. The"
            " parameters' roles come from structure (module classes, names, shapes). Set `trace_roles = False`"
            " on the module to silence this."
        )
        return None
    return inputs


def _lr_attribute(module: Any) -> float | None:
    """The module's ``lr`` or ``learning_rate`` (attribute or hyper-parameter), as Lightning's lr finder reads it.

    Raises:
        TypeError: if it is set to something other than a finite number > 0.
    """
    for name in ("lr", "learning_rate"):
        if lightning_hasattr(module, name):
            value = lightning_getattr(module, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise TypeError(
                    f"`{name}` must be a finite number > 0 (the optimizer's learning rate, which WDMixin gives every"
                    f" group), got {type(value).__name__} {value!r}. Set it to a float such as 3e-4, or to None to"
                    " use the lr of `optimizer`."
                )
            return float(value)
    return None


def _planned(module: torch.nn.Module) -> torch.nn.Module:
    """What to plan: the module, or the FSDP1 wrapper of it that Lightning's FSDPStrategy made (same names)."""
    trainer = getattr(module, "_trainer", None)
    return _fsdp.wrapper_of(module, getattr(trainer, "model", None) if trainer is not None else None)


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


def _build_scheduler(scheduler: Any, optimizer: Optimizer, where: str = "") -> Any:
    if isinstance(scheduler, Mapping):
        config = dict(scheduler)
        inner = config.get("scheduler")
        if inner is None:
            raise ValueError(
                f"`{where}scheduler` config {scheduler!r} has no 'scheduler' key. Use"
                " {'scheduler': callable_or_scheduler, 'interval': 'step', ...} as Lightning does."
            )
        if callable(inner) and not _is_scheduler(inner):
            config["scheduler"] = _call_scheduler(inner, optimizer, where)
        return config
    if _is_scheduler(scheduler):
        return scheduler
    if callable(scheduler):
        return _call_scheduler(scheduler, optimizer, where)
    raise TypeError(
        f"`{where}scheduler` must be None, a callable taking the optimizer (for example"
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
        what = "parameter groups" if argument.endswith("optimizer") else "optimizer"
        if what == "parameter groups" and "per-parameter options" in str(err):  # torch's LBFGS
            raise kind(
                f"`{argument}` raised {type(err).__name__}({err}): this optimizer takes a single group of"
                " parameters, and WDMixin builds one group per decay value. Build it in your own"
                " configure_optimizers over self.parameters() (with weight_decay=0.0) and pass"
                " WeightDecayCallback(rules=...) to the Trainer: it decays the tensors the rules select, within"
                " that one group."
            ) from err
        raise kind(
            f"`{argument}` raised {type(err).__name__}({err}) when called with the {what}. Make it a callable that"
            f" takes the {what} alone and has valid values for everything else (bind them with functools.partial,"
            " as LightningCLI does)."
        ) from err


def _call_scheduler(factory: Callable[[Optimizer], Any], optimizer: Optimizer, where: str = "") -> Any:
    sched = _call_factory(factory, optimizer, f"{where}scheduler")
    if not hasattr(sched, "step"):
        raise TypeError(
            f"`{where}scheduler` returned {type(sched).__name__}, which has no step(); return an LR scheduler."
        )
    return sched
