"""``WeightDecay``: decay applied after every real step of any torch optimizer (pure torch, no Lightning).

One source of truth for λ: a parameter group's own ``weight_decay``, the value every tool of the
ecosystem reads and writes (LearningRateMonitor, weight-decay schedules, timm, checkpoint loaders,
a resume without this package). The engine takes the decay out of the optimizer only for the
duration of each step, and never leaves a group changed outside it:

1. the optimizer's ``step`` is wrapped on the instance; the wrapper reads each group's
   ``weight_decay`` (λ) and sets it to 0, so the optimizer's own update carries no decay;
2. the optimizer steps (its closure, if any, runs inside, as torch and Lightning call it);
3. in a ``finally`` block, each group's λ is written back, so that an exception in the closure or
   the step never leaves 0 behind; a value written during the step (by a hook) is kept;
4. if the step really happened, the decay is applied with the λ read in 1.

A step the AMP grad scaler skips never calls ``step`` (no decay); a fused optimizer that the scaler
steps on overflow is given ``found_inf``, which zeroes the decay on the device, with no host sync.
Because the decay is read from the group at every step, code that writes ``weight_decay`` during
training (a DINO-style schedule) is followed at the next step, and a resume from any checkpoint that
restores the optimizer's groups restores λ.

Groups built from a plan (``build_param_groups``, ``WDMixin``)
are decayed as a whole with their λ. With ``rules=`` (and the ``module`` to name the parameters),
a group built from raw parameters with ``weight_decay=0`` has its tensors decayed as the rules say
(the rules are the engine's configuration; the group's own λ, 0, is what the optimizer applies
without the engine); a group with its own ``weight_decay`` that the rules would decay differently is
refused when the engine is attached, and decayed with its own λ (with a warning) when it appears
later.
"""

from __future__ import annotations

import math
import types
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, repeat
from operator import attrgetter, is_
from typing import Any, Literal, NamedTuple, cast, get_args

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_wd import _fsdp
from lightning_wd import functional as F
from lightning_wd._compat import (
    inner_optimizer,
    keep_step_pre_hook_last,
    mark_wrapped_by_lr_scheduler,
    wrapped_by_lr_scheduler,
)
from lightning_wd.plan import _WRAPPER_ATTRS, PLANNED_KEY, DecayPlan, _check_plan_options, _check_rules
from lightning_wd.rules import DecayRule
from lightning_wd.schedules import weight_decay_from_timescale

__all__ = ["WeightDecay"]

Mode = Literal["decoupled", "lr_ratio", "independent", "relative", "corrected"]
Source = Literal["grad", "params", "update"]
Metric = Literal["mean_abs", "rms"]

#: Group key holding the group's initial lr when no scheduler recorded ``initial_lr`` (``lr_ratio``).
INITIAL_LR_KEY = "lwd_initial_lr"
#: Keys of checkpoints written before λ lived in ``weight_decay`` alone (read once, then removed).
LEGACY_WD_KEY = "lwd_weight_decay"
LEGACY_PLANNED_KEY = "lwd_planned_weight_decay"

_STATE_VERSION = 2


class SetupError(ValueError):
    """A configuration that cannot be decayed correctly, found when the engine is attached."""


def _warn(message: str) -> None:
    """Warn once per process group: on rank zero only when torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    warnings.warn(message, UserWarning, stacklevel=3)


def _choice(value: Any, argument: str, choices: Any) -> None:
    options = get_args(choices)
    if isinstance(value, bool) or value not in options:
        raise ValueError(
            f"`{argument}` must be one of {list(options)}, got {value!r}; use any of the following: "
            + ", ".join(repr(o) for o in options)
            + "."
        )


def _flag(value: Any, argument: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be True or False, got {type(value).__name__} {value!r}. Pass a bool.")


@dataclass(frozen=True)
class DecayOptions:
    """The validated options of a decay: shared by ``WeightDecay`` and the Lightning callback.

    ``toward`` (``"init"``, or a state dict of reference weights) decays toward a reference ``p0``
    instead of zero; ``timescale_fraction`` sets each decayed group's λ so that the decay's timescale
    ``1 / (η λ)`` is that fraction of the run.

    Raises:
        ValueError: on an unknown ``mode``, ``source``, ``metric`` or ``ord``, ``source``/``metric``
            given for a mode other than ``"relative"``, ``toward`` or ``timescale_fraction`` with
            ``mode="relative"``, ``timescale_fraction`` with ``ord=1`` or not a finite number > 0,
            ``fused`` without ``cautious`` or with ``toward``.
        TypeError: on ``cautious`` that is not a bool, ``fused`` that is not a bool or None, a
            ``schedule`` that is not callable, or ``toward`` that is neither ``"init"`` nor a mapping
            of names to tensors.
    """

    mode: Mode = "decoupled"
    ord: Literal[1, 2] = 2
    cautious: bool = False
    source: Source | None = None
    metric: Metric | None = None
    schedule: Callable[[int], float] | None = None
    toward: Literal["init"] | Mapping[str, Tensor] | None = field(default=None, compare=False, repr=False)
    timescale_fraction: float | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        _choice(self.mode, "mode", Mode)
        if isinstance(self.ord, bool) or self.ord not in (1, 2):
            raise ValueError(
                f"`ord` must be 1 (L1 soft threshold) or 2 (multiplicative decay), got {self.ord!r}; use any of"
                " the following: 1, 2."
            )
        if self.mode != "relative" and (self.source is not None or self.metric is not None):
            raise ValueError(
                f"`source` and `metric` only apply to mode='relative', got mode={self.mode!r} with"
                f" source={self.source!r}, metric={self.metric!r}. Use mode='relative' or drop them."
            )
        object.__setattr__(self, "source", self.source if self.source is not None else "params")
        object.__setattr__(self, "metric", self.metric if self.metric is not None else "mean_abs")
        _choice(self.source, "source", Source)
        _choice(self.metric, "metric", Metric)
        _flag(self.cautious, "cautious")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(
                f"`fused` must be None (the compiled kernel where it pays: large CPU groups), True or False, got"
                f" {type(self.fused).__name__} {self.fused!r}. Pass a bool or None."
            )
        if self.fused and not (
            (self.cautious and self.toward is None) or (self.mode == "relative" and self.metric == "mean_abs")
        ):
            raise ValueError(
                f"`fused`=True compiles the cautious mask and decay, and relative's mean_abs measure, so it needs"
                f" cautious=True without `toward`, or mode='relative' with metric='mean_abs'; got"
                f" cautious={self.cautious!r}, toward={'given' if self.toward is not None else None},"
                f" mode={self.mode!r}, metric={self.metric!r}. Pass cautious=True (and no `toward`) or"
                " mode='relative', or drop fused."
            )
        if self.schedule is not None and not callable(self.schedule):
            raise TypeError(
                f"`schedule` must be None or a callable step -> multiplier (for example"
                f" lwd.schedules.Cosine(start=1.0, end=0.1)), got {type(self.schedule).__name__} {self.schedule!r}."
            )
        _check_toward(self.toward, self.mode)
        _check_timescale_fraction(self.timescale_fraction, self.mode, self.ord)

    def needs_snapshot(self, tracking_updates: bool) -> bool:
        """Whether a step needs the parameters from just before it."""
        return self.cautious or (self.mode == "relative" and self.source == "update") or tracking_updates


def _check_toward(toward: Any, mode: str) -> None:
    if toward is None:
        return
    if isinstance(toward, str):
        if toward != "init":
            raise ValueError(
                f"`toward` must be None, 'init' or a state dict of reference weights, got {toward!r}; use 'init'"
                " (the parameters when the decay starts) or pass for example `pretrained.state_dict()`."
            )
    elif not isinstance(toward, Mapping) or not all(isinstance(k, str) for k in toward):
        raise TypeError(
            f"`toward` must be None, 'init' or a mapping of parameter names to tensors (a state dict), got"
            f" {type(toward).__name__}. Pass 'init' or for example `pretrained.state_dict()`."
        )
    if mode == "relative":
        raise ValueError(
            "`toward` decays toward reference weights with a step η·λ, which mode='relative' would scale by a"
            f" measure of the weights themselves; got mode={mode!r} with toward. Use mode='decoupled' (or"
            " 'corrected', 'lr_ratio', 'independent') with `toward`."
        )


def _check_timescale_fraction(fraction: Any, mode: str, ord: int) -> None:
    if fraction is None:
        return
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < math.inf:
        raise ValueError(
            f"`timescale_fraction` must be None or a finite number > 0 (the decay timescale 1/(η·λ) as a fraction"
            f" of the run), got {fraction!r}. Pass for example timescale_fraction=0.25."
        )
    if mode == "relative" or ord == 1:
        raise ValueError(
            "`timescale_fraction` sets λ from the timescale 1/(η·λ) of a multiplicative decay, which"
            f" mode='relative' and ord=1 do not have; got mode={mode!r}, ord={ord!r}. Use ord=2 with mode"
            " 'decoupled', 'corrected', 'lr_ratio' or 'independent', or set λ yourself."
        )


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside Lightning's, Fabric's or accelerate's optimizer wrappers.

    Raises:
        TypeError: if ``optimizer`` is not a torch optimizer or such a wrapper.
    """
    inner = optimizer
    for _ in range(8):
        nested = inner_optimizer(inner)  # LightningOptimizer, Fabric's _FabricOptimizer
        if not isinstance(nested, Optimizer) and hasattr(inner, "param_groups"):
            nested = getattr(inner, "optimizer", None)  # accelerate's AcceleratedOptimizer (not an LR scheduler)
        if not isinstance(nested, Optimizer) or nested is inner:
            break
        inner = nested
    if not isinstance(inner, Optimizer):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer (or Lightning's, Fabric's or accelerate's wrapper of one),"
            f" got {type(optimizer).__name__} {optimizer!r}. Pass the optimizer itself, for example"
            " lwd.WeightDecay(torch.optim.AdamW(groups, lr=3e-4))."
        )
    return inner


def migrate_legacy_groups_(optimizer: Optimizer) -> list[str]:
    """Move λ of groups restored from an older checkpoint back into ``weight_decay``.

    Checkpoints written before λ lived in ``weight_decay`` alone held the decay under
    ``lwd_weight_decay`` with the group's ``weight_decay`` set to 0. Returns the groups moved.
    """
    moved = []
    for index, group in enumerate(optimizer.param_groups):
        if LEGACY_PLANNED_KEY in group:
            group.pop(LEGACY_PLANNED_KEY)
            group[PLANNED_KEY] = True
        if LEGACY_WD_KEY in group:
            group["weight_decay"] = float(group.pop(LEGACY_WD_KEY))
            moved.append(f"{group.get('name', f'pg{index + 1}')}={group['weight_decay']}")
    return moved


@dataclass
class _Bucket:
    """Parameters of one optimizer group that share a λ: the unit of decay and of logging.

    ``rule_wd`` is None for a group decayed as a whole (λ is the group's ``weight_decay``, read at
    every step), else the λ the rules give these tensors of a raw group. ``chunks`` split
    ``params`` by device and dtype (``dtypes`` records them, to notice a ``.half()``); ``layouts``
    holds, per chunk tensor, how a sharded (DTensor) parameter spreads over processes.
    """

    name: str
    group: dict[str, Any]
    index: int
    rule_wd: float | None
    params: list[Tensor]
    chunks: list[list[Tensor]]
    dtypes: list[torch.dtype]
    numel: int
    layouts: list[list[F._Layout]] = field(default_factory=list)
    #: Per chunk: its element count (of the local shards where sharded), for the kernels' choice of path.
    numels: list[int] = field(default_factory=list)
    sharded: bool = False
    #: Per chunk: one flat view over its tensors when they lie back to back in memory (see
    #: ``functional.make_contiguous_``), and the addresses that view was made for.
    flats: list[Tensor | None] = field(default_factory=list)
    addresses: list[list[int]] = field(default_factory=list)
    checked_precision: bool = False
    warned_clamp: bool = False
    #: What the last step applied: λ·multiplier and the step size (a number or a 0-dim tensor).
    last_wd: float | None = None
    last_step: Tensor | float | None = None
    update_norm: Tensor | None = None
    #: FSDP1 views (``use_orig_params=True``): the layout of every tensor, in chunk order, the same on
    #: every rank (norms reduce over each of them, also where a rank has none of its tensors), else None.
    views: list[F._Layout] | None = None
    #: ``toward``: per chunk, the reference ``p0`` of each of its tensors (None until taken).
    reference: list[list[Tensor]] | None = None
    #: Diagnostics of the last tracked step: ``‖Δp‖/‖p‖`` and the angle between p before and after it.
    update_ratio: Tensor | None = None
    angular_update: Tensor | None = None
    #: The parameter norm measured in the last step's decay pass (``norms_in_step``), with the
    #: tensors' addresses and version counters just after it: valid while those are unchanged.
    norm_in_step: tuple[Tensor, tuple[list[int], list[int]]] | None = None

    @property
    def weight_decay(self) -> float:
        """The λ of these tensors now: the rules', or the group's own ``weight_decay``."""
        return self.rule_wd if self.rule_wd is not None else float(self.group.get("weight_decay", 0.0))

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

    def stale(self) -> bool:
        """Whether a parameter changed dtype or device since the bucket was built (``.half()``, ``.to()``)."""
        return any(chunk[0].dtype != dtype for chunk, dtype in zip(self.chunks, self.dtypes, strict=True))


class _Part(NamedTuple):
    """One device/dtype chunk of a bucket at a step: the parameters that have a gradient."""

    params: list[Tensor]  # the parameters (DTensors where sharded): their `.grad`, their global norms
    tensors: list[Tensor]  # what the decay updates in place: the parameters, or their local shards
    layouts: list[F._Layout]
    before: list[Tensor]  # copies of `tensors` from just before the optimizer step, or []
    numel: int | None = None  # the element count of `tensors`, where known without a pass over them


_grad_of = attrgetter("grad")

#: The 0.0 a group holds while the engine has its λ, told by identity from a 0.0 written by anyone else.
_TAKEN = float("0")


def _with_grad(chunk: list[Tensor], *others: list[Any]) -> tuple[list[Any], ...]:
    """Keep only the tensors of ``chunk`` (and the matching ones of ``others``) that have a gradient.

    When every tensor has one (the steady state), this is one C-speed pass over the gradients and
    returns the lists themselves: no Python code runs per tensor.
    """
    grads = list(map(_grad_of, chunk))
    if not any(map(is_, grads, repeat(None))):
        return (chunk, *others)
    keep = [i for i, g in enumerate(grads) if g is not None]
    return tuple([lst[i] for i in keep] for lst in (chunk, *others))


_version_of = attrgetter("_version")


def _versions(bucket: _Bucket) -> tuple[list[int], list[int]]:
    """The addresses and version counters of a bucket's parameters, and of the flat views it decays them through.

    Any in-place change or replaced ``.data`` changes one of them. Both are needed: a parameter laid out
    in a contiguous buffer has a version counter of its own, which an in-place change through the
    parameter bumps and one through the buffer's flat view does not (and the other way round).
    """
    whole = bucket.whole()
    tensors = bucket.params if whole is bucket.params else [*bucket.params, *whole]
    return list(map(Tensor.data_ptr, tensors)), list(map(_version_of, tensors))


def _joined(lists: list[list[Any]]) -> list[Any]:
    """The lists one after the other: the one list itself when there is one (C-speed otherwise)."""
    return lists[0] if len(lists) == 1 else list(chain.from_iterable(lists))


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """Each process's local shard of DTensors (sharing their storage; call under no_grad), other tensors as they are."""
    return [t.to_local() if F._is_dtensor(t) else t for t in tensors]


def _make_bucket(name: str, group: dict[str, Any], index: int, rule_wd: float | None, params: list[Tensor]) -> _Bucket:
    chunks = F.group_by_device_and_dtype(params)
    sharded = any(F._is_dtensor(p) for p in params)
    flats = [None if sharded or len(chunk) < 2 else F.flat_view(chunk) for chunk in chunks]
    return _Bucket(
        name=name,
        group=group,
        index=index,
        rule_wd=rule_wd,
        params=params,
        chunks=chunks,
        dtypes=[chunk[0].dtype for chunk in chunks],
        numel=sum(p.numel() for p in params),  # a DTensor's numel is that of the whole tensor
        layouts=[[_layout(name, p) for p in chunk] for chunk in chunks],
        numels=[sum(map(Tensor.numel, _local(chunk) if sharded else chunk)) for chunk in chunks],
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
        raise SetupError(
            "Weight decay is applied to each process's local shard of a sharded parameter, which is exact for Shard"
            f" and Replicate placements only, but a parameter of group {group!r} is a DTensor with placements"
            f" {tuple(getattr(p, 'placements', ()))}. Shard or replicate it (FSDP2's `fully_shard`, or"
            " `distribute_tensor` with Shard/Replicate placements), or leave that group's weight decay to the"
            " optimizer."
        ) from None


def _lambda(value: Any) -> float | None:
    """A group's ``weight_decay`` as a float, or None when it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _signature(optimizer: Optimizer) -> tuple[tuple[int, int, int, Any], ...]:
    """What identifies the optimizer's groups: a change means groups were added, replaced, renamed or refilled."""
    return tuple((id(g), id(g["params"]), len(g["params"]), g.get("name")) for g in optimizer.param_groups)


def _duplicates(names: Sequence[str]) -> list[str]:
    """The duplicated names among ``names`` (in first-seen order), in one pass."""
    return [n for n, count in Counter(names).items() if count > 1]


def _dedupe(names: list[str]) -> list[str]:
    """``names`` with each repeat suffixed ``-1``, ``-2``, ... (as LearningRateMonitor does for optimizers)."""
    seen: Counter[str] = Counter()
    taken = set(names)
    out = []
    for n in names:
        k = seen[n]
        seen[n] += 1
        candidate = n
        while k and (candidate := f"{n}-{k}") in taken:
            k += 1
        taken.add(candidate)
        out.append(candidate)
    return out


class WeightDecay:
    r"""Decay applied after every real step of a torch optimizer, with any optimizer, without Lightning.

    With η\ :sub:`t` the lr the optimizer used in the step (the group's ``lr``), η\ :sub:`0` the
    group's initial lr, and λ the group's ``weight_decay`` times the schedule's multiplier:

    ============== ===============================================================
    ``mode``       update after the optimizer step
    ============== ===============================================================
    decoupled      ``p <- p * (1 - η_t λ)`` (follows the lr schedule)
    lr_ratio       ``p <- p * (1 - λ η_t / η_0)`` (the schedule's shape, not its scale)
    independent    ``p <- p * (1 - λ)``
    relative       ``p <- p - η_t λ m(s) p``, ``m`` the mean absolute value (or RMS) of ``s``
                   over the group, ``s`` the gradients, the parameters or the update
    corrected      ``p <- p * (1 - λ η_t² / η_max)`` (AdamC, Defazio 2025), ``η_max`` the group's
                   peak lr: OneCycleLR's ``max_lr``, else ``initial_lr``, else the first lr
    ============== ===============================================================

    ``toward`` decays toward reference weights ``p0`` instead of zero (L2-SP, Li et al. 2018):
    ``p <- p - step (p - p0)``, the soft threshold of ``p - p0`` for ``ord=1``, and with
    ``cautious`` only where the update moved ``p`` toward ``p0``. ``p0`` is in ``state_dict()``.

    ``ord=1`` replaces the multiplication by the soft threshold with the same step,
    ``p <- sign(p) max(|p| - step, 0)``. ``cautious=True`` decays only the coordinates that
    the optimizer's update moved toward zero (``(p_new - p_old) p_old < 0``).

    Each group's λ is its own ``weight_decay``, read at every step; the optimizer sees 0 during its
    step only (see the module's notes). A multiplicative step above 1 (``1 - step < 0`` would flip
    the signs of the weights: lr·λ > 1, or a schedule that grows λ) is clamped to 1, with one
    warning naming the group, lr and λ, decided on the host; in ``relative`` mode the step is a
    device tensor, clamped on the device, and a group whose measure is not finite (a NaN or inf
    gradient) is left undecayed for that step. Groups added to the optimizer later, or changed
    (renamed, refilled, replaced by ``load_state_dict``, cast with ``.half()``), are picked up at
    the next step.

    Memory: ``cautious=True``, ``source="update"``, ``track_updates`` and ``track_diagnostics`` copy
    the decayed parameters just before the optimizer's update and free the copy right after it;
    ``toward`` keeps one copy of the decayed parameters for the whole run (``reference_nbytes``).

    Args:
        optimizer: A torch optimizer, or Lightning's, Fabric's or accelerate's wrapper of one.
        mode: How the step size follows the learning rate (see the table).
        rules: Decay rules for groups built from raw parameters (needs ``module``); groups from
            ``build_param_groups`` need none.
        module: The model, to name the parameters for ``rules``.
        plan_options: Options for ``from_module`` used with ``rules``.
        ord: 2 for multiplicative decay, 1 for the L1 soft threshold.
        cautious: Decay only coordinates that the update moved toward zero.
        source: For ``mode="relative"``, what ``m`` is measured on.
        metric: For ``mode="relative"``, ``"mean_abs"`` or ``"rms"``.
        schedule: Multiplier of λ as a function of the optimizer step (see
            ``lightning_wd.schedules``), or None for a constant λ.
        total_steps: Length of the run in optimizer steps, for a schedule without its own
            ``total_steps`` (``Cosine``).
        track_updates: Measure each group's update norm at every step (for ``metrics``).
        toward: ``"init"`` (the parameters when the engine is attached) or a state dict of reference
            weights, by the names of the groups' ``param_names`` or of ``module``; None decays toward 0.
        timescale_fraction: Set each decayed group's ``weight_decay`` when attached so that the decay
            timescale ``1 / (η λ)`` is this fraction of ``total_steps`` (η the group's peak lr; 1 in
            ``independent`` and ``lr_ratio`` mode): ``λ = 1 / (fraction · total_steps · η)``.
        track_diagnostics: Measure each group's ``update_ratio`` and ``angular_update`` at the next
            steps (for ``metrics(diagnostics=True)``); set it only before steps you log.
        fused: How ``cautious=True`` groups of a few large tensors (at most 8, or 32k elements each on
            average) are decayed, and how ``mode="relative"`` measures ``mean_abs`` on them, by fused
            loops instead of several eager passes: on CPU, for float32 and float64, by C loops built
            with the C compiler at their first use (a fraction of a second, nothing kept on disk),
            which also take a logged step's decay and norm in one pass and may make the copy of
            ``cautious``/``source="update"`` with streaming stores (where the engine's first copies
            time that fastest); elsewhere (other dtypes and devices, or no C compiler) by kernels
            compiled by ``torch.compile``. ``None`` (the default): the C loops wherever they apply, the
            compiled kernels only for CPU groups of at least 8M elements, where they repay their compile
            (5-12 s on the benchmark machine) within a few thousand steps, falling back quietly; ``True``:
            the compiled kernels for every such group of any floating dtype and device, where the C
            loops do not apply (the first step compiles; where compiling fails, one warning says why
            and the eager path takes over, with the same result); ``False``: neither. Other modes and
            metrics, ``toward``, steps with ``track_diagnostics`` and other tensors are not affected.

    Raises:
        TypeError: on an ``optimizer`` that is not one, a flag that is not a bool, or ``rules``
            that are not DecayRule.
        ValueError: on an unknown ``mode``, ``source``, ``metric`` or ``ord``; on ``rules`` without
            ``module``; on a group the engine cannot decay correctly (its own ``weight_decay`` not a
            number >= 0, or decayed differently by ``rules``; ``lr_ratio`` from lr 0), with the
            optimizer left as it was.

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> torch.nn.init.ones_(model.weight)
        Parameter containing:
        tensor([[1., 1.],
                [1., 1.]], requires_grad=True)
        >>> optimizer = torch.optim.SGD(lwd.build_param_groups(model, lwd.presets.standard(0.5)), lr=0.1)
        >>> decay = lwd.WeightDecay(optimizer)
        >>> model(torch.zeros(1, 2)).sum().backward()   # zero gradient: only the decay moves the weights
        >>> optimizer.step()
        >>> model.weight[0]                              # 1 * (1 - 0.1 * 0.5)
        tensor([0.9500, 0.9500], grad_fn=<SelectBackward0>)
        >>> optimizer.param_groups[0]["weight_decay"]    # λ stays where every tool reads it
        0.5
        >>> decay.metrics()["decay/weight_decay"]
        0.5
        >>> decay.remove()
    """

    def __init__(
        self,
        optimizer: Any,
        mode: Mode = "decoupled",
        *,
        rules: Sequence[DecayRule] | None = None,
        module: nn.Module | None = None,
        plan_options: Mapping[str, Any] | None = None,
        ord: Literal[1, 2] = 2,
        cautious: bool = False,
        source: Source | None = None,
        metric: Metric | None = None,
        schedule: Callable[[int], float] | None = None,
        total_steps: int | None = None,
        track_updates: bool = False,
        toward: Literal["init"] | Mapping[str, Tensor] | None = None,
        timescale_fraction: float | None = None,
        track_diagnostics: bool = False,
        fused: bool | None = None,
        _options: DecayOptions | None = None,
        _strict: bool = True,
        _set_timescale: bool = True,
    ) -> None:
        opt = unwrap_optimizer(optimizer)
        options = _options or DecayOptions(
            mode,
            ord,
            cautious,
            source,
            metric,
            schedule,
            toward=toward,
            timescale_fraction=timescale_fraction,
            fused=fused,
        )
        _flag(track_updates, "track_updates")
        _flag(track_diagnostics, "track_diagnostics")
        if rules is not None:
            rules = list(_check_rules(rules))
            if module is None:
                raise ValueError(
                    "`rules` name parameters, so they need the model: pass `module=model` beside `rules`, or build"
                    " the optimizer's groups with lwd.build_param_groups(model, rules) and give no rules."
                )
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(
                f"`module` must be a torch.nn.Module or None, got {type(module).__name__} {module!r}. Pass the model"
                " whose parameters the optimizer holds."
            )
        if plan_options is not None:
            _check_plan_options(plan_options, "`plan_options`")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(
                f"`total_steps` must be None or an int >= 1 (the run's optimizer steps), got {total_steps!r}."
                " Pass for example total_steps=10_000."
            )
        if options.timescale_fraction is not None and total_steps is None:
            raise ValueError(
                f"`timescale_fraction`={options.timescale_fraction} is a fraction of the run, so it needs the run's"
                " length: pass `total_steps=` (the run's optimizer steps), for example total_steps=10_000."
            )
        self.optimizer = opt
        self.options = options
        self.rules = rules
        self.track_updates = track_updates
        self.track_diagnostics = track_diagnostics
        #: Groups whose λ ``timescale_fraction`` set when the engine was attached: name -> (peak lr, λ).
        self.timescale_lambdas: dict[str, tuple[float, float]] = {}
        self._reference: dict[int, Tensor] | None = None
        self._names: dict[int, str] | None = None
        self._module_ref = weakref.ref(module) if module is not None else None
        self._plan_options = dict(plan_options or {})
        self._schedule = _resolve_schedule(options.schedule, total_steps)
        self._total_steps = total_steps
        self._steps = 0
        #: Steps of a fused optimizer under an AMP scaler: its ``found_inf`` (copied to the host without
        #: waiting for it) and the event after the copy. Counted when ``steps`` is next read.
        self._uncounted: list[tuple[Tensor, Any]] = []
        #: While True, steps keep the optimizer's own decay out (λ is still 0 during the step) but are not
        #: decayed or counted: for steps that are not training steps (the batch-norm update pass of
        #: stochastic weight averaging steps the optimizer on stale gradients, with no backward).
        self.paused = False
        #: While True, steps measure each group's parameter norm in the decay's own pass where they can
        #: (a few large CPU tensors, multiplicative decay), and the next ``metrics()`` uses it if the
        #: parameters have not changed since: set it only before steps you log (the callback does).
        self.norms_in_step = False
        self._rule_plan: dict[int, tuple[str, float]] | None = None
        self._buckets: list[_Bucket] = []
        self._signature: tuple[Any, ...] = ()
        self._snapshot: list[list[list[Tensor]]] | None = None
        #: Per bucket and chunk, the last copies of a few large CPU tensors, which the next snapshot copies
        #: into (``F._copies``): freed, their memory goes back to the C library, often to the kernel, and
        #: new copies would fault every page in again, 5x the copy's own time for tensors of 16 MiB or more.
        self._spare: list[list[list[Tensor]]] | None = None
        self._saved: list[Any] = []
        self._warned: set[str] = set()
        self._original: Any = None
        self._active = False
        #: Whether the optimizer's own step (its pre-hooks, update and post-hooks) is running under ``_step``.
        self._stepping = False
        # Plan and check everything before touching the optimizer: an error leaves it as it was.
        migrate_legacy_groups_(opt)
        buckets = self._plan(strict=_strict)
        if self._schedule is not None:
            _check_schedule(self._schedule, self.steps)
        lambdas = []
        if options.timescale_fraction is not None and _set_timescale:
            lambdas = self._timescale_lambdas(buckets, cast(int, total_steps), strict=_strict)
        if options.toward is not None:
            self._reference = {}
            for b in buckets:  # refs taken (and checked) before anything is changed: an error leaves all as it was
                if b.weight_decay > 0:
                    self._link_reference(b, strict=_strict)
        for group, name, lr, lam in lambdas:
            group["weight_decay"] = lam
            self.timescale_lambdas[name] = (lr, lam)
        self._install(buckets)
        self._attach()

    # ------------------------------------------------------------------ attach / detach
    def _attach(self) -> None:
        opt = self.optimizer
        original = opt.__dict__.get("step")  # an instance attribute already there (an LR scheduler's wrapper)
        self._original = original
        engine = self  # the optimizer keeps its engine alive: `lwd.WeightDecay(optimizer)` needs no variable
        inner = original if original is not None else types.MethodType(type(opt).step, opt)

        def step(opt: Optimizer, *args: Any, **kwargs: Any) -> Any:
            if opt is not engine.optimizer:  # a deep copy of the optimizer carries this method: step the copy itself
                return type(opt).step(opt, *args, **kwargs)
            if not engine._active:
                return inner(*args, **kwargs)
            return engine._step(inner, args, kwargs)

        if wrapped_by_lr_scheduler(original):  # torch's LR schedulers check that their wrapper is there
            mark_wrapped_by_lr_scheduler(step)
        step.__wrapped__ = inner  # type: ignore[attr-defined]

        def take_lambdas_written_by_pre_hooks(opt: Optimizer, args: Any, kwargs: Any) -> None:
            # the last step pre-hook (moved there at each step): a λ that another pre-hook wrote is this
            # step's λ, taken as one written in the closure is; the update then reads the engine's 0
            if opt is engine.optimizer and engine._stepping:
                engine._take_written_lambdas()

        self._pre_hook = opt.register_step_pre_hook(take_lambdas_written_by_pre_hooks)
        opt.step = types.MethodType(step, opt)  # type: ignore[method-assign]
        self._wrapper = opt.step
        self._active = True

    def remove(self) -> None:
        """Detach from the optimizer: its ``step`` is as it was, and every group keeps its ``weight_decay``.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
            >>> decay = lwd.WeightDecay(opt)
            >>> decay.remove()
            >>> "step" in opt.__dict__
            False
        """
        if not self._active:
            return
        self._active = False
        self._pre_hook.remove()
        opt = self.optimizer
        if opt.__dict__.get("step") is self._wrapper:  # nobody wrapped it since: restore what was there
            if self._original is None:
                del opt.step
            else:
                opt.step = self._original  # type: ignore[method-assign]
        # else a later wrapper calls ours, which now passes straight through
        self._snapshot = self._spare = None

    @property
    def attached(self) -> bool:
        """Whether the engine decays the optimizer's steps (False after ``remove``)."""
        return self._active

    # ------------------------------------------------------------------ planning
    def _module(self) -> nn.Module | None:
        return self._module_ref() if self._module_ref is not None else None

    def _rules_by_param(self) -> dict[int, tuple[str, float]]:
        """id(param) -> (rule group, λ) from the rules over the module (frozen parameters included)."""
        if self._rule_plan is None:
            module = self._module()
            if module is None:
                raise SetupError("`module` was garbage-collected; keep a reference to the model the engine decays.")
            options = {**self._plan_options, "include_frozen": True}
            plan = DecayPlan.from_module(module, self.rules, **options)
            self._rule_plan = {id(p): (g.name, g.weight_decay) for g in plan.groups for p in g.params}
        return self._rule_plan

    def _plan(self, *, strict: bool) -> list[_Bucket]:
        """Buckets for every group; ``strict`` (attach time) raises where a later change only warns."""
        buckets: list[_Bucket] = []
        groups = self.optimizer.param_groups
        several = len(groups) > 1
        for index, group in enumerate(groups):
            label = str(group.get("name", f"pg{index + 1}"))
            params = list(group["params"])
            own = group.get("weight_decay", 0.0)
            if _lambda(own) is None:
                self._problem(
                    strict,
                    f"group:{label}",
                    f"Optimizer group {label!r} has `weight_decay`={own!r}, which is not a finite number >= 0; it is"
                    " the group's λ. Set it to a float such as 0.05 (or 0.0 for no decay).",
                )
                continue
            if not params:
                continue
            if PLANNED_KEY in group or self.rules is None:
                buckets.append(_make_bucket(label, group, index, None, params))
                continue
            plan = self._rules_by_param()
            by_rule: dict[tuple[str, float], list[Tensor]] = {}
            for p in params:
                by_rule.setdefault(plan.get(id(p), ("unplanned", 0.0)), []).append(p)
            if own:
                if all(wd == own for _, wd in by_rule):
                    buckets.append(_make_bucket(label, group, index, None, params))  # the rules agree: its own λ
                    continue
                self._problem(
                    strict,
                    f"own:{label}",
                    f"Optimizer group {label!r} has its own `weight_decay`={own}, but `rules` decay its tensors"
                    f" differently ({', '.join(f'{n}: {wd}' for n, wd in by_rule)}), so they would be decayed twice"
                    " or wrongly. Fix it in one of two ways: build the optimizer from"
                    " `lwd.build_param_groups(model, rules)` (each group then carries its own weight_decay and"
                    " needs no `rules` here), or give that group weight_decay=0.0 (for example"
                    " `torch.optim.AdamW(model.parameters(), lr=..., weight_decay=0.0)`: AdamW's default is 0.01)"
                    " and let the rules decide.",
                    later=f" Its own weight_decay={own} is applied to all its tensors.",
                )
                buckets.append(_make_bucket(label, group, index, None, params))
                continue
            for (rule_group, wd), ps in by_rule.items():
                named = several or "name" in group
                name = f"{label}/{rule_group}" if named and label != rule_group else rule_group
                buckets.append(_make_bucket(name, group, index, wd, ps))
        names = [b.name for b in buckets]
        dupes = _duplicates(names)
        if dupes:
            self._problem(
                strict,
                f"names:{dupes}",
                f"Several optimizer parameter groups are named {dupes}; weight decay is logged per group and needs"
                " unique names. Give each group a unique `name`.",
                later=" They are logged with -1, -2, ... suffixes.",
            )
            for b, name in zip(buckets, _dedupe(names), strict=True):
                b.name = name
        if self.options.mode in ("lr_ratio", "corrected"):
            divisor = self._initial_lr if self.options.mode == "lr_ratio" else self._peak_lr
            for b in buckets:
                if divisor(b.group) == 0 and (b.rule_wd if b.rule_wd is not None else b.group["weight_decay"]):
                    self._problem(
                        strict,
                        f"lr0:{b.name}",
                        f"`mode`={self.options.mode!r} divides by the group's initial (peak) lr, but group"
                        f" {b.name!r} starts at lr=0. Start the group at its peak lr and warm up with a scheduler"
                        " (which records `initial_lr`), or use mode='decoupled'.",
                        later=" Its decay is skipped.",
                    )
        self._shard_views(buckets, strict=strict)
        return buckets

    def _shard_views(self, buckets: list[_Bucket], *, strict: bool) -> None:
        """Give buckets holding FSDP1 views (``use_orig_params=True``) the shard group of each view.

        The decay of a view is exact on each rank; its norms and means are added up over the shard
        group, which only the FSDP1 units know: they are found in ``module``.
        """
        if not _fsdp._in_use():
            return
        infos: dict[int, _fsdp.ShardInfo] | None = None
        for b in buckets:
            if not any(map(_fsdp.is_flat_view, b.params)):
                continue
            if infos is None:
                module = self._module()
                infos = _fsdp.shard_infos(module) if module is not None else {}
            try:
                layouts = [_fsdp.layouts(chunk, infos) or [None] * len(chunk) for chunk in b.chunks]
            except KeyError:
                self._problem(
                    strict,
                    f"fsdp:{b.name}",
                    f"Optimizer group {b.name!r} holds parameters that FSDP (FullyShardedDataParallel,"
                    " use_orig_params=True) flattened into shards, but the engine was not given the FSDP-wrapped"
                    " model, whose units say over which processes each shard is spread: its norms and `relative`"
                    " measure would be this rank's alone. Pass it: `lwd.WeightDecay(optimizer, module=fsdp_model)`.",
                    later=" Its norms and measures are this rank's shard's only.",
                )
                continue
            if any(F._is_dtensor(p) for p in b.params):
                self._problem(
                    strict,
                    f"fsdp-dtensor:{b.name}",
                    f"Optimizer group {b.name!r} mixes FSDP (FullyShardedDataParallel) shards with DTensors, whose"
                    " norms cannot be added up together. Put them in separate parameter groups.",
                    later=" Its norms and measures are this rank's shard's only.",
                )
                continue
            b.layouts = layouts
            b.views = [layout for chunk in layouts for layout in chunk]
            b.sharded = True  # every rank measures, in the same order
            b.flats = [None] * len(b.chunks)  # (FSDP1 re-creates its views: never one flat view over them)
            b.addresses = [[] for _ in b.chunks]

    def _problem(self, strict: bool, key: str, message: str, later: str = " It is skipped.") -> None:
        if strict:
            raise SetupError(message)
        if key not in self._warned:
            self._warned.add(key)
            _warn(message + later)

    @staticmethod
    def _initial_lr(group: dict[str, Any]) -> float:
        return float(group.get("initial_lr", group.get(INITIAL_LR_KEY, group["lr"])))

    @staticmethod
    def _peak_lr(group: dict[str, Any]) -> float:
        """η_max of ``corrected``: OneCycleLR's ``max_lr``, else the scheduler's ``initial_lr``, else the first lr."""
        return float(group.get("max_lr", WeightDecay._initial_lr(group)))

    def _timescale_lambdas(
        self, buckets: list[_Bucket], total_steps: int, *, strict: bool
    ) -> list[tuple[dict[str, Any], str, float, float]]:
        """``(group, name, lr, λ)`` for each decayed group: λ whose timescale is ``timescale_fraction`` of the run."""
        fraction = cast(float, self.options.timescale_fraction)
        lr_scaled = self.options.mode in ("decoupled", "corrected")  # else the step at the peak is λ itself
        out = []
        for b in buckets:
            if b.weight_decay <= 0:
                continue
            if b.rule_wd is not None:
                self._problem(
                    strict,
                    f"timescale:{b.name}",
                    f"`timescale_fraction` sets each decayed group's own `weight_decay`, but the tensors of group"
                    f" {b.name!r} are decayed by `rules` (the group's own λ is 0). Build the optimizer from"
                    " `lwd.build_param_groups(model, rules)` so that each group carries its λ.",
                    later=" Its λ from the rules is kept.",
                )
                continue
            lr = self._peak_lr(b.group) if lr_scaled else 1.0
            if not lr > 0:
                self._problem(
                    strict,
                    f"timescale-lr:{b.name}",
                    f"`timescale_fraction` divides by the group's peak lr, but group {b.name!r} has lr={lr}. Start the"
                    " group at its peak lr and warm up with a scheduler (which records `initial_lr`).",
                    later=" Its λ is kept.",
                )
                continue
            out.append((b.group, b.name, lr, weight_decay_from_timescale(fraction, lr=lr, total_steps=total_steps)))
        return out

    # ------------------------------------------------------------------ toward a reference
    def _param_names(self) -> dict[int, str]:
        """id(param) -> its name: the group's ``param_names`` (build_param_groups), else the module's."""
        if self._names is None:
            names: dict[int, str] = {}
            module = self._module()
            if module is not None:
                names.update((id(p), n) for n, p in module.named_parameters(remove_duplicate=False))
            for group in self.optimizer.param_groups:
                listed = group.get("param_names")
                if isinstance(listed, (list, tuple)) and len(listed) == len(group["params"]):
                    names.update((id(p), str(n)) for p, n in zip(group["params"], listed, strict=True))
            self._names = names
        return self._names

    def _link_reference(self, bucket: _Bucket, *, strict: bool) -> bool:
        """Give ``bucket`` its references ``p0`` (known ones, else taken now); False when it cannot have any."""
        assert self._reference is not None
        if bucket.sharded:
            self._problem(
                strict,
                f"toward-sharded:{bucket.name}",
                f"`toward` keeps a full reference copy per parameter, but group {bucket.name!r} holds sharded"
                " parameters (DTensors, FSDP shards), whose references would have to be saved per rank. Use"
                " `toward` with unsharded parameters (DDP), or decay that group toward zero.",
                later=" It is decayed toward zero.",
            )
            return False
        missing = [p for p in bucket.params if id(p) not in self._reference]
        new = dict(zip(map(id, missing), self._take_references(bucket, missing, strict=strict), strict=True))
        self._reference.update(new)
        bucket.reference = [[self._reference[id(p)] for p in chunk] for chunk in bucket.chunks]
        return True

    @torch.no_grad()
    def _take_references(self, bucket: _Bucket, params: list[Tensor], *, strict: bool) -> list[Tensor]:
        """Copies of ``params`` now (``toward="init"``), or their entries of the ``toward`` state dict."""
        toward = self.options.toward
        if not isinstance(toward, Mapping):
            return [p.detach().clone() for p in params]
        names = self._param_names()
        by_key = {_reference_key(k): v for k, v in toward.items()}
        out, problems = [], []
        for p in params:
            name = names.get(id(p))
            ref = by_key.get(_reference_key(name)) if name is not None else None
            if not isinstance(ref, Tensor) or ref.shape != p.shape:
                got = "no entry" if ref is None else f"{type(ref).__name__} {tuple(getattr(ref, 'shape', ()))}"
                problems.append(f"{name or '<unnamed>'} {tuple(p.shape)}: {got}")
                out.append(p.detach().clone())
            else:
                out.append(ref.detach().to(device=p.device, dtype=p.dtype).clone())
        if problems:
            self._problem(
                strict,
                f"toward:{bucket.name}",
                f"`toward` has no reference of the right shape for {len(problems)} decayed parameter(s) of group"
                f" {bucket.name!r}: {'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. Pass a state dict"
                " with the model's parameter names (for example `pretrained.state_dict()` of the same architecture),"
                " and give the engine `module=model` when the groups do not come from lwd.build_param_groups.",
                later=" Those parameters are decayed toward their values when first decayed.",
            )
        return out

    def _inherit_reference(self, other: WeightDecay) -> None:
        """Take ``other``'s ``p0`` for the parameters both decay (an optimizer re-created mid-run keeps them)."""
        if self._reference is None or not other._reference:
            return
        for key in self._reference.keys() & other._reference.keys():
            self._reference[key] = other._reference[key]
        for b in self._buckets:
            if b.reference is not None:
                b.reference = [[self._reference[id(p)] for p in chunk] for chunk in b.chunks]

    @property
    def reference_nbytes(self) -> int:
        """Bytes held by the ``toward`` references ``p0`` (0 without ``toward``): one copy per decayed parameter.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Linear(100, 10)   # weight decayed by the standard preset, bias not
            >>> opt = torch.optim.SGD(lwd.build_param_groups(model, lwd.presets.standard(0.1)), lr=0.1)
            >>> lwd.WeightDecay(opt, toward="init").reference_nbytes   # 1000 float32
            4000
        """
        if not self._reference:
            return 0
        return sum(t.numel() * t.element_size() for t in self._reference.values())

    def _install(self, buckets: list[_Bucket]) -> None:
        for b in buckets:
            if "initial_lr" not in b.group:
                b.group.setdefault(INITIAL_LR_KEY, b.group["lr"])
            if self._reference is not None and b.reference is None and b.weight_decay > 0:
                self._link_reference(b, strict=False)
        self._buckets = buckets
        self._spare = None  # copies of the old buckets' tensors
        self._sharded = any(b.sharded for b in buckets)
        self._signature = _signature(self.optimizer)

    def _refresh(self) -> None:
        """Rebuild the buckets when the optimizer's groups changed (added, renamed, replaced, recast)."""
        if _signature(self.optimizer) == self._signature and not any(b.stale() for b in self._buckets):
            return
        migrate_legacy_groups_(self.optimizer)
        self._rule_plan = None
        self._names = None
        self._install(self._plan(strict=False))

    @property
    def sharded(self) -> bool:
        """Whether some decayed parameters are DTensors or FSDP1 shards: then every rank must call ``metrics``."""
        self._refresh()
        return self._sharded

    # ------------------------------------------------------------------ the step path
    @property
    def steps(self) -> int:
        """The real optimizer steps decayed so far: the step count of the λ schedule, saved with the state."""
        if self._uncounted:
            self._count_uncounted()
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._uncounted.clear()
        self._steps = value

    def _count(self, found_inf: Tensor | None) -> None:
        """Count a step, unless an AMP scaler's ``found_inf`` says the (fused) optimizer skipped it.

        On CPU the flag is read at once; on CUDA it is copied to pinned host memory without waiting,
        and read when ``steps`` is next needed: by a λ schedule at the next step (by then the copy is
        done, or the wait is for the previous step only), or by ``state_dict``.
        """
        if found_inf is None:
            self._steps += 1
        elif found_inf.device.type == "cuda":
            host = torch.empty((), dtype=found_inf.dtype, pin_memory=True)
            host.copy_(found_inf.reshape(()), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._uncounted.append((host, event))
        else:
            self._steps += int(not bool(found_inf))

    def _count_uncounted(self) -> None:
        for host, event in self._uncounted:
            event.synchronize()
            self._steps += int(not bool(host))
        self._uncounted.clear()

    def _multiplier(self) -> float:
        return 1.0 if self._schedule is None else float(self._schedule(self.steps))

    def _step(self, inner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._refresh()
        groups = self.optimizer.param_groups
        saved = self._saved = [g.get("weight_decay") for g in groups]
        snapshot = not self.paused and self.options.needs_snapshot(self.track_updates or self.track_diagnostics)
        args, kwargs = self._around_closure(args, kwargs, snapshot)
        for g in groups:
            if "weight_decay" in g:
                g["weight_decay"] = _TAKEN
        keep_step_pre_hook_last(self.optimizer, self._pre_hook.id)
        self._stepping = True
        try:
            out = inner(*args, **kwargs)
        finally:
            self._stepping = False
            for g, lam in zip(groups, saved, strict=True):
                # the engine's own zero (by identity: a 0.0 the user wrote after the closure is theirs) is put back
                if lam is not None and g.get("weight_decay") is _TAKEN:
                    g["weight_decay"] = lam
        if not self.paused:
            self._decay(saved)
        return out

    def _take_written_lambdas(self) -> None:
        """A λ written into a group during the optimizer's closure (a schedule in Lightning's
        ``on_before_optimizer_step``, a ``training_step``) is this step's λ: the engine takes it, and
        the optimizer, which reads the group after the closure, still sees 0 and does not decay twice."""
        for i, g in enumerate(self.optimizer.param_groups):
            if i < len(self._saved) and "weight_decay" in g and g["weight_decay"] is not _TAKEN:
                self._saved[i] = g["weight_decay"]
                g["weight_decay"] = _TAKEN

    def _around_closure(self, args: tuple[Any, ...], kwargs: dict[str, Any], snapshot: bool) -> tuple[Any, ...]:
        """Wrap the optimizer's closure, if it has one: after each call, take the λ written during it; after
        the first, copy the parameters from before the update (``snapshot``). Without a closure, copy now."""
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            if snapshot:
                self._take_snapshot()
            return args, kwargs
        taken = not snapshot

        def closure_then_snapshot() -> Any:
            nonlocal taken
            loss = closure()
            self._take_written_lambdas()
            if not taken:  # LBFGS calls it again after updating: the first call is the one before the step
                taken = True
                self._take_snapshot()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_snapshot}
        return (closure_then_snapshot, *args[1:]), kwargs

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        track = self.track_updates or self.track_diagnostics
        if self._spare is None:
            self._spare = [[[] for _ in b.chunks] for b in self._buckets]
        snapshot: list[list[list[Tensor]]] = []
        for b, spares in zip(self._buckets, self._spare, strict=True):
            if track or self._bucket_wd(b, self._saved[b.index]) > 0:
                snapshot.append(
                    [
                        F._copies(chunk, b.numels[c] if b.numels else None, spares[c], self.options.fused is not False)
                        for c, chunk in enumerate(_locals_of(b))
                    ]
                )
            else:  # nothing to copy this step (λ is 0): nor anything to keep
                snapshot.append([])
                for spare in spares:
                    spare.clear()
        self._snapshot = snapshot

    def _bucket_wd(self, bucket: _Bucket, own: Any) -> float:
        lam = bucket.rule_wd if bucket.rule_wd is not None else _lambda(own)
        if lam is None:  # something wrote a value that is not a λ into the group during training
            self._problem(
                False,
                f"lambda:{bucket.name}",
                f"Optimizer group {bucket.name!r} has `weight_decay`={own!r}, which is not a finite number >= 0."
                " Set it to a float such as 0.05 (or 0.0 for no decay).",
                later=" Its decay is skipped until it is one again.",
            )
            return 0.0
        return lam

    @torch.no_grad()
    def _decay(self, saved: list[Any]) -> None:
        multiplier = self._multiplier()
        found_inf = getattr(self.optimizer, "found_inf", None)
        snapshot, self._snapshot = self._snapshot, None
        for index, bucket in enumerate(self._buckets):
            wd = self._bucket_wd(bucket, saved[bucket.index]) * multiplier
            befores = snapshot[index] if snapshot is not None and snapshot[index] else None
            toward = (
                self._reference is not None
                and wd > 0
                and (bucket.reference is not None or self._link_reference(bucket, strict=False))
            )
            parts = self._parts(bucket, befores, wd > 0 and not toward)  # (toward: per tensor, beside its p0)
            step: Tensor | float | None = None
            bucket.update_norm = bucket.update_ratio = bucket.angular_update = None
            bucket.norm_in_step = None
            fuse = (
                self.norms_in_step
                and self.options.ord == 2
                and not self.options.cautious
                and not toward
                and bucket.views is None
                and not bucket.sharded
                and sum(len(part.params) for part in parts) == len(bucket.params)  # every tensor has a gradient
            )
            square_sums: list[Tensor] = []
            if bucket.views is not None and self.track_updates and befores is not None:  # FSDP1: every rank reduces
                deltas = [d for part in parts for d in torch._foreach_sub(part.tensors, part.before)]
                bucket.update_norm = _views_norm(bucket, deltas, [lo for part in parts for lo in part.layouts])
            elif parts and self.track_updates and parts[0].before:
                deltas = _joined([list(torch._foreach_sub(part.tensors, part.before)) for part in parts])
                layouts = [layout for part in parts for layout in part.layouts] if bucket.sharded else None
                bucket.update_norm = F._global_norm(deltas, layouts)
            if (parts or bucket.views is not None) and wd > 0:
                if befores is None and self.options.needs_snapshot(False):
                    self._problem(
                        False,
                        "snapshot",
                        f"Weight decay of group {bucket.name!r} was skipped for a step: cautious=True and"
                        " source='update' need the parameters from just before the step, which were not taken."
                        " Step the optimizer through its own `step()`.",
                    )
                else:
                    step = self._step_size(bucket, wd, parts)
                    if found_inf is not None:  # a select, not a product: relative m is inf/NaN on overflow
                        step = torch.where(found_inf.to(dtype=torch.float32) > 0, 0.0, step)
                    if not bucket.checked_precision and isinstance(step, float):
                        _warn_if_rounds_away(bucket, [part.tensors[0].dtype for part in parts], step)
                    for part in parts:
                        # one device and dtype per part, checked when the buckets were built: the unchecked kernels
                        ref = self._references_of(bucket, part.params) if toward else None
                        if ref is None and self.options.cautious and not self.track_diagnostics:
                            # the copy's last use: the mask is formed in it, in the passes of the decay
                            F._cautious_decay_(
                                part.tensors, part.before, step, self.options.ord, self.options.fused, part.numel
                            )
                            part.before.clear()
                            continue
                        mask = self._mask(part, ref) if self.options.cautious else None
                        if not self.track_diagnostics:
                            part.before.clear()  # last use of this chunk's copy: free it before the decay allocates
                        if ref is None:
                            dtypes = {part.tensors[0].dtype}
                            if fuse:
                                square_sum = F._decay_and_square_sum_(
                                    part.tensors, step, dtypes, part.numel, self.options.fused is not False
                                )
                                if square_sum is not None:
                                    square_sums.append(square_sum)
                                    continue
                                fuse = False
                            F._apply_decay_(part.tensors, step, self.options.ord, mask, dtypes, part.numel)
                        else:
                            F._apply_decay_toward_(part.tensors, ref, step, self.options.ord, mask)
                bucket.checked_precision = True
                if fuse and square_sums and len(square_sums) == len(parts):
                    norm = torch.stack([t.to(square_sums[0].device) for t in square_sums]).sum().sqrt()
                    bucket.norm_in_step = (norm, _versions(bucket))
            if bucket.views is not None and self.track_diagnostics and befores is not None:  # FSDP1: every rank
                bucket.update_ratio, bucket.angular_update = _views_angle(bucket, parts)
            elif parts and self.track_diagnostics and parts[0].before:
                layouts = [layout for part in parts for layout in part.layouts] if bucket.sharded else None
                befores_ = [t for part in parts for t in part.before]
                bucket.update_ratio, bucket.angular_update = F._angle(
                    befores_, [t for part in parts for t in part.tensors], layouts
                )
                for part in parts:
                    part.before.clear()
            bucket.last_wd, bucket.last_step = wd, step
        self._count(found_inf)

    @staticmethod
    def _mask(part: _Part, ref: list[Tensor] | None) -> list[Tensor]:
        """Cautious: the coordinates the update moved toward zero, or toward ``p0`` when decaying toward it."""
        if ref is None:
            return F._cautious_mask(part.tensors, part.before)
        return F._cautious_mask_toward(part.tensors, part.before, ref)

    def _references_of(self, bucket: _Bucket, params: list[Tensor]) -> list[Tensor]:
        """The ``p0`` of ``params`` (a chunk of ``bucket``, or the part of one that has gradients)."""
        assert bucket.reference is not None and self._reference is not None
        for chunk, refs in zip(bucket.chunks, bucket.reference, strict=True):
            if params is chunk:
                return refs
        return [self._reference[id(p)] for p in params]

    def _parts(self, bucket: _Bucket, befores: list[list[Tensor]] | None, decays: bool) -> list[_Part]:
        """Per device/dtype chunk: the parameters with a gradient, and what the decay updates."""
        parts = []
        for c, chunk in enumerate(bucket.chunks):
            if befores is None:
                params, layouts = _with_grad(chunk, bucket.layouts[c])
                before: list[Tensor] = []
            else:
                params, layouts, before = _with_grad(chunk, bucket.layouts[c], befores[c])
            if not params:
                continue
            flat = bucket.flat(c) if params is chunk and not before and decays else None
            numel = bucket.numels[c] if params is chunk and bucket.numels else None
            if flat is not None:  # every tensor of a contiguous chunk: one kernel over its buffer
                parts.append(_Part(params, [flat], [None], before, numel))
            else:
                parts.append(_Part(params, _local(params) if bucket.sharded else params, layouts, before, numel))
        return parts

    def _step_size(self, bucket: _Bucket, wd: float, parts: list[_Part]) -> Tensor | float:
        lr = bucket.group["lr"]
        mode = self.options.mode
        if mode == "relative":
            step = self._relative_measure(bucket, parts) * (lr * wd)
            # a non-finite measure (a NaN/inf gradient) must not spread to the whole group: no decay this step
            return torch.where(torch.isfinite(step), step.clamp(max=1.0), 0.0)
        if mode == "decoupled":
            size = lr * wd
        elif mode == "independent":
            size = wd
        elif mode == "corrected":  # AdamC: λ_t = λ η_t / η_max, applied with the lr: λ η_t² / η_max
            peak = self._peak_lr(bucket.group)
            if not peak:
                return 0.0
            size = wd * lr * lr / peak
        else:
            initial = self._initial_lr(bucket.group)
            if not initial:
                return 0.0
            size = wd * lr / initial
        if not math.isfinite(size) or size < 0:  # an lr or a schedule gone wrong: never write NaN into the weights
            self._problem(
                False,
                f"nonfinite:{bucket.name}",
                f"Weight decay of group {bucket.name!r} has step {size!r} (lr={lr}, weight_decay={wd}, mode={mode!r}),"
                " which is not a finite number >= 0. Check the lr schedule and the decay schedule.",
                later=" Its decay is skipped at such steps.",
            )
            return 0.0
        if self.options.ord == 2 and size > 1.0:
            if not bucket.warned_clamp:
                bucket.warned_clamp = True
                _warn(
                    f"Weight decay of group {bucket.name!r} has step {size:.4g} > 1 (lr={lr}, weight_decay={wd},"
                    f" mode={mode!r}): the factor 1 - step would be negative and flip the signs of the weights."
                    " It is clamped to 1 (the weights are zeroed). Lower the lr or λ, or check the schedule."
                )
            return 1.0
        return float(size)

    def _relative_measure(self, bucket: _Bucket, parts: list[_Part]) -> Tensor:
        """``m`` over the whole bucket (all ranks' shards), on the tensors that have a gradient."""
        opts = self.options
        if bucket.views is not None:  # FSDP1: the counts are added up with the sums, over the shard groups
            return self._views_measure(bucket, parts)
        measure_of = partial(F._mean_abs, fused=opts.fused) if opts.metric == "mean_abs" else F._rms
        if opts.source == "grad":  # gradients have their own placements: split them as the functional does
            grads = list(map(_grad_of, _joined([part.params for part in parts])))
            return measure_of(*F._split(grads), F._numel(grads))
        if sum(len(part.params) for part in parts) == len(bucket.params):
            numel = bucket.numel  # every parameter has a gradient
        else:
            numel = sum(p.numel() for part in parts for p in part.params)  # of the whole tensors
        layouts = [layout for part in parts for layout in part.layouts] if bucket.sharded else None
        if opts.source == "params":
            tensors = _joined([part.tensors for part in parts])
        elif opts.cautious or self.track_diagnostics:  # the mask or the diagnostics still need the copies
            tensors = _joined([list(torch._foreach_sub(part.tensors, part.before)) for part in parts])
        else:  # no second copy: before - after in place (m() does not depend on the sign)
            for part in parts:
                torch._foreach_sub_(part.before, part.tensors)
            tensors = _joined([part.before for part in parts])
        return measure_of(tensors, layouts, numel)

    def _views_measure(self, bucket: _Bucket, parts: list[_Part]) -> Tensor:
        """``m`` of a bucket of FSDP1 views: from each rank's local views, with one ``all_reduce`` per shard group."""
        opts = self.options
        assert bucket.views is not None
        layouts = [layout for part in parts for layout in part.layouts]
        if opts.source == "grad":  # a view's gradient is sharded as the view
            tensors = [cast(Tensor, p.grad) for part in parts for p in part.params]
        elif opts.source == "params":
            tensors = [t for part in parts for t in part.tensors]
        else:
            tensors = [d for part in parts for d in torch._foreach_sub(part.tensors, part.before)]
        power = 1 if opts.metric == "mean_abs" else 2
        total, count = _fsdp.reduced_sums(tensors, layouts, bucket.views, power, bucket.params[0].device)
        mean = total / count.clamp(min=1.0)
        return mean if power == 1 else mean.sqrt()

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def metrics(
        self, *, grad_norm: bool = False, param_norm: bool = True, diagnostics: bool = False
    ) -> dict[str, float]:
        """Per group, measured now: ``<group>/param_norm``, ``weight_decay``, ``timescale`` (or ``threshold``).

        ``weight_decay`` is the λ in force (the group's ``weight_decay`` times the schedule), ``timescale``
        ``1 / step`` of the last multiplicative decay (``threshold``, the last soft-threshold step, for
        ``ord=1``), ``update_norm`` the last step's update norm when ``track_updates`` is on, and
        ``grad_norm`` the norm of the current gradients when asked for. With ``timescale_fraction``,
        ``timescale_target`` is the timescale it aimed at (that fraction of the run, in steps). With
        ``diagnostics``: ``effective_decay``, the last step's decay step size (η_t·λ in ``decoupled``
        mode; 0 when nothing was decayed), and, for a step taken with ``track_diagnostics`` on,
        ``update_ratio`` (``‖Δp‖ / ‖p‖`` over the group, Δp the whole step's change, optimizer and decay)
        and ``angular_update`` (the angle in radians between the group's parameters before and after the
        step). One host synchronisation in all. With sharded parameters (DTensors, FSDP1 shards) every
        rank must call it, in the same order.

        Args:
            grad_norm: Also measure each group's gradient norm.
            param_norm: Measure each group's parameter norm.
            diagnostics: Also report ``effective_decay``, ``update_ratio`` and ``angular_update``.

        Returns:
            ``{"<group>/<metric>": value}``.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Linear(2, 2, bias=False)
            >>> optimizer = torch.optim.SGD(lwd.build_param_groups(model, lwd.presets.standard(0.5)), lr=0.1)
            >>> decay = lwd.WeightDecay(optimizer)
            >>> model(torch.ones(1, 2)).sum().backward()
            >>> optimizer.step()
            >>> metrics = decay.metrics(grad_norm=True)
            >>> sorted(metrics)
            ['decay/grad_norm', 'decay/param_norm', 'decay/timescale', 'decay/weight_decay']
            >>> metrics["decay/timescale"]  # 1 / (lr * λ) steps
            20.0
            >>> decay.remove()
        """
        _flag(grad_norm, "grad_norm")
        _flag(param_norm, "param_norm")
        _flag(diagnostics, "diagnostics")
        self._refresh()
        out: dict[str, Tensor | float] = {}
        multiplier = self._multiplier()
        for b in self._buckets:
            name = b.name
            if param_norm:
                measured = b.norm_in_step
                if measured is not None and b.views is None and measured[1] == _versions(b):
                    out[f"{name}/param_norm"] = measured[0]  # taken in the decay's pass, and nothing changed since
                else:
                    out[f"{name}/param_norm"] = (
                        F.global_norm(b.whole()) if b.views is None else _views_norm(b, *_with_layouts(b, grads=False))
                    )
            if grad_norm:
                grads = [p.grad for p in b.params if p.grad is not None]
                if b.views is not None:  # FSDP1: every rank takes part, also with no gradient of its own
                    out[f"{name}/grad_norm"] = _views_norm(b, *_with_layouts(b, grads=True))
                elif grads:
                    out[f"{name}/grad_norm"] = F.global_norm(grads)
            if b.update_norm is not None:
                out[f"{name}/update_norm"] = b.update_norm
            out[f"{name}/weight_decay"] = (
                b.last_wd if b.last_wd is not None else self._bucket_wd(b, b.group.get("weight_decay")) * multiplier
            )
            step = b.last_step
            if step is not None:
                if self.options.ord == 1:
                    out[f"{name}/threshold"] = step
                else:
                    out[f"{name}/timescale"] = 1.0 / step if isinstance(step, Tensor) or step > 0 else math.inf
            if self.options.timescale_fraction is not None and self._total_steps and b.weight_decay > 0:
                out[f"{name}/timescale_target"] = float(self.options.timescale_fraction * self._total_steps)
            if diagnostics:
                out[f"{name}/effective_decay"] = step if step is not None else 0.0
                if b.update_ratio is not None and b.angular_update is not None:
                    out[f"{name}/update_ratio"] = b.update_ratio
                    out[f"{name}/angular_update"] = b.angular_update
        return _to_floats(out)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs beside the optimizer's own state: the step count and the schedule's length.

        λ is not in it: it lives in the optimizer's groups, saved with the optimizer. With ``toward``,
        ``reference`` holds each decayed parameter's ``p0``, keyed by its position among the
        optimizer's parameters (the numbering of the optimizer's own state dict).

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> model = torch.nn.Linear(2, 2)
            >>> optimizer = torch.optim.SGD(lwd.build_param_groups(model), lr=0.1)
            >>> decay = lwd.WeightDecay(optimizer)
            >>> model(torch.ones(1, 2)).sum().backward()
            >>> optimizer.step()
            >>> decay.state_dict()
            {'version': 2, 'steps': 1, 'total_steps': None}
            >>> decay.remove()
        """
        state: dict[str, Any] = {"version": _STATE_VERSION, "steps": self.steps, "total_steps": self._total_steps}
        if self._reference is not None:
            order = (p for g in self.optimizer.param_groups for p in g["params"])
            state["reference"] = {i: self._reference[id(p)] for i, p in enumerate(order) if id(p) in self._reference}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict``.

        Raises:
            TypeError: if ``state_dict`` is not a mapping, or its values have the wrong types.
            ValueError: if it was not written by ``state_dict`` (unknown version or keys), or its
                ``reference`` does not fit the optimizer's parameters.

        Examples:
            >>> import torch, lightning_wd as lwd
            >>> optimizer = torch.optim.SGD(lwd.build_param_groups(torch.nn.Linear(2, 2)), lr=0.1)
            >>> decay = lwd.WeightDecay(optimizer)
            >>> decay.load_state_dict({"version": 2, "steps": 100, "total_steps": 1000})  # saved with a checkpoint
            >>> decay.steps
            100
            >>> decay.remove()
        """
        steps, total = check_engine_state(state_dict, "state_dict")
        saved = state_dict.get("reference")
        if saved is not None and self._reference is not None:
            self._load_reference(saved)
        elif self._reference is not None and steps > 0:
            _warn(
                f"The engine state resumes at step {steps} with `toward`, but holds no reference weights (it was saved"
                " without `toward`): the decay pulls toward the parameters as they are now, not as they were when the"
                " run started. Resume from a state saved with `toward` for the same run."
            )
        self.steps = steps
        if total is not None:
            self._total_steps = total
            self._schedule = _resolve_schedule(self.options.schedule, total)

    @torch.no_grad()
    def _load_reference(self, saved: Mapping[int, Tensor]) -> None:
        """Put the saved ``p0`` in place, after checking all of them against the optimizer's parameters."""
        assert self._reference is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, ref in saved.items():
            if i >= len(params) or params[i].shape != ref.shape:
                got = f"parameter {i} has shape {tuple(params[i].shape)}" if i < len(params) else "there is none"
                raise ValueError(
                    f"`state_dict['reference'][{i}]` has shape {tuple(ref.shape)}, but {got} ({len(params)} parameters"
                    " in the optimizer). Resume with the optimizer the state was saved with (the same groups, in the"
                    " same order)."
                )
        for i, ref in saved.items():
            p = params[i]
            own = self._reference.get(id(p))
            if own is not None:
                own.copy_(ref)
            else:
                self._reference[id(p)] = ref.detach().to(device=p.device, dtype=p.dtype).clone()
        for b in self._buckets:
            if b.reference is not None:
                b.reference = [[self._reference[id(p)] for p in chunk] for chunk in b.chunks]


def _reference_key(name: str | None) -> str | None:
    """A parameter name without wrapper components (``_orig_mod.``, a leading DDP ``module.``), to match state dicts."""
    if name is None:
        return None
    parts = [p for p in name.split(".") if p not in _WRAPPER_ATTRS]
    if len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _with_layouts(bucket: _Bucket, *, grads: bool) -> tuple[list[Tensor], list[F._Layout]]:
    """The bucket's tensors (or the gradients there are) with their layouts, in chunk order."""
    tensors: list[Tensor] = []
    layouts: list[F._Layout] = []
    for chunk, chunk_layouts in zip(bucket.chunks, bucket.layouts, strict=True):
        for p, layout in zip(chunk, chunk_layouts, strict=True):
            t = p.grad if grads else p
            if t is not None:
                tensors.append(t)
                layouts.append(layout)
    return tensors, layouts


def _views_norm(bucket: _Bucket, tensors: list[Tensor], layouts: list[F._Layout]) -> Tensor:
    """The L2 norm of FSDP1 views (local parts) over the whole tensors: one ``all_reduce`` per shard group."""
    assert bucket.views is not None
    return _fsdp.reduced_sums(tensors, layouts, bucket.views, 2, bucket.params[0].device)[0].sqrt()


def _views_angle(bucket: _Bucket, parts: list[_Part]) -> tuple[Tensor, Tensor]:
    """``functional._angle`` over FSDP1 views: the same formula, each norm reduced over every shard group
    of the bucket, also on a rank that holds none of its tensors with a gradient."""
    layouts = [layout for part in parts for layout in part.layouts]
    before = [t.float() for part in parts for t in part.before]
    after = [t.float() for part in parts for t in part.tensors]
    tiny = torch.finfo(torch.float32).tiny
    norm_before = _views_norm(bucket, before, layouts).clamp_min(tiny)
    norm_after = _views_norm(bucket, after, layouts).clamp_min(tiny)
    ratio = _views_norm(bucket, list(torch._foreach_sub(after, before)) if after else [], layouts) / norm_before
    unit = list(torch._foreach_mul(before, norm_before.reciprocal())) if before else []
    if unit:  # (foreach kernels refuse empty lists)
        torch._foreach_sub_(unit, torch._foreach_mul(after, norm_after.reciprocal()))
    chord = _views_norm(bucket, unit, layouts)
    return ratio, 2 * torch.asin((chord / 2).clamp(max=1.0))


def _locals_of(bucket: _Bucket) -> list[list[Tensor]]:
    return [_local(chunk) for chunk in bucket.chunks] if bucket.sharded else bucket.chunks


def _to_floats(metrics: Mapping[str, Tensor | float]) -> dict[str, float]:
    """The values as Python floats, with one host synchronisation for all the tensors."""
    tensors = [(k, v) for k, v in metrics.items() if isinstance(v, Tensor)]
    values: dict[str, float] = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    if tensors:
        device = tensors[0][1].device
        stacked = torch.stack([v.detach().float().to(device) for _, v in tensors]).tolist()
        values.update({k: float(x) for (k, _), x in zip(tensors, stacked, strict=True)})
    return {k: values[k] for k in metrics}


def check_engine_state(state: Any, argument: str) -> tuple[int, int | None]:
    """``(steps, total_steps)`` of an engine state, checked (see ``WeightDecay.load_state_dict``)."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"`{argument}` must be a mapping written by WeightDecay.state_dict(), got {type(state).__name__} {state!r}."
            " Pass what state_dict() returned."
        )
    unknown = sorted(set(state) - {"version", "steps", "total_steps", "reference"})
    if state.get("version") != _STATE_VERSION or unknown:
        raise ValueError(
            f"`{argument}` was not written by WeightDecay.state_dict() (version {state.get('version')!r}, unknown keys"
            f" {unknown}); expected version {_STATE_VERSION} with `steps` and `total_steps`. Pass what state_dict()"
            " returned."
        )
    steps, total = state.get("steps", 0), state.get("total_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise TypeError(f"`{argument}['steps']` must be an int >= 0, got {steps!r}. Pass what state_dict() returned.")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise TypeError(
            f"`{argument}['total_steps']` must be None or an int >= 1, got {total!r}. Pass what state_dict() returned."
        )
    reference = state.get("reference")
    if reference is not None and (
        not isinstance(reference, Mapping)
        or not all(type(k) is int and k >= 0 and isinstance(v, Tensor) for k, v in reference.items())
    ):
        raise TypeError(
            f"`{argument}['reference']` must be a dict of parameter positions (ints >= 0) to tensors, got"
            f" {type(reference).__name__}. Pass what state_dict() returned."
        )
    return steps, total


def _resolve_schedule(
    schedule: Callable[[int], float] | None, total_steps: int | None
) -> Callable[[int], float] | None:
    """The schedule with its length filled in where it asks for one (``Cosine(total_steps=None)``)."""
    with_total = getattr(schedule, "with_total_steps", None)
    if schedule is None or with_total is None or getattr(schedule, "total_steps", 0) is not None:
        return schedule
    if total_steps is None:
        raise ValueError(
            f"`schedule` {schedule!r} has no `total_steps`, and none was given: pass `total_steps=` (the run's"
            " optimizer steps) or give the schedule its own, for example Cosine(total_steps=10_000)."
        )
    return cast(Callable[[int], float], with_total(total_steps))


def _check_schedule(schedule: Callable[[int], float], step: int) -> None:
    """Refuse a schedule whose multiplier at ``step`` is not a finite number >= 0."""
    value = schedule(step)
    try:
        multiplier = float(value)
    except (TypeError, ValueError):
        multiplier = math.nan
    if isinstance(value, bool) or not math.isfinite(multiplier) or multiplier < 0:
        raise SetupError(
            f"`schedule` must return a finite multiplier >= 0, but schedule({step}) returned"
            f" {type(value).__name__} {value!r}. Fix the schedule, or use one of lwd.schedules"
            " (Constant, LinearWarmup, Cosine)."
        )


def _warn_if_rounds_away(bucket: _Bucket, dtypes: list[torch.dtype], step: float) -> None:
    low = [d for d in dtypes if d in (torch.float16, torch.bfloat16)]
    if not low or step <= 0:
        return
    dtype = low[0]
    eps = torch.finfo(dtype).eps
    if step < eps / 2:
        _warn(
            f"Weight decay of group {bucket.name!r} rounds to nothing: its {dtype} parameters are multiplied by"
            f" (1 - {step:.3g}), but {dtype} cannot represent a relative change below {eps / 2:.3g}. Keep fp32"
            " parameters (precision='bf16-mixed' or '16-mixed' instead of a '-true' precision), or use a larger"
            " step (mode='independent')."
        )
