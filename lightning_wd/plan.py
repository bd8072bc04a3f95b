"""Resolve decay rules over a module into a checked, explainable plan (pure torch).

The plan walks the module tree once, in registration order, and records every name
under which each parameter is reachable (its *aliases*), canonicalised: wrapper
prefixes (``_orig_mod.``, DDP's ``module.``, ``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.``) are dropped, and a parametrized tensor
``x.parametrizations.weight.original`` is named ``x.weight`` and owned by ``x``.
Parameters are identified by ``id``; a parameter belongs to the first rule, in list
order, that matches any of its aliases.

A rule's ``lr_scale`` reaches the optimizer exactly once: ``DecayPlan.param_groups`` writes
the absolute ``lr`` (base lr times scale) into each scaled group and never an ``lr_scale`` key,
which timm's schedulers would multiply in a second time; a caller that applies the scale itself
asks for it under a key of its own (``lr_scale_key=``).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import math
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_wd import _fsdp
from lightning_wd.rules import _NAME_CHARS, DecayRule, _check_number, _compile_glob, _has_glob
from lightning_wd.trace import (
    RoleTrace,
    TracedRole,
    TraceError,
    active_trace,
    recording_set_aside,
    trace_roles,
    use_trace,
)

__all__ = ["DecayPlan", "ParamEntry", "PlanGroup", "build_param_groups"]

#: Attribute names under which wrappers hold the wrapped module; dropped from canonical names.
_WRAPPER_ATTRS = frozenset(
    {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module", "_original_module"}
)
#: A raw parametrized name, ``<x.>parametrizations.<tensor>.original[N]``.
_RAW_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original(\d*)$")
#: Wrappers that hold the wrapped module as ``module``.
_MODULE_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"})
#: One planned parameter: the tensor, its (canonical name, owner) aliases, the claiming rule, its group,
#: whether a no-decay convention marked it, and whether a rule set its traced role aside for structure's.
_Record = tuple[nn.Parameter, list[tuple[str, nn.Module]], "str | None", str, bool, bool]

#: Name of the rule that claims parameters marked by the ecosystem's no-decay conventions.
MARKED_RULE = "no_weight_decay"
#: Key marking a parameter group built from a plan: its ``weight_decay`` is the rules' λ, decayed as a whole.
PLANNED_KEY = "lwd_planned"
#: Group that marked parameters land in.
_MARKED_GROUP = "no_decay"


class PlanError(ValueError):
    """A model or rule list from which no sound plan can be built.

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> try:
        ...     lwd.DecayPlan.from_module(torch.nn.LazyLinear(4))
        ... except lwd.PlanError as err:
        ...     print(isinstance(err, ValueError), str(err)[:46])
        True `module` holds an uninitialized lazy parameter
    """


@dataclass(frozen=True)
class ParamEntry:
    """One parameter of the plan.

    Attributes:
        name: Primary canonical name (the first alias in registration order).
        aliases: Every canonical name under which the parameter is reachable.
        owners: Class names of the modules holding the parameter, one per alias.
        shape: Shape as the model sees it.
        rule: Name of the rule that claimed it, or None when it fell to the default group.
        group: Name of the parameter group it lands in.
        marked: Whether a ``_no_weight_decay`` flag or a ``no_weight_decay()`` hook marked it.
        traced: Its role in the forward pass the plan traced (``example_inputs=``), with the uses that
            show it; None when no pass was traced or the pass did not use it.
        trace_set_aside: Whether the rules set that traced role aside for what structure says: a tensor
            structure knows as a table (an embedding module's weight, a free-standing tensor named as an
            embedding or position table) that the forward pass read as a matrix stays a table.

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> plan = lwd.DecayPlan.from_module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
        >>> entry = plan.entry("1.weight")
        >>> entry.group, entry.rule, entry.shape, entry.owners
        ('no_decay', 'normalization', (4,), ('LayerNorm',))
    """

    name: str
    aliases: tuple[str, ...]
    owners: tuple[str, ...]
    shape: tuple[int, ...]
    rule: str | None
    group: str
    marked: bool
    traced: TracedRole | None = None
    trace_set_aside: bool = False

    @property
    def decided_by(self) -> str:
        """``"trace"`` when the traced forward pass gave the parameter its role, else ``"structure"``
        (not traced, or its traced role set aside: ``trace_set_aside``).

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
            >>> plan = lwd.DecayPlan.from_module(model, example_inputs=torch.zeros(1, 4))
            >>> plan.entry("0.weight").decided_by, plan.entry("0.weight").traced.evidence
            ('trace', 'weight of `linear` in 1 call')
        """
        return "trace" if self.traced is not None and not self.trace_set_aside else "structure"


@dataclass(frozen=True)
class PlanGroup:
    """One parameter group of the plan.

    Attributes:
        name: Group name (logging key and optimizer group ``name``).
        weight_decay: λ of the group.
        lr_scale: Learning-rate multiplier of the group.
        rules: Names of the rules whose parameters it holds, in rule order.
        params: The parameters, in registration order.
        param_names: Their primary canonical names.

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> plan = lwd.DecayPlan.from_module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
        >>> group = plan.groups[-1]
        >>> group.name, group.weight_decay, group.rules, group.param_names, group.numel
        ('decay', 0.05, ('linear',), ('0.weight',), 16)
    """

    name: str
    weight_decay: float
    lr_scale: float
    rules: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    param_names: tuple[str, ...]

    @property
    def numel(self) -> int:
        """Number of elements in the group."""
        return sum(_numel(p) for p in self.params)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _shape(param: Tensor) -> tuple[int, ...]:
    ds_shape = getattr(param, "ds_shape", None)
    if ds_shape is None:
        ds_shape = getattr(param, _fsdp.SHAPE_ATTR, None)  # an FSDP1 view, planned (its shape as the model sees it)
    return tuple(ds_shape) if ds_shape is not None else tuple(param.shape)


def _numel(param: Tensor) -> int:
    ds_numel = getattr(param, "ds_numel", None)
    if ds_numel is None and hasattr(param, _fsdp.SHAPE_ATTR):
        return math.prod(getattr(param, _fsdp.SHAPE_ATTR))
    return int(ds_numel) if ds_numel is not None else param.numel()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_HOOKS = (("no_weight_decay", False), ("no_weight_decay_keywords", True))
_HOOK_TYPES: dict[type, tuple[str, ...]] = {}


def _hooks_of(cls: type) -> tuple[str, ...]:
    hooks = _HOOK_TYPES.get(cls)
    if hooks is None:
        hooks = _HOOK_TYPES[cls] = tuple(h for h, _ in _HOOKS if callable(getattr(cls, h, None)))
    return hooks


class _Marks:
    """Names marked no-decay by ``no_weight_decay()`` / ``no_weight_decay_keywords()`` hooks.

    Literal names are kept in a set (a name is marked when it or one of its dotted prefixes is
    there: a hook may name a submodule); globs and keywords, which are few, are scanned.
    """

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.globs: list[re.Pattern[str]] = []
        self.keywords: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.exact or self.globs or self.keywords)

    def add(self, prefix: str, entry: str, keyword: bool) -> None:
        if keyword:
            if _has_glob(entry):
                self.globs.append(_compile_glob(_join(prefix, f"*{entry}*")))
            else:
                self.keywords.append((f"{prefix}." if prefix else "", entry))
        elif _has_glob(entry):
            full = _join(prefix, entry)
            self.globs.append(_compile_glob(full))
            self.globs.append(_compile_glob(full + ".*"))
        else:
            self.exact.add(_join(prefix, entry))

    def match(self, name: str) -> bool:
        exact = self.exact
        if exact:
            if name in exact:
                return True
            cut = name.find(".")
            while cut != -1:
                if name[:cut] in exact:
                    return True
                cut = name.find(".", cut + 1)
        for start, word in self.keywords:
            if name.startswith(start) and word in name[len(start) :]:
                return True
        return any(g.fullmatch(name) for g in self.globs)


class _Frame:
    """One path to one submodule during the walk."""

    __slots__ = ("attr", "module", "parent", "prefix")

    def __init__(self, module: nn.Module, prefix: str, attr: str, parent: _Frame | None) -> None:
        self.module = module
        self.prefix = prefix
        self.attr = attr
        self.parent = parent


def _scan(
    module: nn.Module, marks: _Marks | None
) -> tuple[list[nn.Parameter], dict[int, list[tuple[str, nn.Module]]], bool]:
    """Walk every path to every submodule once, in registration order (as ``named_modules(remove_duplicate=False)``).

    Returns the parameters (first occurrence order); by ``id``, every canonical name under
    which each is reachable with the module holding it; and whether any name was canonicalised
    (a wrapper dropped, a parametrization unwrapped: only then can two tensors share a name).
    Collects hook names into ``marks``.
    """
    renamed = False
    order: list[nn.Parameter] = []
    aliases: dict[int, list[tuple[str, nn.Module]]] = {}
    stack = [_Frame(module, "", "", None)]
    while stack:
        frame = stack.pop()
        mod = frame.module
        prefix = frame.prefix
        children = mod._modules
        if children:
            drop_module = type(mod).__name__ in _MODULE_WRAPPERS
            for attr, child in reversed(children.items()):
                if child is not None:
                    drop = attr in _WRAPPER_ATTRS or (drop_module and attr == "module")
                    renamed = renamed or drop
                    stack.append(_Frame(child, prefix if drop else _join(prefix, attr), attr, frame))

        if marks is not None:
            for hook in _hooks_of(type(mod)):
                _read_hook(mod, hook, prefix, marks)

        params = mod._parameters
        if not params:
            continue
        owner = mod
        holder = frame.parent
        if (
            holder is not None
            and holder.parent is not None
            and holder.attr == "parametrizations"
            and type(mod).__name__ == "ParametrizationList"
        ):
            # <x>.parametrizations.<tensor>.original[N] -> <x>.<tensor>[.originalN], owned by <x>
            owner = holder.parent.module
            base = _join(holder.parent.prefix, frame.attr)
            renamed = True
            named = [(base if pname == "original" else f"{base}.{pname}", p) for pname, p in params.items()]
        else:
            named = [(f"{prefix}.{pname}" if prefix else pname, p) for pname, p in params.items()]
        for canon, param in named:
            if param is None:
                continue
            key = id(param)
            seen = aliases.get(key)
            if seen is not None:
                if all(canon != n for n, _ in seen):
                    seen.append((canon, owner))
                continue
            _check_param(canon, param)
            aliases[key] = [(canon, owner)]
            order.append(param)
    return order, aliases, renamed


def _read_hook(mod: nn.Module, hook: str, prefix: str, marks: _Marks) -> None:
    try:
        names = getattr(mod, hook)()
    except Exception as err:  # the hook is user code: say which one failed
        raise PlanError(f"`{type(mod).__name__}.{hook}()` (module {prefix or '<root>'!r}) raised {err!r}.") from err
    if isinstance(names, str):
        names = [names]
    keyword = hook == "no_weight_decay_keywords"
    for entry in sorted(str(n).strip(".") for n in names):
        if entry:
            marks.add(prefix, entry, keyword)


def _check_param(canon: str, param: nn.Parameter) -> None:
    # (isinstance against the lazy classes is slow through Parameter's metaclass: test plain parameters first)
    if type(param) is not nn.Parameter and isinstance(param, nn.parameter.UninitializedParameter):
        raise PlanError(
            f"`module` holds an uninitialized lazy parameter {canon!r}; its shape is unknown, so no rule can be"
            " resolved for it. Run one forward pass (for example in `LightningModule.setup`) before the"
            " optimizer is configured."
        )
    if type(param).__name__ == "FlatParameter" or canon == "_flat_param" or canon.endswith("._flat_param"):
        raise PlanError(
            f"Parameter {canon!r} is an FSDP flat parameter, which concatenates tensors of different roles."
            " Wrap the model with `use_orig_params=True` (Lightning's FSDPStrategy does by default; then plan the"
            " FSDP-wrapped model, whose original parameters keep their names and shapes for the rules), or shard"
            " with FSDP2 `fully_shard`, or build the plan before wrapping the model."
        )


def _unreachable_views(module: nn.Module, views: list[Tensor]) -> PlanError:
    """The error for FSDP1 views whose unit wraps ``module`` from outside (so their shapes cannot be read)."""
    first = views[0]
    name = next((n for n, p in module.named_parameters() if p is first), "?")
    return PlanError(
        f"Parameter {name!r} of `module` ({type(module).__name__}) is a flattened FSDP view (shape"
        f" {tuple(first.shape)} on this rank, {len(views)} such tensors in all) whose FullyShardedDataParallel"
        " unit wraps `module` itself, so its original shape is out of reach and every rule would see a 1-D"
        " shard. Plan the FSDP wrapper instead (`DecayPlan.from_module(fsdp_model, rules)`: the names are the"
        " same), or build the plan before wrapping the model (FSDP with `use_orig_params=True` keeps the"
        " parameters)."
    )


class DecayPlan:
    """The resolved plan: which rule claimed which parameter, and the groups that follow.

    Build it with ``from_module``. Every trainable parameter appears in exactly one
    group; groups are ordered by first rule, the default group last; parameters inside a
    group keep registration order.

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> plan = lwd.DecayPlan.from_module(model, lwd.presets.standard(0.1))
        >>> [(g.name, g.weight_decay, g.param_names) for g in plan.groups]
        [('no_decay', 0.0, ('0.bias', '1.weight', '1.bias')), ('decay', 0.1, ('0.weight',))]
        >>> print(plan.explain("1.weight"))
        1.weight: group 'no_decay' (weight decay 0.0), claimed by rule 'normalization'; shape (4,), owner LayerNorm
    """

    def __init__(
        self,
        rules: tuple[DecayRule, ...],
        groups: tuple[PlanGroup, ...],
        unclaimed_rules: tuple[str, ...],
        frozen: tuple[str, ...],
        records: list[_Record],
        index: dict[str, int] | None = None,
        trace: RoleTrace | None = None,
    ) -> None:
        # The plan is built while its trace is the active one (`use_trace` in `from_module`).
        self.trace = trace if trace is not None else active_trace()
        self.rules = rules
        self.groups = groups
        self.unclaimed_rules = unclaimed_rules
        self.frozen = frozen
        self._records = records
        if index is not None:
            self._index = index

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        """Canonical alias -> position in ``_records`` (built on first lookup)."""
        return {alias: i for i, (_, names, *_rest) in enumerate(self._records) for alias, _ in names}

    @functools.cached_property
    def entries(self) -> tuple[ParamEntry, ...]:
        """One ``ParamEntry`` per planned parameter, in registration order (built on first use)."""
        return tuple(
            ParamEntry(
                name=names[0][0],
                aliases=tuple(n for n, _ in names),
                owners=tuple(type(o).__name__ for _, o in names),
                shape=_shape(param),
                rule=rule,
                group=group,
                marked=marked,
                traced=None if self.trace is None else self.trace.get(param),
                trace_set_aside=set_aside,
            )
            for param, names, rule, group, marked, set_aside in self._records
        )

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        rules: Sequence[DecayRule] | None = None,
        *,
        include_frozen: bool = False,
        strict: bool = False,
        default_weight_decay: float = 0.0,
        default_group: str | None = None,
        respect_no_weight_decay: bool = True,
        merge: bool = False,
        example_inputs: Any = None,
        trace: RoleTrace | None = None,
    ) -> DecayPlan:
        """Resolve ``rules`` over ``module``.

        Args:
            module: The model (any ``nn.Module``; wrappers and compiled modules are fine; under FSDP1 with
                ``use_orig_params=True``, the wrapped model: rules see each tensor with its original shape).
            rules: Rules in priority order; None means ``lightning_wd.presets.standard``.
            include_frozen: Also place parameters with ``requires_grad=False`` in groups (so that
                unfreezing them later trains them without touching the optimizer).
            strict: Raise instead of warning when a non-optional rule claims nothing.
            default_weight_decay: λ of the default group (parameters no rule claims).
            default_group: Name of the default group; ``"no_decay"`` when its decay is 0, else ``"default"``.
            respect_no_weight_decay: Put parameters flagged ``_no_weight_decay = True``, or named by a
                submodule's ``no_weight_decay()`` / ``no_weight_decay_keywords()``, in the ``no_decay``
                group ahead of every rule.
            merge: Merge groups with identical settings (names joined by ``+``), so that foreach
                kernels see few large groups.
            example_inputs: What ``module``'s forward takes (a tuple is positional arguments, a dict
                keywords), to trace one forward pass (no grad, on the meta device where possible) and take
                each parameter's role from how it is used (``lightning_wd.trace``); parameters the pass
                does not use are decided from structure. None: every role from structure. A sharded
                module (FSDP1, FSDP2) cannot be traced: leave it out, or trace the unsharded model.
            trace: A trace made earlier with ``lightning_wd.trace.trace_roles``, instead of
                ``example_inputs``.

        Returns:
            The plan.

        Raises:
            TypeError: if ``module`` is not an ``nn.Module`` or ``rules`` is not a list of DecayRule.
            ValueError: (``PlanError``) on lazy or FSDP flat parameters, on FSDP1 views whose
                ``FullyShardedDataParallel`` unit wraps ``module`` from outside (plan the wrapper), on
                rules that share a group with different settings, on a rule claiming nothing when
                ``strict``, or when there is no trainable parameter; when the forward pass on
                ``example_inputs`` raises on the meta device and on the module's own; when
                ``example_inputs`` are given for a sharded module (FSDP1, FSDP2 or DTensor parameters:
                ``lightning_wd.trace.is_sharded``), before any forward pass; when both
                ``example_inputs`` and ``trace`` are given. TypeError if ``trace`` is not a RoleTrace.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
            >>> plan = lwd.DecayPlan.from_module(model, lwd.presets.standard(0.1))
            >>> [(g.name, g.param_names) for g in plan.groups]
            [('no_decay', ('0.weight', '1.bias')), ('decay', ('1.weight',))]
        """
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"`module` must be a torch.nn.Module, got {type(module).__name__}. Pass the model itself (for"
                " example your LightningModule), not its parameters or state_dict."
            )
        rules_t = _check_rules(rules)
        default_wd, default_group = _check_option_values(
            include_frozen=include_frozen,
            strict=strict,
            respect_no_weight_decay=respect_no_weight_decay,
            merge=merge,
            default_weight_decay=default_weight_decay,
            default_group=default_group,
        )
        trace = _traced(module, example_inputs, trace)
        # The walk allocates a few small objects per tensor; on models with 10^5 tensors the
        # collector's full passes over the model would dominate, so it is paused meanwhile. FSDP1
        # views are given their original shapes while the rules look at them.
        with _gc_paused(), use_trace(trace), recording_set_aside() as set_aside, contextlib.ExitStack() as views:
            return cls._build(
                module,
                rules_t,
                include_frozen=include_frozen,
                strict=strict,
                default_wd=default_wd,
                default_group=default_group,
                respect_no_weight_decay=respect_no_weight_decay,
                merge=merge,
                views=views,
                set_aside=set_aside,
            )

    @classmethod
    def _build(
        cls,
        module: nn.Module,
        rules_t: tuple[DecayRule, ...],
        *,
        include_frozen: bool,
        strict: bool,
        default_wd: float,
        default_group: str,
        respect_no_weight_decay: bool,
        merge: bool,
        set_aside: set[int],
        views: contextlib.ExitStack | None = None,
    ) -> DecayPlan:
        # 1. Every parameter once, with all its aliases and owners, in registration order; the
        #    no_weight_decay() hooks are read on the same walk. FSDP1 views get their original
        #    shapes until ``views`` closes, after the plan is built.
        marks = _Marks() if respect_no_weight_decay else None
        order, aliases, renamed = _scan(module, marks)
        if views is not None and _fsdp._in_use() and any(map(_fsdp.is_flat_view, order)):
            unreachable = views.enter_context(_fsdp.original_shapes(module, order)).unreachable
            if unreachable:
                raise _unreachable_views(module, unreachable)

        # 2. Group settings, checked for conflicts before anything is assigned.
        group_settings: dict[str, tuple[float, float, str]] = {}

        def register_group(name: str, wd: float, lr_scale: float, origin: str) -> None:
            prev = group_settings.get(name)
            if prev is None:
                group_settings[name] = (wd, lr_scale, origin)
            elif prev[:2] != (wd, lr_scale):
                raise PlanError(
                    f"Group {name!r} is given weight_decay={prev[0]}, lr_scale={prev[1]} by {prev[2]} but"
                    f" weight_decay={wd}, lr_scale={lr_scale} by {origin}. Parameter groups need unique names:"
                    " give one of the `rules` a different `group` (or `name`)."
                )

        for rule in rules_t:
            register_group(rule.group_name, rule.weight_decay, rule.lr_scale, f"rule {rule.name!r}")
        # 3. One pass over the parameters (each tensor is touched once: on models with 10^5 tensors
        #    separate passes cost a cache miss each): frozen ones are listed; marked ones go to the
        #    no-decay group; the others to the first rule, in list order, matching any alias. Marks
        #    are decided by flags and hooks, never by a rule's name (a user rule may be called
        #    'no_weight_decay').
        by_name = marks is not None and bool(marks)
        frozen_names: list[str] = []
        rule_hits: dict[str, int] = {r.name: 0 for r in rules_t}
        any_marked = False
        members: dict[str, list[nn.Parameter]] = {}
        member_names: dict[str, list[str]] = {}
        group_rules: dict[str, dict[str, None]] = {}
        records: list[_Record] = []
        # Distinct paths give distinct names unless canonicalisation merged some: check only then.
        index: dict[str, int] | None = {} if renamed else None
        for p in order:
            names = aliases[id(p)]
            if not (include_frozen or p.requires_grad):
                frozen_names.append(names[0][0])
                continue
            marked = marks is not None and (
                getattr(p, "_no_weight_decay", False) is True or (by_name and any(marks.match(n) for n, _ in names))
            )
            rule_name: str | None
            if marked:
                if not any_marked:
                    register_group(_MARKED_GROUP, 0.0, 1.0, "the no_weight_decay convention")
                    any_marked = True
                rule_name, group, label = MARKED_RULE, _MARKED_GROUP, MARKED_RULE
            else:
                hit: DecayRule | None = None
                if len(names) == 1:  # the common case, without a generator per rule
                    name, owner = names[0]
                    for rule in rules_t:
                        if rule.matches(name, p, owner):
                            hit = rule
                            break
                else:
                    for rule in rules_t:
                        if any(rule.matches(n, p, o) for n, o in names):
                            hit = rule
                            break
                if hit is None:
                    rule_name, group, label = None, default_group, "<default>"
                    register_group(group, default_wd, 1.0, "the default group")
                else:
                    rule_hits[hit.name] += 1
                    rule_name, group, label = hit.name, hit.group_name, hit.name
            members.setdefault(group, []).append(p)
            member_names.setdefault(group, []).append(names[0][0])
            group_rules.setdefault(group, {})[label] = None
            if index is not None:
                i = len(records)
                for alias, _ in names:
                    if index.setdefault(alias, i) != i:
                        raise PlanError(
                            f"Two different parameters have the canonical name {alias!r}. Rename one of the"
                            " modules (a submodule called 'module' or '_orig_mod' beside a wrapper is the usual"
                            " cause)."
                        )
            records.append((p, names, rule_name, group, marked, id(p) in set_aside))
        frozen = tuple(frozen_names)
        if not records:
            hint = f" (all {len(frozen)} are frozen; pass include_frozen=True to plan them)" if frozen else ""
            raise PlanError(f"`module` ({type(module).__name__}) has no trainable parameter{hint}.")

        unclaimed = tuple(r.name for r in rules_t if rule_hits[r.name] == 0 and not r.optional)
        if unclaimed:
            msg = (
                f"Decay rule(s) {list(unclaimed)} claimed no parameter of {type(module).__name__}: either nothing"
                " matches them or an earlier rule claims everything they match. Check their patterns in `rules`"
                " with `DecayPlan.explain(name)`, or mark the rule `optional=True`"
                + (" (or pass `strict=False` to only warn)." if strict else ".")
            )
            if strict:
                raise PlanError(msg)
            _warn(msg)

        # 4. Groups, in rule order, the marked group, then the default group.
        group_order = [r.group_name for r in rules_t]
        if any_marked:
            group_order.append(_MARKED_GROUP)
        group_order.append(default_group)
        groups: list[PlanGroup] = []
        for gname in dict.fromkeys(group_order):
            params = members.get(gname)
            if not params:
                continue
            wd, lr_scale, _ = group_settings[gname]
            groups.append(
                PlanGroup(
                    name=gname,
                    weight_decay=wd,
                    lr_scale=lr_scale,
                    rules=tuple(group_rules[gname]),
                    params=tuple(params),
                    param_names=tuple(member_names[gname]),
                )
            )
        if merge:
            groups = _merge_groups(groups)

        return cls(rules_t, tuple(groups), unclaimed, frozen, records, index)

    def _subset(self, params: Sequence[Tensor], prefixes: Sequence[str]) -> DecayPlan:
        """The part of this plan over ``params`` (by identity); frozen names kept under ``prefixes``.

        Used to give each of several optimizers the groups of its own submodules, planned over the whole
        model (so names, ties and ``no_weight_decay()`` hooks are the model's).
        """
        keep = {id(p) for p in params}
        groups = []
        for g in self.groups:
            pairs = [(p, n) for p, n in zip(g.params, g.param_names, strict=True) if id(p) in keep]
            if pairs:
                groups.append(
                    PlanGroup(
                        name=g.name,
                        weight_decay=g.weight_decay,
                        lr_scale=g.lr_scale,
                        rules=g.rules,
                        params=tuple(p for p, _ in pairs),
                        param_names=tuple(n for _, n in pairs),
                    )
                )
        records = [r for r in self._records if id(r[0]) in keep]
        frozen = tuple(n for n in self.frozen if any(n == p or n.startswith(p + ".") for p in prefixes))
        return type(self)(self.rules, tuple(groups), self.unclaimed_rules, frozen, records, trace=self.trace)

    # ------------------------------------------------------------------ views
    def param_groups(self, lr: float | None = None, *, lr_scale_key: str | None = None) -> list[dict[str, Any]]:
        """Torch-ready parameter groups.

        Each dict has ``params``, ``name``, ``weight_decay``, ``param_names`` and ``lwd_planned: True``
        (which tells ``WeightDecay`` that ``weight_decay`` is the rules' λ for the
        whole group). A group whose rule
        scales the learning rate (``lr_scale != 1``) gets its absolute ``lr``, ``lr * lr_scale``, so
        that the scale is applied exactly once: no group carries an ``lr_scale`` key, which timm's
        schedulers would multiply in again. Other groups set no ``lr`` (the optimizer's applies).

        Args:
            lr: The optimizer's base learning rate (a finite number >= 0); needed when a rule scales
                the learning rate, unless ``lr_scale_key`` is given.
            lr_scale_key: Write each group's scale under this key instead of an absolute ``lr``, for a
                caller that applies it itself (and pops the key) once the optimizer has its lr.

        Returns:
            A new list of new dicts (safe to hand to an optimizer).

        Raises:
            TypeError: if ``lr`` is not None or a number, or ``lr_scale_key`` not None or a string.
            ValueError: if ``lr`` is negative or not finite; if ``lr`` is None while a rule scales the
                learning rate and no ``lr_scale_key`` is given; if ``lr_scale_key`` is empty, names a
                key the groups already have, or comes with ``lr``.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            >>> rules = [lwd.DecayRule("norms", 0.0, modules="*Norm*", lr_scale=0.5), lwd.DecayRule("rest", 0.1)]
            >>> plan = lwd.DecayPlan.from_module(model, rules)
            >>> [(g["name"], g.get("lr")) for g in plan.param_groups(lr=0.02)]
            [('norms', 0.01), ('rest', None)]
            >>> [g["lwd_lr_scale"] for g in plan.param_groups(lr_scale_key="lwd_lr_scale")]
            [0.5, 1.0]
            >>> plan.param_groups()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            ValueError: `lr` is None, but rule 'norms' scales the learning rate of group 'norms' by 0.5; ...
        """
        _check_lr(lr)
        _check_lr_scale_key(lr_scale_key, lr)
        if lr is None and lr_scale_key is None:
            scaled = next((g for g in self.groups if g.lr_scale != 1.0), None)
            if scaled is not None:
                one = len(scaled.rules) == 1
                rules = f"rule {scaled.rules[0]!r} scales" if one else f"rules {list(scaled.rules)} scale"
                raise ValueError(
                    f"`lr` is None, but {rules} the learning rate of group {scaled.name!r} by"
                    f" {scaled.lr_scale:g}; pass the optimizer's base lr, for example lr=3e-4, so that the group"
                    " gets its absolute lr (or pass lr_scale_key='...' to apply the scale yourself)."
                )
        out: list[dict[str, Any]] = []
        for g in self.groups:
            group: dict[str, Any] = {
                "params": list(g.params),
                "name": g.name,
                "weight_decay": g.weight_decay,
                "param_names": list(g.param_names),
                PLANNED_KEY: True,
            }
            if lr_scale_key is not None:
                group[lr_scale_key] = g.lr_scale
            elif g.lr_scale != 1.0 and lr is not None:  # (lr None with a scaled group was refused above)
                group["lr"] = lr * g.lr_scale
            out.append(group)
        return out

    def entry(self, name: str) -> ParamEntry:
        """The entry for a parameter, by any of its canonical aliases (or raw name).

        Args:
            name: Any canonical name of the parameter, or a raw one (with wrapper prefixes).

        Raises:
            TypeError: if ``name`` is not a string.
            KeyError: if no trainable parameter is reachable under ``name``; the message suggests
                close matches.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> plan = lwd.DecayPlan.from_module(torch.nn.Sequential(torch.nn.Linear(4, 4)))
            >>> plan.entry("0.weight").group
            'decay'
            >>> plan.entry("0.wieght")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            KeyError: "No planned parameter is named '0.wieght'; ... Did you mean '0.weight'? ..."
        """
        if not isinstance(name, str):
            raise TypeError(
                f"`name` must be a parameter's name as a string, got {type(name).__name__} {name!r:.80}. Pass for"
                " example 'fc.weight' (the names are in `[e.name for e in plan.entries]`)."
            )
        i = self._find(name)
        if i is not None:
            return self.entries[i]
        raise KeyError(self._unknown(name))

    def _unknown(self, name: str) -> str:
        """The message for a name no planned parameter has: why, close matches, how to list the names."""
        if name in self.frozen:
            why = " It is frozen (requires_grad=False) and so not planned; plan it with include_frozen=True."
        else:
            close = difflib.get_close_matches(name, list(self._index), n=3)
            why = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"No planned parameter is named {name!r}; `name` must be a canonical name or alias of a trainable"
            f" parameter.{why} List the planned names with `[e.name for e in plan.entries]` (aliases in"
            " `e.aliases`), or print `plan.table()` for the groups."
        )

    @functools.cached_property
    def _group_of(self) -> dict[int, PlanGroup]:
        return {id(p): g for g in self.groups for p in g.params}

    def _find(self, name: str) -> int | None:
        i = self._index.get(name)
        if i is None:
            # A raw name: drop wrapper prefixes and unwrap `x.parametrizations.weight.original[N]`.
            stripped = ".".join(c for c in name.split(".") if c not in _WRAPPER_ATTRS and c != "module")
            stripped = _RAW_PARAMETRIZED.sub(lambda m: m[1] + m[2] + (f".original{m[3]}" if m[3] else ""), stripped)
            i = self._index.get(stripped)
        return i

    def explain(self, name: str) -> str:
        """Say why a parameter lands where it does.

        Args:
            name: Any canonical name of the parameter, or a raw one (with wrapper prefixes).

        Returns:
            One line: group, decay, the claiming rule, other rules that also match, aliases, shape, owner,
            and with a trace where the role came from: ``role linear by trace: weight of ...``, ``role by
            structure, a table, though traced as linear: ...`` (``ParamEntry.trace_set_aside``), or ``role
            by structure`` for a tensor the forward pass did not use.

        Raises:
            TypeError: if ``name`` is not a string.
            KeyError: as ``entry``, if no trainable parameter is reachable under ``name``.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            >>> print(lwd.DecayPlan.from_module(model).explain("0.weight"))
            0.weight: group 'decay' (weight decay 0.05), claimed by rule 'linear'; shape (4, 4), owner Linear
        """
        e = self.entry(name)
        param, names = self._records[self._index[e.name]][:2]
        group = self._group_of[id(param)]
        if e.marked:
            why = "marked no-decay by a `_no_weight_decay` flag or a `no_weight_decay()` hook"
        elif e.rule is None:
            why = "claimed by no rule (default group)"
        else:
            why = f"claimed by rule {e.rule!r}"
        with use_trace(self.trace):
            others = [
                r.name
                for r in self.rules
                if (e.marked or r.name != e.rule) and any(r.matches(n, param, o) for n, o in names)
            ]
        parts = [f"{e.name}: group {group.name!r} (weight decay {group.weight_decay}), {why}"]
        if others:
            parts.append(f"also matched by {others}")
        if len(e.aliases) > 1:
            parts.append(f"aliases {list(e.aliases)}")
        parts.append(f"shape {e.shape}, owner {'/'.join(dict.fromkeys(e.owners))}")
        if e.traced is not None and e.trace_set_aside:
            parts.append(f"role by structure, a table, though traced as {e.traced.role}: {e.traced.evidence}")
        elif e.traced is not None:
            parts.append(f"role {e.traced.role} by trace: {e.traced.evidence}")
        elif self.trace is not None:
            parts.append("role by structure: the traced forward pass did not use it")
        return "; ".join(parts)

    def table(self) -> str:
        """The plan as a text table: group, rules, tensors, elements, weight decay, lr scale.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            >>> print(lwd.DecayPlan.from_module(model).table())
            group     rules               tensors  elements  weight_decay  lr_scale
            --------  ------------------  -------  --------  ------------  --------
            no_decay  bias,normalization        3        12             0         1
            decay     linear                    1        16          0.05         1
            --------  ------------------  -------  --------  ------------  --------
            total                               4        28
        """
        header = ("group", "rules", "tensors", "elements", "weight_decay", "lr_scale")
        rows = [
            (g.name, ",".join(g.rules), str(len(g.params)), f"{g.numel:,}", f"{g.weight_decay:g}", f"{g.lr_scale:g}")
            for g in self.groups
        ]
        total = sum(len(g.params) for g in self.groups)
        numel = sum(g.numel for g in self.groups)
        rows.append(("total", "", str(total), f"{numel:,}", "", ""))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
        if self.frozen:
            lines.append(f"frozen, not planned: {len(self.frozen)} tensors")
        if self.unclaimed_rules:
            lines.append(f"rules that claimed nothing: {', '.join(self.unclaimed_rules)}")
        if self.trace is not None:
            lines.extend(self._trace_lines(self.trace))
        return "\n".join(lines)

    def _trace_lines(self, trace: RoleTrace) -> list[str]:
        """Per group, the uses that decided the traced roles (``weight of `linear` (12)``), then the rest."""
        by_group: dict[str, Counter[str]] = {}
        untraced: list[str] = []
        set_aside: list[str] = []
        for e in self.entries:
            if e.traced is None:
                untraced.append(e.name)
                continue
            if e.trace_set_aside:
                set_aside.append(e.name)
                continue
            uses = by_group.setdefault(e.group, Counter())
            for use in e.traced.uses:
                if use.role == e.traced.role:
                    uses[use.describe().rsplit(" in ", 1)[0]] += 1
        traced = len(self.entries) - len(untraced) - len(set_aside)
        lines = [f"roles by trace (forward pass on {trace.device}): {traced} of {len(self.entries)} tensors"]
        width = max((len(g) for g in by_group), default=0)
        for g in self.groups:
            seen = by_group.get(g.name)
            if seen:
                ranked = [f"{what} ({n})" for what, n in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))]
                more = f", and {len(ranked) - 4} other uses" if len(ranked) > 5 else ""
                lines.append(f"  {g.name.ljust(width)}  {', '.join(ranked[:4] if more else ranked)}{more}")
        for names, why in (
            (untraced, "not used by the forward pass"),
            (set_aside, "tables the forward pass read as matrices"),
        ):
            if names:
                listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                lines.append(
                    f"roles by structure ({why}): {len(names)} tensor{'s' if len(names) != 1 else ''} ({listed})"
                )
        return lines

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.name}={len(g.params)}" for g in self.groups)
        return f"DecayPlan({groups})"


def _merge_groups(groups: list[PlanGroup]) -> list[PlanGroup]:
    by_key: dict[tuple[float, float], list[PlanGroup]] = {}
    for g in groups:
        by_key.setdefault((g.weight_decay, g.lr_scale), []).append(g)
    out = []
    for (wd, lr_scale), gs in by_key.items():
        if len(gs) == 1:
            out.append(gs[0])
            continue
        out.append(
            PlanGroup(
                name="+".join(g.name for g in gs),
                weight_decay=wd,
                lr_scale=lr_scale,
                rules=tuple(r for g in gs for r in g.rules),
                params=tuple(p for g in gs for p in g.params),
                param_names=tuple(n for g in gs for n in g.param_names),
            )
        )
    return out


def _check_rules(rules: Sequence[DecayRule] | None, argument: str = "rules") -> tuple[DecayRule, ...]:
    if rules is None:
        from lightning_wd.presets import standard

        return tuple(standard())
    if isinstance(rules, DecayRule):
        return (rules,)
    if isinstance(rules, (set, frozenset)):
        raise TypeError(
            f"`{argument}` was given as a set, whose order is not deterministic. Pass a list, in priority order."
        )
    if not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
        raise TypeError(
            f"`{argument}` must be a list of DecayRule, got {type(rules).__name__} {rules!r}. Pass for example"
            " lwd.presets.standard(0.05), or a list of lwd.DecayRule(name, weight_decay, ...)."
        )
    out = tuple(rules)
    for i, r in enumerate(out):
        if not isinstance(r, DecayRule):
            raise TypeError(
                f"`{argument}[{i}]` must be a DecayRule, got {type(r).__name__} {r!r}."
                " Build it with lwd.DecayRule(name, weight_decay, ...)."
            )
    dupes = sorted(n for n, count in Counter(r.name for r in out).items() if count > 1)
    if dupes:
        raise PlanError(f"`{argument}` contains duplicate rule names {dupes}. Give every rule a unique `name`.")
    # Rules sharing a group must agree on its settings; say so before any model is seen.
    settings: dict[str, DecayRule] = {}
    for r in out:
        first = settings.setdefault(r.group_name, r)
        if (first.weight_decay, first.lr_scale) != (r.weight_decay, r.lr_scale):
            raise PlanError(
                f"`{argument}`: group {r.group_name!r} is given weight_decay={first.weight_decay},"
                f" lr_scale={first.lr_scale} by rule {first.name!r} but weight_decay={r.weight_decay},"
                f" lr_scale={r.lr_scale} by rule {r.name!r}. Parameter groups need unique names: give one of the"
                " rules a different `group` (or `name`)."
            )
    return out


def _traced(module: nn.Module, example_inputs: Any, trace: Any) -> RoleTrace | None:
    """The trace to resolve the rules with: ``trace``, one run now on ``example_inputs``, or None."""
    if trace is not None:
        if example_inputs is not None:
            raise ValueError(
                "`example_inputs` and `trace` were both given; they are two ways to give the same roles. Pass"
                " one: `example_inputs` to trace the forward pass now, or `trace` to reuse a trace."
            )
        if not isinstance(trace, RoleTrace):
            raise TypeError(
                f"`trace` must be a RoleTrace (from lightning_wd.trace.trace_roles(module, inputs)), got"
                f" {type(trace).__name__} {trace!r:.80}. Pass it, or pass the inputs as `example_inputs`."
            )
        return trace
    if example_inputs is None:
        return None
    try:
        return trace_roles(module, example_inputs)
    except TraceError as err:
        raise PlanError(str(err)) from err


def _warn(message: str) -> None:
    """Through Lightning's rank-zero warning where Lightning is in use; plain PyTorch use never imports it."""
    if "lightning.pytorch" in sys.modules:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(message, category=UserWarning)
    else:
        warnings.warn(message, UserWarning, stacklevel=3)


def _check_lr(lr: Any) -> None:
    """Refuse an ``lr`` that is not None or a finite number >= 0 (bool excluded)."""
    if lr is None or (type(lr) in (int, float) and math.isfinite(lr) and lr >= 0):
        return
    number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
    if number and math.isfinite(lr) and lr >= 0:  # a subclass, such as numpy.float64
        return
    raise (ValueError if number else TypeError)(
        f"`lr` must be None or a finite number >= 0 (the optimizer's base learning rate), got"
        f" {type(lr).__name__} {lr!r:.80}. Pass the lr you give the optimizer, for example 3e-4."
    )


#: Keys every group of ``DecayPlan.param_groups`` has, or may have.
_GROUP_KEYS = ("lr", "lwd_planned", "name", "param_names", "params", "weight_decay")


def _check_lr_scale_key(key: Any, lr: float | None) -> None:
    if key is None:
        return
    if not isinstance(key, str):
        raise TypeError(
            f"`lr_scale_key` must be None or a string, got {type(key).__name__} {key!r:.80}. Pass the group key"
            " under which to write each group's lr scale, for example 'lwd_lr_scale'."
        )
    if not key or key in _GROUP_KEYS:
        raise ValueError(
            f"`lr_scale_key` must be a non-empty key the groups do not already have ({', '.join(_GROUP_KEYS)}),"
            f" got {key!r}. Use a key of your own, for example 'lwd_lr_scale'."
        )
    if lr is not None:
        raise ValueError(
            f"`lr_scale_key`={key!r} comes with lr={lr}: the scale would reach the optimizer twice (an absolute lr"
            " and a key). Pass either lr (absolute lr per group) or lr_scale_key (you apply the scale), not both."
        )


#: Keyword options of ``DecayPlan.from_module`` that ``build_param_groups`` and ``WDMixin`` pass on.
PLAN_OPTIONS = ("default_group", "default_weight_decay", "include_frozen", "merge", "respect_no_weight_decay", "strict")


def _check_plan_options(options: Any, where: str) -> None:
    """Refuse a non-mapping or unknown keys (``where`` says whose), listing the valid ones."""
    if not isinstance(options, Mapping):
        raise TypeError(
            f"{where} must be a mapping such as {{'merge': True}}, got {type(options).__name__} {options!r}."
            " Pass a dict of options."
        )
    unknown = sorted(str(k) for k in options if k not in PLAN_OPTIONS)
    if unknown:
        names = ", ".join(f"`{k}`" for k in unknown)
        raise TypeError(f"{where} got unknown option(s) {names}; use any of the following: {', '.join(PLAN_OPTIONS)}.")
    _check_option_values(**options)


def _check_option_values(
    *,
    include_frozen: Any = False,
    strict: Any = False,
    respect_no_weight_decay: Any = True,
    merge: Any = False,
    default_weight_decay: Any = 0.0,
    default_group: Any = None,
) -> tuple[float, str]:
    """Check the values of the plan options; return the default group's λ and name."""
    for flag, argument in (
        (include_frozen, "include_frozen"),
        (strict, "strict"),
        (respect_no_weight_decay, "respect_no_weight_decay"),
        (merge, "merge"),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"`{argument}` must be True or False, got {type(flag).__name__} {flag!r}. Pass a bool.")
    default_wd = _check_number(default_weight_decay, "default_weight_decay", positive=False)
    if default_group is None:
        return default_wd, "no_decay" if default_wd == 0.0 else "default"
    if not isinstance(default_group, str):
        raise TypeError(
            f"`default_group` must be a string or None, got {type(default_group).__name__} {default_group!r}."
            " Use for example 'default', or None for 'no_decay' / 'default' by its decay."
        )
    if not _NAME_CHARS.match(default_group):
        raise ValueError(
            f"`default_group` must be a non-empty string of letters, digits and '_.-/+', got {default_group!r}."
            " It names a parameter group and a logging key; use for example 'default'."
        )
    return default_wd, default_group


def build_param_groups(
    module: nn.Module,
    rules: Sequence[DecayRule] | None = None,
    *,
    lr: float | None = None,
    prefix: str | None = None,
    example_inputs: Any = None,
    trace: RoleTrace | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Resolve ``rules`` over ``module`` and return torch-ready parameter groups.

    Args:
        module: The model.
        rules: Rules in priority order; None means ``lightning_wd.presets.standard``.
        lr: The optimizer's base learning rate (a finite number >= 0), to write the absolute ``lr``
            into groups whose rule scales it; needed when a rule has ``lr_scale != 1``.
        prefix: Name the groups ``"<prefix>/<group>"``: with several optimizers (a GAN's generator
            and discriminator), each optimizer's groups, and the metrics logged for them
            (``wd/generator/decay/param_norm``), then say which optimizer they belong to.
        example_inputs: What the forward takes, to take each parameter's role from one traced forward
            pass (see ``DecayPlan.from_module``); None decides every role from structure.
        trace: A trace made before (``lightning_wd.trace.trace_roles``), to reuse instead of
            ``example_inputs``: several optimizers' groups from one forward pass.
        **options: Passed to ``DecayPlan.from_module`` (``include_frozen``, ``strict``,
            ``default_weight_decay``, ``default_group``, ``respect_no_weight_decay``, ``merge``).

    Returns:
        A list of dicts with ``params``, ``name``, ``weight_decay``, ``param_names`` and
        ``lwd_planned: True``, and the absolute ``lr`` (``lr * lr_scale``) where a rule scales it; never
        an ``lr_scale`` key (timm's schedulers would apply it a second time). For the scale under a key of your own, use
        ``DecayPlan.from_module(...).param_groups(lr_scale_key=...)``.

    Raises:
        TypeError: on an unknown option, a module/rules of the wrong type, an ``lr`` that is not a number, or a
            ``prefix`` that is not a non-empty string.
        ValueError: as ``DecayPlan.from_module``; on an ``lr`` that is negative or not finite, or
            None while a rule scales the learning rate.

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> groups = lwd.build_param_groups(model, lwd.presets.standard(0.1))
        >>> [(g["name"], g["weight_decay"], g["param_names"]) for g in groups]
        [('no_decay', 0.0, ['0.weight', '1.bias']), ('decay', 0.1, ['1.weight'])]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
        >>> [g["name"] for g in lwd.build_param_groups(model, lwd.presets.standard(0.1), prefix="generator")]
        ['generator/no_decay', 'generator/decay']
    """
    _check_plan_options(options, "build_param_groups()")
    _check_lr(lr)  # before the plan is built
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise TypeError(
            f"`prefix` must be a non-empty string naming the optimizer (such as 'generator') or None, got"
            f" {type(prefix).__name__} {prefix!r}."
        )
    plan = DecayPlan.from_module(module, rules, example_inputs=example_inputs, trace=trace, **options)
    groups = plan.param_groups(lr=lr)
    if prefix is not None:
        for g in groups:
            g["name"] = f"{prefix}/{g['name']}"
    return groups
