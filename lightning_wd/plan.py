"""Resolve decay rules over a module into a checked, explainable plan (pure torch).

The plan walks the module tree once, in registration order, and records every name
under which each parameter is reachable (its *aliases*), canonicalised: wrapper
prefixes (``_orig_mod.``, DDP's ``module.``, ``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.``) are dropped, and a parametrized tensor
``x.parametrizations.weight.original`` is named ``x.weight`` and owned by ``x``.
Parameters are identified by ``id``; a parameter belongs to the first rule, in list
order, that matches any of its aliases.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_wd.rules import DecayRule, _check_number, _compile_glob

__all__ = ["DecayPlan", "ParamEntry", "PlanGroup", "build_param_groups"]

#: Attribute names under which wrappers hold the wrapped module; dropped from canonical names.
_WRAPPER_ATTRS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module"})
#: Wrappers that hold the wrapped module as ``module``.
_MODULE_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"})
#: Name of the rule that claims parameters marked by the ecosystem's no-decay conventions.
MARKED_RULE = "no_weight_decay"


class PlanError(ValueError):
    """A model or rule list from which no sound plan can be built."""


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
    """

    name: str
    aliases: tuple[str, ...]
    owners: tuple[str, ...]
    shape: tuple[int, ...]
    rule: str | None
    group: str
    marked: bool


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


def _numel(param: Tensor) -> int:
    ds_numel = getattr(param, "ds_numel", None)
    return int(ds_numel) if ds_numel is not None else param.numel()


def _walk(module: nn.Module) -> Iterable[tuple[str, nn.Module, str, dict[str, nn.Module]]]:
    """Yield ``(raw_name, submodule, canonical_prefix, raw_modules)`` for every path to every submodule."""
    raw_modules: dict[str, nn.Module] = {}
    canon_prefix: dict[str, str] = {}
    for raw, mod in module.named_modules(remove_duplicate=False):
        raw_modules[raw] = mod
        if raw:
            parent_raw, _, attr = raw.rpartition(".")
            parent_canon = canon_prefix[parent_raw]
            wrapped = attr == "module" and type(raw_modules[parent_raw]).__name__ in _MODULE_WRAPPERS
            drop = attr in _WRAPPER_ATTRS or wrapped
            canon_prefix[raw] = parent_canon if drop else (f"{parent_canon}.{attr}" if parent_canon else attr)
        else:
            canon_prefix[raw] = ""
        yield raw, mod, canon_prefix[raw], raw_modules


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _canonical_paths(module: nn.Module) -> Iterable[tuple[str, nn.Module, nn.Parameter]]:
    """Yield ``(canonical_name, owner, param)`` for every path to every parameter."""
    canon_of: dict[str, str] = {}
    for raw, mod, prefix, raw_modules in _walk(module):
        canon_of[raw] = prefix
        params = mod._parameters
        if not params:
            continue
        owner = mod
        holder_raw, _, tensor_name = raw.rpartition(".")
        if type(mod).__name__ == "ParametrizationList" and holder_raw.rpartition(".")[2] == "parametrizations":
            # <x>.parametrizations.<tensor>.original[N] -> <x>.<tensor>[.originalN], owned by <x>
            x_raw = holder_raw.rpartition(".")[0]
            owner = raw_modules[x_raw]
            prefix = _join(canon_of[x_raw], tensor_name)
            for pname, param in params.items():
                if param is not None:
                    yield (prefix if pname == "original" else f"{prefix}.{pname}"), owner, param
            continue
        for pname, param in params.items():
            if param is not None:
                yield _join(prefix, pname), owner, param


def _marked_patterns(module: nn.Module) -> list[re.Pattern[str]]:
    """Canonical glob patterns from ``no_weight_decay()`` / ``no_weight_decay_keywords()`` hooks."""
    patterns: list[re.Pattern[str]] = []
    for _raw, mod, prefix, _ in _walk(module):
        for hook, keyword in (("no_weight_decay", False), ("no_weight_decay_keywords", True)):
            if not callable(getattr(type(mod), hook, None)):
                continue
            try:
                names = getattr(mod, hook)()
            except Exception as err:  # the hook is user code: say which one failed
                raise PlanError(
                    f"`{type(mod).__name__}.{hook}()` (module {prefix or '<root>'!r}) raised {err!r}."
                ) from err
            if isinstance(names, str):
                names = [names]
            for entry in sorted(str(n).strip(".") for n in names):
                full = _join(prefix, f"*{entry}*" if keyword else entry)
                # A hook may name a submodule: everything under it is marked too.
                patterns.append(_compile_glob(full))
                patterns.append(_compile_glob(full + ".*"))
    return patterns


def _check_param(canon: str, param: nn.Parameter) -> None:
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise PlanError(
            f"Parameter {canon!r} is an uninitialized lazy parameter; its shape is unknown, so no rule can be"
            " resolved for it. Run one forward pass (for example in `LightningModule.setup`) before the"
            " optimizer is configured."
        )
    if type(param).__name__ == "FlatParameter" or "_flat_param" in canon.split("."):
        raise PlanError(
            f"Parameter {canon!r} is an FSDP flat parameter, which concatenates tensors of different roles."
            " Wrap the model with `use_orig_params=True` (or use FSDP2 `fully_shard`) so rules see each tensor."
        )


class DecayPlan:
    """The resolved plan: which rule claimed which parameter, and the groups that follow.

    Build it with :meth:`from_module`. Every trainable parameter appears in exactly one
    group; groups are ordered by first rule, the default group last; parameters inside a
    group keep registration order.

    Example::

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
        entries: tuple[ParamEntry, ...],
        groups: tuple[PlanGroup, ...],
        unclaimed_rules: tuple[str, ...],
        frozen: tuple[str, ...],
        owners: dict[str, tuple[nn.Module, ...]],
        params: dict[str, nn.Parameter],
    ) -> None:
        self.rules = rules
        self.entries = entries
        self.groups = groups
        self.unclaimed_rules = unclaimed_rules
        self.frozen = frozen
        self._owners = owners
        self._params = params

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
    ) -> DecayPlan:
        """Resolve ``rules`` over ``module``.

        Args:
            module: The model (any ``nn.Module``; wrappers and compiled modules are fine).
            rules: Rules in priority order; None means :func:`lightning_wd.presets.standard`.
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

        Returns:
            The plan.

        Raises:
            TypeError: if ``module`` is not an ``nn.Module`` or ``rules`` is not a list of DecayRule.
            ValueError: (``PlanError``) on lazy or FSDP flat parameters, on rules that share a group
                with different settings, on a rule claiming nothing when ``strict``, or when there
                is no trainable parameter.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        rules_t = _check_rules(rules)
        default_wd = _check_number(default_weight_decay, "default_weight_decay", positive=False)
        if default_group is None:
            default_group = "no_decay" if default_wd == 0.0 else "default"
        elif not isinstance(default_group, str) or not default_group:
            raise ValueError(f"`default_group` must be a non-empty string or None, got {default_group!r}.")

        # 1. Collect every parameter once, with all its aliases and owners, in registration order.
        order: list[nn.Parameter] = []
        aliases: dict[int, list[tuple[str, nn.Module]]] = {}
        frozen: list[str] = []
        for canon, owner, param in _canonical_paths(module):
            key = id(param)
            if key in aliases:
                if all(canon != n for n, _ in aliases[key]):
                    aliases[key].append((canon, owner))
                continue
            _check_param(canon, param)
            aliases[key] = [(canon, owner)]
            order.append(param)
        trainable = [p for p in order if p.requires_grad or include_frozen]
        frozen = [aliases[id(p)][0][0] for p in order if not (p.requires_grad or include_frozen)]
        if not trainable:
            raise PlanError(
                f"`module` ({type(module).__name__}) has no trainable parameter"
                f"{' (all ' + str(len(frozen)) + ' are frozen; pass include_frozen=True to plan them)' if frozen else ''}."
            )

        # 2. Marked parameters (ecosystem conventions).
        marked_ids: set[int] = set()
        if respect_no_weight_decay:
            patterns = _marked_patterns(module)
            for p in trainable:
                names = aliases[id(p)]
                if getattr(p, "_no_weight_decay", False) is True or any(
                    pat.fullmatch(n) for pat in patterns for n, _ in names
                ):
                    marked_ids.add(id(p))

        # 3. First rule, in list order, matching any alias.
        group_settings: dict[str, tuple[float, float, str]] = {}

        def register_group(name: str, wd: float, lr_scale: float, origin: str) -> None:
            prev = group_settings.get(name)
            if prev is None:
                group_settings[name] = (wd, lr_scale, origin)
            elif prev[:2] != (wd, lr_scale):
                raise PlanError(
                    f"Group {name!r} is given weight_decay={prev[0]}, lr_scale={prev[1]} by {prev[2]} but"
                    f" weight_decay={wd}, lr_scale={lr_scale} by {origin}. Parameter groups need unique names:"
                    " give one of the rules a different `group` (or `name`)."
                )

        for rule in rules_t:
            register_group(rule.group_name, rule.weight_decay, rule.lr_scale, f"rule {rule.name!r}")
        if marked_ids:
            register_group("no_decay", 0.0, 1.0, "the no_weight_decay convention")

        claimed: dict[int, str | None] = {}
        rule_hits: dict[str, int] = {r.name: 0 for r in rules_t}
        for p in trainable:
            key = id(p)
            if key in marked_ids:
                claimed[key] = MARKED_RULE
                continue
            claimed[key] = None
            for rule in rules_t:
                if any(rule.matches(n, p, o) for n, o in aliases[key]):
                    claimed[key] = rule.name
                    rule_hits[rule.name] += 1
                    break

        unclaimed = tuple(r.name for r in rules_t if rule_hits[r.name] == 0 and not r.optional)
        if unclaimed:
            msg = (
                f"Decay rule(s) {list(unclaimed)} claimed no parameter of {type(module).__name__}: either nothing"
                " matches them or an earlier rule claims everything they match. Check the patterns with"
                " `DecayPlan.explain(name)`, or mark the rule `optional=True`."
            )
            if strict:
                raise PlanError(msg)
            _warn(msg)

        # 4. Groups.
        rule_by_name = {r.name: r for r in rules_t}
        members: dict[str, list[nn.Parameter]] = {}
        group_rules: dict[str, list[str]] = {}
        entries: list[ParamEntry] = []
        group_order = [r.group_name for r in rules_t]
        if marked_ids:
            group_order.append("no_decay")
        for p in trainable:
            key = id(p)
            rule_name = claimed[key]
            if rule_name is None:
                group = default_group
                register_group(group, default_wd, 1.0, "the default group")
            elif rule_name == MARKED_RULE:
                group = "no_decay"
            else:
                group = rule_by_name[rule_name].group_name
            members.setdefault(group, []).append(p)
            label = rule_name if rule_name is not None else "<default>"
            if label not in group_rules.setdefault(group, []):
                group_rules[group].append(label)
            names = aliases[key]
            entries.append(
                ParamEntry(
                    name=names[0][0],
                    aliases=tuple(n for n, _ in names),
                    owners=tuple(type(o).__name__ for _, o in names),
                    shape=tuple(getattr(p, "ds_shape", None) or p.shape),
                    rule=rule_name,
                    group=group,
                    marked=key in marked_ids,
                )
            )
        group_order.append(default_group)
        name_of = {id(p): e.name for p, e in zip(trainable, entries)}
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
                    param_names=tuple(name_of[id(p)] for p in params),
                )
            )
        if merge:
            groups = _merge_groups(groups)

        names_seen: dict[str, int] = {}
        for e in entries:
            if e.name in names_seen:
                raise PlanError(
                    f"Two different parameters have the canonical name {e.name!r}. Rename one of the modules"
                    " (a submodule called 'module' or '_orig_mod' beside a wrapper is the usual cause)."
                )
            names_seen[e.name] = 1
        owners = {aliases[id(p)][0][0]: tuple(o for _, o in aliases[id(p)]) for p in trainable}
        params_by_name = {aliases[id(p)][0][0]: p for p in trainable}
        return cls(rules_t, tuple(entries), tuple(groups), unclaimed, tuple(frozen), owners, params_by_name)

    # ------------------------------------------------------------------ views
    def param_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """Torch-ready parameter groups.

        Each dict has ``params``, ``name``, ``weight_decay``, ``param_names`` and ``lr_scale``;
        ``lr`` (absolute) is added where a rule scales it and ``lr`` is given.

        Args:
            lr: The optimizer's base learning rate, to write absolute per-group ``lr``.

        Returns:
            A new list of new dicts (safe to hand to an optimizer).
        """
        out: list[dict[str, Any]] = []
        for g in self.groups:
            group: dict[str, Any] = {
                "params": list(g.params),
                "name": g.name,
                "weight_decay": g.weight_decay,
                "param_names": list(g.param_names),
                "lr_scale": g.lr_scale,
            }
            if lr is not None and g.lr_scale != 1.0:
                group["lr"] = lr * g.lr_scale
            out.append(group)
        return out

    def entry(self, name: str) -> ParamEntry:
        """The entry for a parameter, by any of its canonical aliases (or raw name).

        Raises:
            KeyError: if no trainable parameter is reachable under ``name``.
        """
        for e in self.entries:
            if name in e.aliases:
                return e
        stripped = ".".join(c for c in name.split(".") if c not in _WRAPPER_ATTRS and c != "module")
        for e in self.entries:
            if stripped in e.aliases:
                return e
        frozen = f" It is frozen (requires_grad=False) and so not planned." if name in self.frozen else ""
        raise KeyError(f"No planned parameter is named {name!r}.{frozen}")

    def explain(self, name: str) -> str:
        """Say why a parameter lands where it does.

        Args:
            name: Any canonical name of the parameter.

        Returns:
            One line: group, decay, the claiming rule, other rules that also match, aliases, shape, owner.
        """
        e = self.entry(name)
        group = next(g for g in self.groups if e.group == g.name or e.group in g.name.split("+"))
        if e.rule == MARKED_RULE:
            why = "marked no-decay by a `_no_weight_decay` flag or a `no_weight_decay()` hook"
        elif e.rule is None:
            why = "claimed by no rule (default group)"
        else:
            why = f"claimed by rule {e.rule!r}"
        param = self._params[e.name]
        others = [
            r.name
            for r in self.rules
            if r.name != e.rule and any(r.matches(n, param, o) for n, o in zip(e.aliases, self._owners[e.name]))
        ]
        parts = [f"{e.name}: group {group.name!r} (weight decay {group.weight_decay}), {why}"]
        if others:
            parts.append(f"also matched by {others}")
        if len(e.aliases) > 1:
            parts.append(f"aliases {list(e.aliases)}")
        parts.append(f"shape {e.shape}, owner {'/'.join(dict.fromkeys(e.owners))}")
        return "; ".join(parts)

    def table(self) -> str:
        """The plan as a text table: group, rules, tensors, elements, weight decay, lr scale."""
        header = ("group", "rules", "tensors", "elements", "weight_decay", "lr_scale")
        rows = [
            (g.name, ",".join(g.rules), str(len(g.params)), f"{g.numel:,}", f"{g.weight_decay:g}", f"{g.lr_scale:g}")
            for g in self.groups
        ]
        total = sum(len(g.params) for g in self.groups)
        numel = sum(g.numel for g in self.groups)
        rows.append(("total", "", str(total), f"{numel:,}", "", ""))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
        if self.frozen:
            lines.append(f"frozen, not planned: {len(self.frozen)} tensors")
        if self.unclaimed_rules:
            lines.append(f"rules that claimed nothing: {', '.join(self.unclaimed_rules)}")
        return "\n".join(lines)

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


def _check_rules(rules: Sequence[DecayRule] | None) -> tuple[DecayRule, ...]:
    if rules is None:
        from lightning_wd.presets import standard

        return tuple(standard())
    if isinstance(rules, DecayRule):
        return (rules,)
    if isinstance(rules, (set, frozenset)):
        raise TypeError("`rules` was given as a set, whose order is not deterministic. Pass a list, in priority order.")
    if not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
        raise TypeError(f"`rules` must be a list of DecayRule, got {type(rules).__name__} {rules!r}.")
    out = tuple(rules)
    for i, r in enumerate(out):
        if not isinstance(r, DecayRule):
            raise TypeError(
                f"`rules[{i}]` must be a DecayRule, got {type(r).__name__} {r!r}."
                " Build it with lwd.DecayRule(name, weight_decay, ...)."
            )
    names = [r.name for r in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PlanError(f"`rules` contains duplicate rule names {dupes}. Give every rule a unique `name`.")
    return out


def _warn(message: str) -> None:
    try:
        from lightning.pytorch.utilities import rank_zero_warn
    except ImportError:  # pragma: no cover - lightning is a dependency, but the core does not need it
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        rank_zero_warn(message, category=UserWarning)


def build_param_groups(
    module: nn.Module,
    rules: Sequence[DecayRule] | None = None,
    *,
    lr: float | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Resolve ``rules`` over ``module`` and return torch-ready parameter groups.

    Args:
        module: The model.
        rules: Rules in priority order; None means :func:`lightning_wd.presets.standard`.
        lr: Base learning rate, to write absolute ``lr`` into groups whose rule scales it.
        **options: Passed to :meth:`DecayPlan.from_module` (``include_frozen``, ``strict``,
            ``default_weight_decay``, ``default_group``, ``respect_no_weight_decay``, ``merge``).

    Returns:
        A list of dicts with ``params``, ``name``, ``weight_decay``, ``param_names``, ``lr_scale``
        (and ``lr`` where a rule scales it and ``lr`` is given).

    Raises:
        TypeError: on an unknown option, or a module/rules of the wrong type.
        ValueError: as :meth:`DecayPlan.from_module`.

    Example::

        >>> import torch, lightning_wd as lwd
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> groups = lwd.build_param_groups(model, lwd.presets.standard(0.1))
        >>> [(g["name"], g["weight_decay"], g["param_names"]) for g in groups]
        [('no_decay', 0.0, ['0.weight', '1.bias']), ('decay', 0.1, ['1.weight'])]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
    """
    allowed = {"include_frozen", "strict", "default_weight_decay", "default_group", "respect_no_weight_decay", "merge"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"build_param_groups() got unknown option(s) {unknown}; use any of the following: {sorted(allowed)}.")
    return DecayPlan.from_module(module, rules, **options).param_groups(lr=lr)


