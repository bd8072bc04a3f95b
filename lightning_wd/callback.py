"""``WeightDecayCallback``: decay applied after every real optimizer step, and logged per group.

The callback hooks each optimizer's ``step`` (``Optimizer.register_step_post_hook``), so the
decay runs exactly when the optimizer really stepped: not on gradient-accumulation
micro-batches, not when an AMP grad scaler skipped the step, once per ``step()`` of each
optimizer in manual optimization. Where a fused optimizer is stepped by the scaler even on
overflow, the scaler's ``found_inf`` tensor zeroes the decay on the device, with no host sync.

Parameters sharded as DTensors (``ModelParallelStrategy`` with FSDP2's ``fully_shard``) are
decayed shard by shard on each rank; their norms are reduced over the ranks (see the class).

Where each group's decay comes from:

* groups built by :class:`~lightning_wd.WDMixin` carry their planned ``weight_decay``; at
  train start it is *handed over*: moved from the optimizer (set to 0 there) to the
  callback, recorded in the group under ``"lwd_weight_decay"`` so that a resumed optimizer
  keeps it that way;
* any other group is resolved parameter by parameter with the callback's ``rules`` (or, for
  a ``WDMixin`` module, its ``decay_rules``); such a group must not also have the
  optimizer's own ``weight_decay`` set, or the decay would be applied twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NamedTuple, cast, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_wd import functional as F
from lightning_wd.mixin import PLANNED_KEY, WDMixin, _resolved
from lightning_wd.plan import DecayPlan
from lightning_wd.rules import DecayRule
from lightning_wd.schedules import Cosine

__all__ = ["WeightDecayCallback"]

Mode = Literal["decoupled", "lr_ratio", "independent", "relative"]
Source = Literal["grad", "params", "update"]
Metric = Literal["mean_abs", "rms"]

#: Group key holding the λ the callback applies to a whole group (set by the hand-over).
WD_KEY = "lwd_weight_decay"
#: Group key holding the group's initial lr when no scheduler recorded ``initial_lr``.
INITIAL_LR_KEY = "lwd_initial_lr"

_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed keeps fp32 master copies of the parameters and would overwrite the decay;"
    " use the optimizer's own weight_decay with parameter groups from `lwd.build_param_groups`.",
    "FSDPStrategy": "FSDP (FSDP1) flattens parameters into flat buffers, so per-tensor rules and group norms cannot"
    " see them; shard with FSDP2 instead: strategy=ModelParallelStrategy() and `fully_shard(...,"
    " mesh=self.device_mesh['data_parallel'])` in the LightningModule's `configure_model` (sharded DTensor"
    " parameters are supported), or use strategy='ddp'.",
}


def _choice(value: Any, argument: str, choices: Any) -> None:
    options = get_args(choices)
    if value not in options:
        raise ValueError(
            f"`{argument}` must be one of {list(options)}, got {value!r}; use any of the following: "
            + ", ".join(repr(o) for o in options)
            + "."
        )


def _flag(value: Any, argument: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be True or False, got {type(value).__name__} {value!r}. Pass a bool.")


@dataclass
class _Bucket:
    """Parameters of one optimizer group that share a λ: the unit of decay and of logging.

    ``chunks`` split ``params`` by device and dtype; ``layouts`` holds, for each of their
    tensors, how a sharded (DTensor) parameter spreads over processes (``None`` when every
    process holds it whole); ``sharded`` says whether any parameter is a DTensor.
    """

    name: str
    group: dict[str, Any]
    weight_decay: float
    params: list[Tensor]
    chunks: list[list[Tensor]]
    numel: int
    checked_precision: bool = False
    layouts: list[list[F._Layout]] = field(default_factory=list)
    sharded: bool = False
    #: Per chunk: one flat view over its tensors when they lie back to back in memory (see
    #: ``functional.make_contiguous_``), and the addresses that view was made for.
    flats: list[Tensor | None] = field(default_factory=list)
    addresses: list[list[int]] = field(default_factory=list)

    def whole(self) -> list[Tensor]:
        """The group's tensors for a norm: each contiguous chunk as its one flat view, the others as they are."""
        if all(f is None for f in self.flats):
            return self.params
        out: list[Tensor] = []
        for c, chunk in enumerate(self.chunks):
            flat = self.flat(c)
            out.extend(chunk if flat is None else (flat,))
        return out

    def flat(self, c: int) -> Tensor | None:
        """Chunk ``c``'s flat view, if its tensors still lie where it was made (else rebuilt, or None)."""
        flat = self.flats[c] if self.flats else None
        if flat is None:
            return None
        chunk = self.chunks[c]
        if list(map(Tensor.data_ptr, chunk)) != self.addresses[c]:  # a parameter's data was replaced
            self.flats[c] = flat = F.flat_view(chunk)
            self.addresses[c] = list(map(Tensor.data_ptr, chunk))
        return flat


class _Part(NamedTuple):
    """One device/dtype chunk of a bucket at a step: the parameters that have a gradient."""

    params: list[Tensor]  # the parameters (DTensors where sharded): their `.grad`, their global norms
    tensors: list[Tensor]  # what the decay updates in place: the parameters, or their local shards
    layouts: list[F._Layout]
    before: list[Tensor]  # copies of `tensors` from just before the optimizer step, or []


@dataclass
class _OptimizerState:
    """What the callback keeps for one optimizer."""

    optimizer: Optimizer
    prefix: str
    owned: bool
    steps: int = 0
    buckets: list[_Bucket] = field(default_factory=list)
    signature: tuple[tuple[int, int], ...] = ()
    handle: Any = None
    snapshot: list[list[list[Tensor]]] | None = None
    sharded: bool = False  # some parameters are DTensors: every rank takes part in the norms' collectives


def _signature(optimizer: Optimizer) -> tuple[tuple[int, int], ...]:
    return tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def _with_grad(chunk: list[Tensor], *others: list[Any]) -> tuple[list[Any], ...]:
    """Keep only the tensors of ``chunk`` (and the matching ones of ``others``) that have a gradient."""
    if all(p.grad is not None for p in chunk):
        return (chunk, *others)
    keep = [i for i, p in enumerate(chunk) if p.grad is not None]
    return tuple([lst[i] for i in keep] for lst in (chunk, *others))


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """Each process's local shard of DTensors (sharing their storage; call under no_grad), other tensors as they are."""
    return [t.to_local() if F._is_dtensor(t) else t for t in tensors]


def _locals_of(bucket: _Bucket) -> list[list[Tensor]]:
    return [_local(chunk) for chunk in bucket.chunks] if bucket.sharded else bucket.chunks


class WeightDecayCallback(Callback):
    r"""Apply weight decay after every real optimizer step, with any optimizer, and log it per group.

    With η\ :sub:`t` the lr the optimizer used in the step (the group's ``lr``), η\ :sub:`0` the
    group's initial lr, and λ the group's decay times the schedule's multiplier:

    ============== ===============================================================
    ``mode``       update after the optimizer step
    ============== ===============================================================
    decoupled      ``p <- p * (1 - η_t λ)`` (follows the lr schedule)
    lr_ratio       ``p <- p * (1 - λ η_t / η_0)`` (the schedule's shape, not its scale)
    independent    ``p <- p * (1 - λ)``
    relative       ``p <- p - η_t λ m(s) p``, ``m`` the mean absolute value (or RMS) of ``s``
                   over the group, ``s`` the gradients, the parameters or the update
    ============== ===============================================================

    ``ord=1`` replaces the multiplication by the soft threshold with the same step,
    ``p <- sign(p) max(|p| - step, 0)``. ``cautious=True`` decays only the coordinates that
    the optimizer's update moved toward zero (``(p_new - p_old) p_old < 0``).

    Memory: the modes that need the update (``cautious=True``, ``source="update"``, and
    ``log_update_norm`` on logged steps) copy the decayed parameters just before the
    optimizer step and free the copy right after it: one extra copy of those parameters at
    the optimizer step, none during forward and backward. ``cautious`` and ``ord=1`` also use
    one transient tensor per decayed tensor inside the decay. The other modes keep nothing.

    Logged on the trainer's logging steps (``log_every_n_steps``), per group, as
    ``wd/<group>/<metric>`` (``wd/<optimizer>/<group>/<metric>`` with several optimizers):
    ``param_norm`` (L2 norm of the group's parameters after the decay), ``weight_decay``
    (the λ in force), ``timescale`` (the decay's averaging time in steps, ``1 / step`` of the
    multiplicative decay; ``threshold``, the soft-threshold step, for ``ord=1``), and
    optionally ``grad_norm`` and ``update_norm``. Nothing is computed on other steps.

    Sharded parameters (``ModelParallelStrategy`` with FSDP2's ``fully_shard`` in
    ``configure_model``, or tensor parallelism: DTensors with Shard and Replicate placements) are
    decayed on each rank's local shard, with the same kernels and no communication. The logged
    norms and ``relative`` mode's ``m`` are taken over the whole group on every rank: a few
    ``all_reduce`` calls per norm (one per device mesh dimension the group is sharded over), so
    with sharded parameters every rank measures on logged steps (rank zero alone logs), and
    ``relative`` mode communicates at every step. ``FSDPStrategy`` (FSDP1's flat parameters) and
    ``DeepSpeedStrategy`` are refused in ``setup``.

    Args:
        mode: How the step size follows the learning rate (see the table).
        rules: Decay rules for groups that do not come from ``WDMixin`` (a plain optimizer, or
            groups added during training); default: the module's ``decay_rules`` for a
            ``WDMixin`` module.
        ord: 2 for multiplicative decay, 1 for the L1 soft threshold.
        cautious: Decay only coordinates that the update moved toward zero.
        source: For ``mode="relative"``, what ``m`` is measured on.
        metric: For ``mode="relative"``, ``"mean_abs"`` or ``"rms"``.
        schedule: Multiplier of λ as a function of the optimizer step (see
            :mod:`lightning_wd.schedules`), or None for a constant λ.
        log_norms: Log ``param_norm``, ``weight_decay`` and ``timescale``.
        log_grad_norm: Also log the L2 norm of each group's gradients.
        log_update_norm: Also log the L2 norm of each group's optimizer update.

    Raises:
        ValueError: on an unknown ``mode``, ``source``, ``metric`` or ``ord``, or ``source``/``metric``
            given for a mode other than ``"relative"``.
        TypeError: on a flag that is not a bool, ``rules`` that are not DecayRule, or a
            ``schedule`` that is not callable.

    Example::

        >>> import lightning_wd as lwd
        >>> lwd.WeightDecayCallback(mode="lr_ratio", ord=1).state_key
        "WeightDecayCallback{'mode': 'lr_ratio', 'ord': 1, 'cautious': False}"
        >>> lwd.WeightDecayCallback(mode="adamw")
        Traceback (most recent call last):
        ...
        ValueError: `mode` must be one of ['decoupled', 'lr_ratio', 'independent', 'relative'], got 'adamw'; ...
    """

    def __init__(
        self,
        mode: Mode = "decoupled",
        *,
        rules: Sequence[DecayRule] | None = None,
        ord: Literal[1, 2] = 2,
        cautious: bool = False,
        source: Source | None = None,
        metric: Metric | None = None,
        schedule: Callable[[int], float] | None = None,
        log_norms: bool = True,
        log_grad_norm: bool = False,
        log_update_norm: bool = False,
    ) -> None:
        _choice(mode, "mode", Mode)
        if isinstance(ord, bool) or ord not in (1, 2):
            raise ValueError(
                f"`ord` must be 1 (L1 soft threshold) or 2 (multiplicative decay), got {ord!r}; use any of the"
                " following: 1, 2."
            )
        if mode != "relative" and (source is not None or metric is not None):
            raise ValueError(
                f"`source` and `metric` only apply to mode='relative', got mode={mode!r} with source={source!r},"
                f" metric={metric!r}. Use mode='relative' or drop them."
            )
        source = source if source is not None else "params"
        metric = metric if metric is not None else "mean_abs"
        _choice(source, "source", Source)
        _choice(metric, "metric", Metric)
        for value, argument in (
            (cautious, "cautious"),
            (log_norms, "log_norms"),
            (log_grad_norm, "log_grad_norm"),
            (log_update_norm, "log_update_norm"),
        ):
            _flag(value, argument)
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"`schedule` must be None or a callable step -> multiplier (for example"
                f" lwd.schedules.Cosine(start=1.0, end=0.1)), got {type(schedule).__name__} {schedule!r}."
            )
        if rules is not None:
            from lightning_wd.plan import _check_rules

            rules = list(_check_rules(rules))
        self.mode: Mode = mode
        self.rules = rules
        self.ord = ord
        self.cautious = cautious
        self.source: Source = source
        self.metric: Metric = metric
        self.schedule = schedule
        self.log_norms = log_norms
        self.log_grad_norm = log_grad_norm
        self.log_update_norm = log_update_norm

        self._states: list[_OptimizerState] = []
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None
        self._loaded_steps: list[int] | None = None
        self._loaded_total_steps: int | None = None
        self._total_steps: int | None = None
        self._rule_plan: dict[int, tuple[str, float]] | None = None
        self._warned_no_snapshot = False

    # ------------------------------------------------------------------ identity and state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, ord=self.ord, cautious=self.cautious)

    @override
    def state_dict(self) -> dict[str, Any]:
        steps = [s.steps for s in self._states] if self._states else (self._loaded_steps or [])
        return {"version": 1, "steps": list(steps), "total_steps": self._total_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_steps = [int(s) for s in state_dict.get("steps", [])]
        total = state_dict.get("total_steps")
        self._loaded_total_steps = int(total) if total is not None else None

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        for refused, why in _REFUSED_STRATEGIES.items():
            if any(klass.__name__ == refused for klass in type(trainer.strategy).__mro__):
                raise MisconfigurationException(f"WeightDecayCallback does not support `strategy`={name}: {why}")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer
        self._module = pl_module
        self._rule_plan = None
        if isinstance(self.schedule, Cosine) and self.schedule.total_steps is None:
            total = self._loaded_total_steps or trainer.estimated_stepping_batches
            # (an iterable of unknown length without max_steps is estimated as max_steps, -1)
            if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total) or total < 1:
                raise MisconfigurationException(
                    "`schedule` is a Cosine without `total_steps`, and the trainer cannot estimate the number of"
                    " steps (no max_steps, and an iterable of unknown length). Give Cosine(total_steps=...)."
                )
            self.schedule = self.schedule.with_total_steps(int(total))
            self._total_steps = int(total)
        if self.schedule is not None:
            _check_schedule(self.schedule, (self._loaded_steps or [0])[0])

        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise MisconfigurationException("WeightDecayCallback needs an optimizer, but the trainer has none.")
        prefixes = _optimizer_prefixes(optimizers)
        owns = [all(PLANNED_KEY in g or WD_KEY in g for g in opt.param_groups) for opt in optimizers]
        if not all(owns) and self.rules is None and not isinstance(pl_module, WDMixin):
            raise MisconfigurationException(
                "WeightDecayCallback does not know the weight decay of the optimizer's parameter groups: they were"
                " not built by `lwd.WDMixin`. Pass `rules=` (for example"
                " WeightDecayCallback(rules=lwd.presets.standard(0.05))) or build the optimizer with WDMixin."
            )
        # Plan everything first, check it, and only then touch the optimizers: an error leaves them as they were.
        states = [
            _OptimizerState(optimizer=o, prefix=p, owned=w) for o, p, w in zip(optimizers, prefixes, owns, strict=True)
        ]
        planned = [self._plan_buckets(s, fit_start=True) for s in states]
        _check_unique_names([st.prefix + b.name for st, (bs, _) in zip(states, planned, strict=True) for b in bs])
        for state, (buckets, handover) in zip(states, planned, strict=True):
            self._install(state, buckets, handover)
        loaded = self._loaded_steps or []
        for i, state in enumerate(states):
            state.steps = loaded[i] if i < len(loaded) else 0
        self._remove_hooks()
        for state in states:
            state.handle = state.optimizer.register_step_post_hook(partial(self._after_step, state))
        self._states = states

    def _rules_by_param(self) -> dict[int, tuple[str, float]]:
        """id(param) -> (rule group, λ) from the callback's rules or the module's decay_rules (frozen included)."""
        if self._rule_plan is None:
            module = self._module
            assert module is not None
            if self.rules is not None:
                plan = DecayPlan.from_module(module, self.rules, include_frozen=True)
            else:
                options = {**dict(_resolved(module, "decay_plan_options") or {}), "include_frozen": True}
                plan = DecayPlan.from_module(module, _resolved(module, "decay_rules"), **options)
            self._rule_plan = {id(p): (g.name, g.weight_decay) for g in plan.groups for p in g.params}
        return self._rule_plan

    def _plan_buckets(
        self, state: _OptimizerState, *, fit_start: bool
    ) -> tuple[list[_Bucket], list[tuple[dict[str, Any], float]]]:
        """Buckets for every group of ``state.optimizer``, and the hand-overs to make (group, λ)."""
        buckets: list[_Bucket] = []
        handover: list[tuple[dict[str, Any], float]] = []
        groups = state.optimizer.param_groups
        for index, group in enumerate(groups):
            label = str(group.get("name", f"pg{index + 1}"))
            params = [p for p in group["params"]]
            own_wd = group.get("weight_decay", 0.0)
            if WD_KEY in group or PLANNED_KEY in group:
                if WD_KEY in group:
                    wd = float(group[WD_KEY])
                    if own_wd:
                        handover.append((group, wd))  # resumed from a run whose optimizer kept its decay
                else:
                    wd = float(own_wd)
                    handover.append((group, wd))
                buckets.append(_make_bucket(label, group, wd, params))
                continue
            by_rule: dict[tuple[str, float], list[Tensor]] = {}
            plan = self._rules_by_param()
            for p in params:
                by_rule.setdefault(plan.get(id(p), ("unplanned", 0.0)), []).append(p)
            decays = any(wd > 0 for _, wd in by_rule)
            if decays and own_wd:
                if state.owned or (not fit_start and isinstance(self._module, WDMixin)):
                    rank_zero_warn(
                        f"Optimizer group {label!r} was added with the optimizer's own weight_decay={own_wd}; its"
                        " decay now comes from the decay rules through WeightDecayCallback, so the optimizer's"
                        " value is set to 0 to avoid decaying twice."
                    )
                    handover.append((group, math.nan))
                else:
                    raise MisconfigurationException(
                        f"Optimizer group {label!r} has the optimizer's own `weight_decay`={own_wd}, and"
                        " WeightDecayCallback decays its parameters too, so they would be decayed twice. Set"
                        " weight_decay=0.0 for that group (or on the optimizer), or build the optimizer with"
                        " `lwd.WDMixin`, whose groups are handed over to the callback automatically."
                    )
            several = len(groups) > 1 or "name" in group
            for (rule_group, wd), ps in by_rule.items():
                name = f"{label}/{rule_group}" if several and label != rule_group else rule_group
                buckets.append(_make_bucket(name, group, wd, ps))
        if self.mode == "lr_ratio":
            for b in buckets:
                initial = b.group.get("initial_lr", b.group.get(INITIAL_LR_KEY, b.group["lr"]))
                if b.weight_decay > 0 and not initial:
                    raise MisconfigurationException(
                        f"`mode`='lr_ratio' divides by the group's initial lr, but group {b.name!r} starts at lr=0."
                        " Start the group at its peak lr and warm up with a scheduler (which records"
                        " `initial_lr`), or use mode='decoupled'."
                    )
        return buckets, handover

    def _install(
        self, state: _OptimizerState, buckets: list[_Bucket], handover: list[tuple[dict[str, Any], float]]
    ) -> None:
        for group, wd in handover:
            if not math.isnan(wd):
                group[WD_KEY] = wd
            group["weight_decay"] = 0.0
        for b in buckets:
            if "initial_lr" not in b.group:
                b.group.setdefault(INITIAL_LR_KEY, b.group["lr"])
        state.buckets = buckets
        state.sharded = any(b.sharded for b in buckets)
        state.signature = _signature(state.optimizer)
        state.snapshot = None

    def _refresh(self, state: _OptimizerState) -> None:
        """Rebuild the buckets when the optimizer's groups changed (for example a BaseFinetuning unfreeze)."""
        if _signature(state.optimizer) == state.signature:
            return
        self._rule_plan = None
        buckets, handover = self._plan_buckets(state, fit_start=False)
        _check_unique_names([b.name for b in buckets])
        self._install(state, buckets, handover)

    def _remove_hooks(self) -> None:
        for state in self._states:
            if state.handle is not None:
                state.handle.remove()
                state.handle = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loaded_steps = [s.steps for s in self._states] or self._loaded_steps
            self._remove_hooks()
            for s in self._states:
                s.snapshot = None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ the step path
    def _needs_snapshot(self, logging: bool) -> bool:
        return (
            self.cautious or (self.mode == "relative" and self.source == "update") or (logging and self.log_update_norm)
        )

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        state = self._state_of(optimizer)
        if state is None:
            return
        self._refresh(state)
        # Whether this step logs matters only for the update norm: don't ask the trainer otherwise.
        if not self._needs_snapshot(self.log_update_norm and self._logging_step(state)):
            state.snapshot = None
            return
        state.snapshot = [
            [list(torch._foreach_mul(chunk, F._factor(1.0, chunk))) for chunk in _locals_of(b)]
            if b.weight_decay > 0 or self.log_update_norm
            else []
            for b in state.buckets
        ]

    def _state_of(self, optimizer: Any) -> _OptimizerState | None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        for s in self._states:
            if s.optimizer is optimizer:
                return s
        return None

    def _logging_step(self, state: _OptimizerState) -> bool:
        """Whether this process measures the norms of ``state``'s groups at this step.

        Loggers write on rank zero only. Replicated parameters are the same on every rank: rank zero
        measures them alone, with no collective. Sharded ones need every rank in the norms' collectives,
        in the same order: then every rank measures (the decision depends only on the step, the same
        everywhere), and only rank zero logs.
        """
        trainer = self._trainer
        if trainer is None or not (self.log_norms or self.log_grad_norm or self.log_update_norm):
            return False
        if not trainer.loggers or not (state.sharded or trainer.is_global_zero):
            return False
        return bool(trainer._logger_connector.should_update_logs)

    @torch.no_grad()
    def _after_step(self, state: _OptimizerState, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._refresh(state)
        multiplier = 1.0 if self.schedule is None else float(self.schedule(state.steps))
        found_inf = getattr(optimizer, "found_inf", None)
        logging = self._logging_step(state)
        snapshot, state.snapshot = state.snapshot, None
        metrics: dict[str, Tensor | float] = {}
        for index, bucket in enumerate(state.buckets):
            wd = bucket.weight_decay * multiplier
            befores = snapshot[index] if snapshot is not None and snapshot[index] else None
            # per device/dtype chunk: the parameters with a gradient, and what the decay updates
            parts = []
            for c, chunk in enumerate(bucket.chunks):
                if befores is None:
                    params, layouts = _with_grad(chunk, bucket.layouts[c])
                    before: list[Tensor] = []
                else:
                    params, layouts, before = _with_grad(chunk, bucket.layouts[c], befores[c])
                    befores[c] = before  # drop the copies of tensors without a gradient; the decay frees the rest
                if params:
                    local = bucket.sharded and (wd > 0 or logging)  # the local shards, where they are used
                    flat = bucket.flat(c) if params is chunk and not before and wd > 0 else None
                    if flat is not None:  # every tensor of a contiguous chunk: one kernel over its buffer
                        parts.append(_Part(params, [flat], [None], before))
                    else:
                        parts.append(_Part(params, _local(params) if local else params, layouts, before))
            step: Tensor | float | None = None
            if parts:
                if logging:
                    self._update_metrics(bucket, parts, metrics)
                if wd > 0 and befores is None and self._needs_snapshot(False):
                    self._warn_no_snapshot(bucket)
                elif wd > 0:
                    step = self._step_size(bucket, wd, parts)
                    if found_inf is not None:  # a select, not a product: relative m is inf/NaN on overflow
                        step = torch.where(found_inf.to(dtype=torch.float32) > 0, 0.0, step)
                    if not bucket.checked_precision and isinstance(step, float):
                        _warn_if_rounds_away(bucket, [part.tensors[0].dtype for part in parts], step)
                    for part in parts:
                        mask = F.cautious_mask(part.tensors, part.before) if self.cautious else None
                        part.before.clear()  # last use of this chunk's copy: free it before the decay allocates
                        F.apply_decay_(part.tensors, step, ord=self.ord, mask=mask)
                bucket.checked_precision = True
            if logging:
                self._bucket_metrics(bucket, wd, step, metrics)
        state.steps += 1
        if logging and metrics:
            self._log(state, metrics)

    def _warn_no_snapshot(self, bucket: _Bucket) -> None:
        if not self._warned_no_snapshot:
            self._warned_no_snapshot = True
            rank_zero_warn(
                f"WeightDecayCallback skipped the decay of group {bucket.name!r} for a step: cautious=True and"
                " source='update' need the parameters from just before the step, which Lightning's"
                " `on_before_optimizer_step` provides, but this optimizer was stepped without it (a raw"
                " `optimizer.step()` outside Lightning). Step it through `self.optimizers()` in manual optimization."
            )

    def _step_size(self, bucket: _Bucket, wd: float, parts: list[_Part]) -> Tensor | float:
        lr = bucket.group["lr"]
        if self.mode == "decoupled":
            return lr * wd
        if self.mode == "independent":
            return wd
        if self.mode == "lr_ratio":
            initial = bucket.group.get("initial_lr", bucket.group.get(INITIAL_LR_KEY, lr))
            return wd * lr / initial
        # relative: m measured over the whole bucket (all ranks' shards), on the tensors that have a gradient.
        measure_of = F._mean_abs if self.metric == "mean_abs" else F._rms
        if self.source == "grad":  # gradients have their own placements: let the functional read them
            grads = [cast(Tensor, p.grad) for part in parts for p in part.params]
            return (F.mean_abs(grads) if self.metric == "mean_abs" else F.rms(grads)) * (lr * wd)
        if sum(len(part.params) for part in parts) == len(bucket.params):
            numel = bucket.numel  # every parameter has a gradient
        else:
            numel = sum(p.numel() for part in parts for p in part.params)  # of the whole tensors
        layouts = [layout for part in parts for layout in part.layouts] if bucket.sharded else None
        if self.source == "params":
            tensors = [t for part in parts for t in part.tensors]
        else:
            if not parts[0].before:
                raise RuntimeError("mode='relative', source='update' needs the parameters from before the step.")
            if self.cautious:  # the mask still needs the copies
                tensors = [d for part in parts for d in torch._foreach_sub(part.tensors, part.before)]
            else:  # no second copy: before - after in place (m() does not depend on the sign)
                for part in parts:
                    torch._foreach_sub_(part.before, part.tensors)
                tensors = [d for part in parts for d in part.before]
        return measure_of(tensors, layouts, numel) * (lr * wd)

    # ------------------------------------------------------------------ logging
    def _update_metrics(self, bucket: _Bucket, parts: list[_Part], metrics: dict[str, Tensor | float]) -> None:
        """Norms of the gradients and of the optimizer's update (before the decay), when asked for."""
        if self.log_grad_norm:
            grads = [cast(Tensor, p.grad) for part in parts for p in part.params]
            metrics[f"{bucket.name}/grad_norm"] = F.global_norm(grads)
        if self.log_update_norm and parts[0].before:
            deltas = [d for part in parts for d in torch._foreach_sub(part.tensors, part.before)]
            layouts = [layout for part in parts for layout in part.layouts] if bucket.sharded else None
            metrics[f"{bucket.name}/update_norm"] = F._global_norm(deltas, layouts)

    def _bucket_metrics(
        self, bucket: _Bucket, wd: float, step: Tensor | float | None, metrics: dict[str, Tensor | float]
    ) -> None:
        if not self.log_norms:
            return
        name = bucket.name
        metrics[f"{name}/param_norm"] = F.global_norm(bucket.whole())
        metrics[f"{name}/weight_decay"] = wd
        if step is None:
            return
        if self.ord == 1:
            metrics[f"{name}/threshold"] = step
        else:
            metrics[f"{name}/timescale"] = 1.0 / step if isinstance(step, Tensor) or step > 0 else math.inf

    def _log(self, state: _OptimizerState, metrics: dict[str, Tensor | float]) -> None:
        trainer = self._trainer
        assert trainer is not None
        if not trainer.is_global_zero:  # the other ranks only took part in the collectives
            return
        keys = list(metrics)
        tensors = [(k, v) for k, v in metrics.items() if isinstance(v, Tensor)]
        values: dict[str, float] = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
        if tensors:
            device = tensors[0][1].device
            stacked = torch.stack([v.detach().float().to(device) for _, v in tensors]).tolist()  # one host sync
            values.update({k: float(x) for (k, _), x in zip(tensors, stacked, strict=True)})
        out = {f"wd/{state.prefix}{k}": values[k] for k in keys}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(out, step=step)


def _make_bucket(name: str, group: dict[str, Any], wd: float, params: list[Tensor]) -> _Bucket:
    chunks = F.group_by_device_and_dtype(params)
    sharded = any(F._is_dtensor(p) for p in params)
    flats = [None if sharded or len(chunk) < 2 else F.flat_view(chunk) for chunk in chunks]
    return _Bucket(
        name=name,
        group=group,
        weight_decay=wd,
        params=params,
        chunks=chunks,
        numel=sum(p.numel() for p in params),  # a DTensor's numel is that of the whole tensor
        layouts=[[_layout(name, p) for p in chunk] for chunk in chunks],
        sharded=sharded,
        flats=flats,
        addresses=[
            list(map(Tensor.data_ptr, chunk)) if flat is not None else []
            for chunk, flat in zip(chunks, flats, strict=True)
        ],
    )


def _layout(group: str, p: Tensor) -> F._Layout:
    try:
        return F._layout(p)
    except ValueError:
        raise MisconfigurationException(
            "WeightDecayCallback decays each process's local shard of a sharded parameter, which is exact for Shard"
            f" and Replicate placements only, but a parameter of group {group!r} is a DTensor with placements"
            f" {tuple(getattr(p, 'placements', ()))}. Shard or replicate it in `configure_model` (FSDP2's"
            " `fully_shard`, or `distribute_tensor` with Shard/Replicate placements), or leave that group's weight"
            " decay to the optimizer."
        ) from None


def _warn_if_rounds_away(bucket: _Bucket, dtypes: list[torch.dtype], step: float) -> None:
    low = [d for d in dtypes if d in (torch.float16, torch.bfloat16)]
    if not low or step <= 0:
        return
    dtype = low[0]
    eps = torch.finfo(dtype).eps
    if step < eps / 2:
        rank_zero_warn(
            f"Weight decay of group {bucket.name!r} rounds to nothing: its {dtype} parameters are multiplied by"
            f" (1 - {step:.3g}), but {dtype} cannot represent a relative change below {eps / 2:.3g}. Keep fp32"
            " parameters (precision='bf16-mixed' or '16-mixed' instead of a '-true' precision), or use a larger"
            " step (mode='independent')."
        )


def _check_schedule(schedule: Callable[[int], float], step: int) -> None:
    """Refuse, at fit start, a schedule whose first multiplier is not a finite number >= 0."""
    value = schedule(step)
    try:
        multiplier = float(value)
    except (TypeError, ValueError):
        multiplier = math.nan
    if isinstance(value, bool) or not math.isfinite(multiplier) or multiplier < 0:
        raise MisconfigurationException(
            f"`schedule` must return a finite multiplier >= 0, but schedule({step}) returned"
            f" {type(value).__name__} {value!r}. Fix the schedule, or use one of lwd.schedules"
            " (Constant, LinearWarmup, Cosine)."
        )


def _optimizer_prefixes(optimizers: Sequence[Optimizer]) -> list[str]:
    """'' for one optimizer, else '<ClassName>/', '-k' suffixed for repeated classes (as LearningRateMonitor)."""
    if len(optimizers) == 1:
        return [""]
    seen: dict[str, int] = {}
    out = []
    for opt in optimizers:
        name = type(opt).__name__
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(f"{name}-{count}/" if count else f"{name}/")
    return out


def _check_unique_names(names: Sequence[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MisconfigurationException(
            f"Several optimizer parameter groups are named {dupes}; WeightDecayCallback logs per group and needs"
            " unique names. Give each group a unique `name`."
        )
