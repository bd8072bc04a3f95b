"""``WeightDecayCallback``: the Lightning adapter of ``WeightDecay``.

The decay itself is the engine's (``lightning_wd/engine.py``, pure torch): it wraps each
optimizer's ``step``, so the decay runs exactly when the optimizer really stepped (not on
gradient-accumulation micro-batches, not when an AMP grad scaler skipped the step, once per
``step()`` of each optimizer in manual optimization), and each group's λ is its own
``weight_decay``, which stays where LearningRateMonitor, schedules and checkpoints read it.

The callback only drives the engine from the trainer's lifecycle: it refuses strategies that
cannot work in ``setup``, attaches one engine per optimizer at train start (with the checkpoint's
step count when resuming, the trainer's estimate of the run's length for a schedule without one),
attaches again to optimizers re-created during training, logs the engine's metrics on the
trainer's logging steps, saves the step counts with the checkpoint, and detaches at the end of
the fit, so a callback reused for a second ``fit`` starts afresh unless restored from a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_wd import _fsdp, _plotting
from lightning_wd._compat import backward_skipped, batches_that_stepped, should_update_logs
from lightning_wd.engine import (
    LEGACY_PLANNED_KEY,
    DecayOptions,
    Metric,
    Mode,
    SetupError,
    Source,
    WeightDecay,
    _flag,
    check_engine_state,
    unwrap_optimizer,
)
from lightning_wd.plan import PLANNED_KEY, DecayPlan, _check_rules
from lightning_wd.rules import DecayRule

__all__ = ["WeightDecayCallback"]

_STATE_VERSION = 2

_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed steps its own fp32 master partitions of the parameters and copies them back over"
    " the model's, which would overwrite a decay applied to the model. The rules still work there: drop this"
    " callback and let DeepSpeed's optimizer apply each group's own weight_decay (WDMixin's groups, or"
    " `lwd.build_param_groups(self, rules)` in `configure_optimizers`, carry the rules' λ; AdamW's decay is the"
    " decoupled mode), or train with strategy='fsdp' (FSDPStrategy) or ModelParallelStrategy with `fully_shard`,"
    " which this callback supports.",
}


class WeightDecayCallback(Callback):
    r"""Apply weight decay after every real optimizer step, with any optimizer, and log it per group.

    The decay is ``WeightDecay``'s, with its modes (``decoupled``
    ``p <- p (1 - η_t λ)``, ``lr_ratio``, ``independent``, ``relative``, ``corrected`` (AdamC); the table is
    there), η\ :sub:`t`
    the group's ``lr`` and λ its ``weight_decay`` times the schedule's multiplier.

    ``ord=1`` replaces the multiplication by the soft threshold with the same step,
    ``p <- sign(p) max(|p| - step, 0)``. ``cautious=True`` decays only the coordinates that
    the optimizer's update moved toward zero (``(p_new - p_old) p_old < 0``).

    Where each group's λ comes from: its own ``weight_decay``. Groups built from a plan
    (``WDMixin``, ``build_param_groups``) carry the rules' λ
    there; a group built from raw parameters (``weight_decay=0``) is decayed as ``rules`` say (or,
    for a ``WDMixin`` module, its ``decay_rules``). The optimizer sees ``weight_decay=0`` during its
    own step only, so the decay is never applied twice, and everything that reads or writes the
    group's ``weight_decay`` (LearningRateMonitor, a schedule written as a callback, a resume with
    or without this callback) sees and sets the real λ.

    Memory: the modes that need the update (``cautious=True``, ``source="update"``, and
    ``log_update_norm`` on logged steps) copy the decayed parameters just before the
    optimizer's update and free the copy right after it.

    Logged on the trainer's logging steps (``log_every_n_steps``), per group, as
    ``wd/<group>/<metric>`` (``wd/<optimizer>/<group>/<metric>`` with several optimizers):
    ``param_norm`` (L2 norm of the group's parameters after the decay), ``weight_decay``
    (the λ in force), ``timescale`` (the decay's averaging time in steps, ``1 / step`` of the
    multiplicative decay; ``threshold``, the soft-threshold step, for ``ord=1``), and
    optionally ``grad_norm`` and ``update_norm``. Nothing is computed on other steps.

    Sharded parameters (``ModelParallelStrategy`` with FSDP2's ``fully_shard`` in
    ``configure_model``, or tensor parallelism: DTensors with Shard and Replicate placements) are
    decayed on each rank's local shard, with no communication. The logged norms and ``relative``
    mode's ``m`` are taken over the whole group on every rank: a few ``all_reduce`` calls per norm,
    so with sharded parameters every rank measures on logged steps (rank zero alone logs), and
    ``relative`` mode communicates at every step. ``FSDPStrategy`` (FSDP1, with its default
    ``use_orig_params=True``, ``HYBRID_SHARD`` included) is supported the same way: each rank decays
    its shard of each tensor, and norms are added up over the shard group (never over the
    replicas). ``DeepSpeedStrategy`` is refused in ``setup`` (the message gives the alternative).

    Args:
        mode: How the step size follows the learning rate (see the table).
        rules: Decay rules for groups built from raw parameters (a plain optimizer, or groups
            added during training); default: the module's ``decay_rules`` for a ``WDMixin`` module.
        ord: 2 for multiplicative decay, 1 for the L1 soft threshold.
        cautious: Decay only coordinates that the update moved toward zero.
        source: For ``mode="relative"``, what ``m`` is measured on.
        metric: For ``mode="relative"``, ``"mean_abs"`` or ``"rms"``.
        schedule: Multiplier of λ as a function of the optimizer step (see
            ``lightning_wd.schedules``), or None for a constant λ. A schedule without its own
            ``total_steps`` gets the trainer's estimate at each fit start.
        log_norms: Log ``param_norm``, ``weight_decay`` and ``timescale``.
        log_grad_norm: Also log the L2 norm of each group's gradients.
        log_update_norm: Also log the L2 norm of each group's optimizer update.
        toward: Decay toward reference weights ``p0`` instead of zero, ``p <- p - step (p - p0)``:
            ``"init"`` (the parameters at fit start) or a state dict (for example the pretrained
            weights). ``p0`` is saved with the callback's state, so a resume is exact; it costs one
            copy of the decayed parameters, in memory and in the checkpoint.
        timescale_fraction: Set each decayed group's λ at fit start so that the decay timescale
            ``1 / (η λ)`` is this fraction of the run (the trainer's estimated steps, η the group's peak
            lr): ``λ = 1 / (fraction · total_steps · η)``; printed at fit start and logged as
            ``timescale_target``. A resume keeps the checkpoint's λ.
        log_diagnostics: Also log, on logging steps only, each group's ``effective_decay`` (the decay
            step η_t·λ), ``update_ratio`` (‖Δp‖/‖p‖) and ``angular_update`` (radians between the
            parameters before and after the step), and print a report per group at the end of the fit
            (``report``): the timescale against the run's length, and whether ``param_norm`` settled.
        fused: How ``cautious=True`` groups of a few large tensors are decayed, and how ``relative``
            mode's ``mean_abs`` is measured on them (see ``WeightDecay``): ``None`` (the default), by C
            loops built at the first use on CPU for float32/float64 (one pass; they also take a logged
            step's norm in the decay's pass), else by ``torch.compile`` kernels for CPU groups of at least
            8M elements, where they repay their compile, quietly falling back; ``True``, also with the
            compiled kernels for every other such group and device (a compile at the first step, and
            the eager path, with one warning, where compiling fails); ``False``, neither.

    Raises:
        ValueError: on an unknown ``mode``, ``source``, ``metric`` or ``ord``, or ``source``/``metric``
            given for a mode other than ``"relative"``.
        TypeError: on a flag that is not a bool, ``rules`` that are not DecayRule, or a
            ``schedule`` that is not callable.

    Examples:
        >>> import lightning_wd as lwd
        >>> lwd.WeightDecayCallback(mode="lr_ratio", ord=1).state_key
        "WeightDecayCallback{'mode': 'lr_ratio', 'ord': 1, 'cautious': False}"
        >>> lwd.WeightDecayCallback(mode="adamw")
        Traceback (most recent call last):
        ...
        ValueError: `mode` must be one of ['decoupled', 'lr_ratio', 'independent', 'relative', 'corrected'], got ...
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
        toward: Literal["init"] | Mapping[str, Tensor] | None = None,
        timescale_fraction: float | None = None,
        log_diagnostics: bool = False,
        fused: bool | None = None,
    ) -> None:
        options = DecayOptions(
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
        for value, argument in (
            (log_norms, "log_norms"),
            (log_grad_norm, "log_grad_norm"),
            (log_update_norm, "log_update_norm"),
            (log_diagnostics, "log_diagnostics"),
        ):
            _flag(value, argument)
        self.options = options
        self.rules = list(_check_rules(rules)) if rules is not None else None
        self.log_norms = log_norms
        self.log_grad_norm = log_grad_norm
        self.log_update_norm = log_update_norm
        self.log_diagnostics = log_diagnostics
        #: With ``log_diagnostics``: the report printed at the end of the last fit (None before).
        self.report: str | None = None
        self._history: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        self.engines: list[WeightDecay] = []
        self._trainer: Trainer | None = None
        self._loaded: list[dict[str, Any]] | None = None  # engine states from a checkpoint, for this fit
        self._steps_at_batch_start: list[int] = []
        self._warned_orphans = False

    # Read-only views of the options, as the constructor named them.
    mode = property(lambda self: self.options.mode)
    ord = property(lambda self: self.options.ord)
    cautious = property(lambda self: self.options.cautious)
    source = property(lambda self: self.options.source)
    metric = property(lambda self: self.options.metric)
    schedule = property(lambda self: self.options.schedule)
    toward = property(lambda self: self.options.toward)
    timescale_fraction = property(lambda self: self.options.timescale_fraction)
    fused = property(lambda self: self.options.fused)

    # ------------------------------------------------------------------ identity and state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, ord=self.ord, cautious=self.cautious)

    @override
    def state_dict(self) -> dict[str, Any]:
        # restored and not yet attached, else the engines of this fit (or, detached, of the last one)
        engines = self._loaded if self._loaded is not None else [e.state_dict() for e in self.engines]
        return {"version": _STATE_VERSION, "engines": [dict(e) for e in engines]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counts (and a schedule's length) from a checkpoint, for the next fit.

        Raises:
            TypeError: if ``state_dict`` is not a mapping or holds values of the wrong types.
            ValueError: if it was not written by this callback (version 1 or 2).
        """
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"`state_dict` must be a dict written by WeightDecayCallback.state_dict(), got"
                f" {type(state_dict).__name__} {state_dict!r}. Pass what state_dict() returned."
            )
        version = state_dict.get("version")
        if version == 1:  # one step count per optimizer, one total for all
            steps, total = state_dict.get("steps", []), state_dict.get("total_steps")
            if not isinstance(steps, list):
                raise TypeError(f"`state_dict['steps']` must be a list of ints, got {steps!r}. Pass what it returned.")
            engines = [{"version": 2, "steps": s, "total_steps": total} for s in steps]
        elif version == _STATE_VERSION and isinstance(state_dict.get("engines"), list):
            engines = state_dict["engines"]
        else:
            raise ValueError(
                f"`state_dict` was not written by WeightDecayCallback (version {version!r}, keys"
                f" {sorted(state_dict)}); expected version 2 with `engines`. Pass what state_dict() returned."
            )
        for i, engine in enumerate(engines):
            check_engine_state(engine, f"state_dict['engines'][{i}]")
        self._loaded = [dict(e) for e in engines]

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resume the step count of a checkpoint written with other ``mode``, ``ord`` or ``cautious``.

        Those options are part of ``state_key``, so Lightning alone would start such a resume from
        step 0, and a λ schedule from its start. Where the checkpoint holds exactly one state of this
        class that no callback of the trainer claims, it is this callback's, and it is restored.
        """
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        claimed = {cb.state_key for cb in getattr(trainer, "callbacks", []) if isinstance(cb, WeightDecayCallback)}
        prefix = type(self).__name__ + "{"
        unclaimed = [key for key in states if isinstance(key, str) and key.startswith(prefix) and key not in claimed]
        if len(unclaimed) != 1:
            return
        states[self.state_key] = states[unclaimed[0]]
        rank_zero_warn(
            f"The checkpoint's weight decay state was written by {unclaimed[0]}; this run's callback is"
            f" {self.state_key}. Its step count (and a λ schedule's position) carries over to the new options."
        )

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        for refused, why in _REFUSED_STRATEGIES.items():
            if any(klass.__name__ == refused for klass in type(trainer.strategy).__mro__):
                raise MisconfigurationException(f"WeightDecayCallback does not support `strategy`={name}: {why}")
        kwargs = getattr(trainer.strategy, "kwargs", None)
        fsdp1 = any(klass.__name__ == "FSDPStrategy" for klass in type(trainer.strategy).__mro__)
        if fsdp1 and isinstance(kwargs, dict) and kwargs.get("use_orig_params", True) is False:
            raise MisconfigurationException(
                f"WeightDecayCallback does not support `strategy`={name} with use_orig_params=False: FSDP then"
                " trains flat parameters that concatenate tensors of different roles, which no rule can tell apart."
                " Leave `use_orig_params` at its default, True (FSDPStrategy(use_orig_params=True)): each tensor"
                " keeps its name, shape and owner, and is decayed on each rank's shard."
            )
        self._loaded = None  # a new fit starts afresh; a checkpoint restored after this hook fills it again
        self.engines = []

    def _rules_of(self, pl_module: LightningModule) -> tuple[list[DecayRule] | None, dict[str, Any]]:
        """The rules for raw groups: the callback's own, else those of the module's decay plan (WDMixin)."""
        if self.rules is not None:
            return self.rules, {}
        plan = getattr(pl_module, "decay_plan", None)
        if isinstance(plan, DecayPlan):
            options = getattr(pl_module, "decay_plan_options", None) or {}
            return list(plan.rules), dict(options)
        return None, {}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer
        self._warned_orphans = False
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if not optimizers:
            raise MisconfigurationException("WeightDecayCallback needs an optimizer, but the trainer has none.")
        rules, plan_options = self._rules_of(pl_module)
        if rules is None:
            raw = [
                f"{type(o).__name__} group {g.get('name', f'pg{i + 1}')!r}"
                for o in optimizers
                for i, g in enumerate(o.param_groups)
                if PLANNED_KEY not in g and LEGACY_PLANNED_KEY not in g
            ]
            if raw:
                raise MisconfigurationException(
                    f"WeightDecayCallback does not know which tensors of {raw[0]} to decay: it was built from raw"
                    " parameters, not from decay rules. Pass `rules=` (for example"
                    " WeightDecayCallback(rules=lwd.presets.standard(0.05)), with weight_decay=0.0 on the optimizer),"
                    " build the groups with `lwd.build_param_groups(self, rules)`, or use `lwd.WDMixin`."
                )
        loaded = self._loaded or []
        total = self._total_steps(trainer, loaded)
        engines: list[WeightDecay] = []
        lambdas = [[g.get("weight_decay") for g in o.param_groups] for o in optimizers]
        try:
            for i, opt in enumerate(optimizers):
                # a resumed optimizer keeps its checkpoint's λ: timescale_fraction sets it at the first fit start only
                engine = self._engine(opt, pl_module, rules, plan_options, total, strict=True, fresh=i >= len(loaded))
                engines.append(engine)
                if i < len(loaded):
                    engine.load_state_dict(loaded[i])
        except SetupError as err:
            for engine in engines:
                engine.remove()
            for opt, values in zip(optimizers, lambdas, strict=True):  # λ set by timescale_fraction: put back
                for g, value in zip(opt.param_groups, values, strict=True):
                    if value is not None:
                        g["weight_decay"] = value
            raise MisconfigurationException(str(err)) from None
        self.engines = engines
        self._history = {}
        self.report = None
        self._report_timescale(total)
        self._report_resumed_decay(trainer, pl_module)

    def _report_timescale(self, total: int | None) -> None:
        """Print the λ that ``timescale_fraction`` gave each decayed group."""
        rows = [(name, lr, lam) for e in self.engines for name, (lr, lam) in e.timescale_lambdas.items()]
        if not rows:
            return
        fraction = float(self.options.timescale_fraction or 0.0)
        width = max(len(name) for name, _, _ in rows)
        lines = [
            f"  {name.ljust(width)}  λ = 1 / ({fraction:g} · {total:,} · {lr:g}) = {lam:.4g}" for name, lr, lam in rows
        ]
        rank_zero_info(
            f"WeightDecayCallback: λ from timescale_fraction={fraction:g} of {total:,} steps (timescale"
            f" {fraction * (total or 0):,.0f} steps, η the group's peak lr):\n" + "\n".join(lines)
        )

    def _engine(
        self,
        optimizer: Optimizer,
        pl_module: LightningModule,
        rules: list[DecayRule] | None,
        plan_options: dict[str, Any],
        total_steps: int | None,
        *,
        strict: bool,
        fresh: bool = True,
    ) -> WeightDecay:
        """An engine with this callback's options; ``strict`` at fit start (errors), not for later optimizers.

        ``fresh``: the optimizer does not resume a checkpoint, so ``timescale_fraction`` sets its λ.
        """
        return WeightDecay(
            optimizer,
            rules=rules,
            module=_fsdp.wrapper_of(pl_module, getattr(self._trainer, "model", None)),  # FSDP1 wraps the module
            plan_options=plan_options,
            total_steps=total_steps,
            _options=self.options,
            _strict=strict,
            _set_timescale=fresh,
        )

    def _total_steps(self, trainer: Trainer, loaded: list[dict[str, Any]]) -> int | None:
        """The run's length for a schedule without its own or for ``timescale_fraction``: the checkpoint's, else
        the trainer's estimate."""
        schedule = self.options.schedule
        timescale = self.options.timescale_fraction is not None
        if not timescale and (
            getattr(schedule, "total_steps", 0) is not None or not hasattr(schedule, "with_total_steps")
        ):
            return None
        total = loaded[0].get("total_steps") if loaded else None
        if total is None:
            total = trainer.estimated_stepping_batches
        # (an iterable of unknown length without max_steps is estimated as max_steps, -1)
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total) or total < 1:
            what = "`timescale_fraction` is a fraction of the run" if timescale else "`schedule` is a Cosine"
            fix = "Give the Trainer max_steps=..." if timescale else "Give Cosine(total_steps=...)."
            raise MisconfigurationException(
                f"{what} without `total_steps`, and the trainer cannot estimate the number of"
                f" steps (no max_steps, and an iterable of unknown length). {fix}"
            )
        return int(total)

    def _report_resumed_decay(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """On a resume, say where a group's λ differs from what the module's decay rules plan."""
        plans = getattr(pl_module, "decay_plans", None)
        plan = getattr(pl_module, "decay_plan", None)
        if isinstance(plans, Mapping):  # WDMixin.decay_optimizers: groups named "<optimizer>/<group>"
            planned = {f"{n}/{g.name}": g.weight_decay for n, p in plans.items() for g in p.groups}
        elif isinstance(plan, DecayPlan):
            planned = {g.name: g.weight_decay for g in plan.groups}
        else:
            return
        if trainer.ckpt_path is None or self.options.timescale_fraction is not None:  # (its λ is meant to differ)
            return
        differ = [
            f"{g['name']!r}: {g['weight_decay']} (rules: {planned[g['name']]})"
            for e in self.engines
            for g in e.optimizer.param_groups
            if PLANNED_KEY in g and g.get("name") in planned and g.get("weight_decay") != planned[g["name"]]
        ]
        if differ:
            rank_zero_warn(
                f"Resumed weight decay differs from `decay_rules`: {', '.join(differ)}. The checkpoint's optimizer"
                " state wins, as torch does for lr: its λ is used. To train with the rules' λ, set each group's"
                " `weight_decay` after the resume (for example in `on_train_start`), or start from the weights only."
            )

    # ------------------------------------------------------------------ per batch
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._follow_optimizers(trainer, pl_module)
        logging = self._logging_step()
        track = self.log_update_norm and logging
        diagnose = self.log_diagnostics and logging
        # Stochastic weight averaging's batch-norm update epoch runs no backward, and the optimizer steps once
        # on the last real step's gradients: not a training step, so it is neither decayed nor counted.
        paused = backward_skipped(trainer)
        for engine in self.engines:
            engine.track_updates = track
            engine.track_diagnostics = diagnose
            engine.norms_in_step = logging and (self.log_norms or self.log_diagnostics)
            engine.paused = paused
        self._steps_at_batch_start = [e.steps for e in self.engines]

    def _follow_optimizers(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach to optimizers re-created during training, with the same rules as at fit start."""
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if [id(o) for o in optimizers] == [id(e.optimizer) for e in self.engines]:
            return
        by_optimizer = {id(e.optimizer): e for e in self.engines}
        rules, plan_options = self._rules_of(pl_module)
        before = list(self.engines)
        engines = []
        for index, opt in enumerate(optimizers):
            engine = by_optimizer.pop(id(opt), None)
            if engine is None:
                rank_zero_warn(
                    f"WeightDecayCallback: the trainer's optimizers changed during training; the new"
                    f" {type(opt).__name__} is decayed from its next step, with the same rules as at fit start."
                )
                total = self._total_steps(trainer, [])
                engine = self._engine(opt, pl_module, rules, plan_options, total, strict=False)
                if index < len(before) and before[index].optimizer not in optimizers:
                    engine.steps = before[index].steps  # the optimizer it replaces: the schedule goes on
                    engine._inherit_reference(before[index])  # and `toward` keeps its p0
            engines.append(engine)
        for gone in by_optimizer.values():
            gone.remove()
        self.engines = engines

    def _logging_step(self) -> bool:
        """Whether this process measures the groups at this step (every rank where parameters are sharded)."""
        trainer = self._trainer
        wanted = self.log_norms or self.log_grad_norm or self.log_update_norm or self.log_diagnostics
        if trainer is None or not wanted:
            return False
        if not trainer.loggers:
            return False
        if not (trainer.is_global_zero or any(e.sharded for e in self.engines)):
            return False
        return should_update_logs(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = [e for e, before in zip(self.engines, self._steps_at_batch_start, strict=False) if e.steps != before]
        if not stepped or not self._logging_step():
            return
        self._check_orphans(pl_module)
        prefixes = _optimizer_prefixes([e.optimizer for e in self.engines])
        out: dict[str, float] = {}
        for engine, prefix in zip(self.engines, prefixes, strict=True):
            if engine not in stepped:
                continue
            metrics = engine.metrics(
                grad_norm=self.log_grad_norm,
                param_norm=self.log_norms or self.log_diagnostics,
                diagnostics=self.log_diagnostics,
            )
            for key, value in metrics.items():
                if self.log_norms or key.endswith(_OPTIONAL_METRICS):
                    out[f"wd/{prefix}{key}"] = value
                if self.log_diagnostics:
                    _plotting._add(self._history, f"wd/{prefix}{key}", engine.steps, value)
        if not trainer.is_global_zero or not out:  # the other ranks only took part in the collectives
            return
        step = batches_that_stepped(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(out, step=step)

    def _check_orphans(self, pl_module: LightningModule) -> None:
        """Warn once when an optimizer holds a tensor the module no longer has (a parameter replaced mid-run)."""
        if self._warned_orphans:
            return
        owned = {id(p) for p in pl_module.parameters()}
        orphans = [
            g.get("name", f"pg{i + 1}")
            for e in self.engines
            for i, g in enumerate(e.optimizer.param_groups)
            if any(id(p) not in owned for p in g["params"])
        ]
        if orphans:
            self._warned_orphans = True
            rank_zero_warn(
                f"Optimizer group(s) {orphans} hold tensors that are no longer parameters of the module (replaced"
                " during training?): the optimizer trains, decays and logs tensors the model does not use, and the"
                " new parameters are not trained. Re-create the optimizer after replacing parameters (for example"
                " with `trainer.strategy.setup_optimizers(trainer)`)."
            )

    def on_after_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Refuse to do nothing under Lightning Fabric, which calls this hook and no other of this callback.

        The Trainer never calls it; Fabric's optimizer does, after each step, with ``strategy=`` and
        ``optimizer=``. Fabric has no trainer lifecycle to attach, log and checkpoint from, so the
        callback cannot decay there: the engine it drives is the way.

        Raises:
            MisconfigurationException: always, with the Fabric recipe.
        """
        raise MisconfigurationException(
            "WeightDecayCallback was passed to `Fabric(callbacks=...)`, where it cannot decay anything: Fabric runs"
            " no trainer lifecycle to attach it to. Use its engine instead, after `fabric.setup`:"
            " `model, optimizer = fabric.setup(model, optimizer)`, then `decay = lwd.WeightDecay(optimizer)`"
            " (groups from `lwd.build_param_groups(model, rules)`), and log with `fabric.log_dict(decay.metrics())`"
            " on the steps you log; save `decay.state_dict()` in your checkpoint."
        )

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``log_diagnostics``, print the report per group: the timescale against the run, and the norm's drift."""
        if not self.log_diagnostics or not self._history or not trainer.is_global_zero:
            return
        run = max((e.steps for e in self.engines), default=0)
        self.report = _plotting.diagnose(_plotting._sorted(self._history), run_length=run)
        rank_zero_info(self.report)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        for engine in self.engines:
            engine.remove()  # kept in `engines`, detached, until the next fit: what it did stays inspectable
        self._loaded = None


#: Metrics logged without ``log_norms``: the ones their own flags ask for.
_OPTIONAL_METRICS = ("/grad_norm", "/update_norm", "/effective_decay", "/update_ratio", "/angular_update")


def _optimizer_prefixes(optimizers: Sequence[Optimizer]) -> list[str]:
    """The key prefix of each optimizer's metrics: none while the groups' names tell them apart.

    Groups named by the user (``WDMixin.decay_optimizers`` names them ``"generator/decay"``, and
    ``build_param_groups(..., prefix="generator")`` does the same) are logged under their names. Only
    when two optimizers hold groups of the same name is each prefixed with its class, '-k' suffixed for
    repeated classes (as LearningRateMonitor).
    """
    names = [str(g.get("name", f"pg{i + 1}")) for opt in optimizers for i, g in enumerate(opt.param_groups)]
    if len(set(names)) == len(names):
        return [""] * len(optimizers)
    seen: dict[str, int] = {}
    out = []
    for opt in optimizers:
        name = type(opt).__name__
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(f"{name}-{count}/" if count else f"{name}/")
    return out
