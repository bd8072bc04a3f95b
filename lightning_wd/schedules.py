"""Weight-decay schedules: a multiplier of each group's λ as a function of the optimizer step.

A schedule is any callable ``(step: int) -> float`` (``step`` counts the optimizer's real
steps from 0); the classes here are frozen, validated and usable from a LightningCLI
config. The multiplier is computed on the host once per step (a Python number, no device
work); a step that is not an int >= 0 is refused (TypeError or ValueError naming ``step``).
``total_steps=None`` is filled in by ``WeightDecayCallback`` from
``trainer.estimated_stepping_batches`` at fit start.

Examples:
    >>> import lightning_wd as lwd
    >>> [lwd.schedules.LinearWarmup(warmup_steps=2)(step) for step in range(4)]
    [0.0, 0.5, 1.0, 1.0]
    >>> callback = lwd.WeightDecayCallback(schedule=lambda step: 0.5 if step < 100 else 1.0)  # any callable
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

__all__ = ["Constant", "Cosine", "LinearWarmup", "Schedule", "weight_decay_from_timescale"]


@runtime_checkable
class Schedule(Protocol):
    """Anything callable as ``schedule(step) -> multiplier``.

    Examples:
        >>> import lightning_wd as lwd
        >>> isinstance(lwd.schedules.Cosine(start=1.0, end=0.1), lwd.schedules.Schedule)
        True
        >>> isinstance(lambda step: 1.0, lwd.schedules.Schedule)
        True
    """

    def __call__(self, step: int) -> float: ...


def _check(value: Any, argument: str, *, minimum: float = 0.0, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    example = "100" if integer else "1.0"
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(
            f"`{argument}` must be {kind}, got {type(value).__name__} {value!r}. Pass for example {example}."
        )
    if not math.isfinite(value) or value < minimum:
        raise ValueError(
            f"`{argument}` must be finite and >= {minimum:g}, got {value!r}. Use a finite value >= {minimum:g},"
            f" for example {example}."
        )


def _check_step(step: Any) -> None:
    """Refuse a step that is not an int >= 0 (one type test in the common case)."""
    if type(step) is int and step >= 0:
        return
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(
            f"`step` must be an int (the optimizer steps taken so far, from 0), got {type(step).__name__}"
            f" {step!r:.80}. Pass for example `trainer.global_step`, or int(step)."
        )
    if step < 0:
        raise ValueError(
            f"`step` must be an int >= 0 (the optimizer steps taken so far, from 0), got {step}. Pass for example"
            " `trainer.global_step`, which counts from 0."
        )


@dataclass(frozen=True)
class Constant:
    """A constant multiplier (1.0 keeps each group's λ as it is).

    Examples:
        >>> Constant(0.5)(1000)
        0.5
    """

    value: float = 1.0

    def __post_init__(self) -> None:
        _check(self.value, "value")

    def __call__(self, step: int) -> float:
        """The multiplier at ``step`` (an int >= 0; TypeError or ValueError otherwise)."""
        _check_step(step)
        return float(self.value)


@dataclass(frozen=True)
class LinearWarmup:
    """Rise linearly from ``start`` to 1.0 over ``warmup_steps`` steps, then stay at 1.0.

    Args:
        warmup_steps: Length of the warm-up in optimizer steps (>= 1).
        start: Multiplier at step 0.

    Examples:
        >>> s = LinearWarmup(warmup_steps=4)
        >>> [s(i) for i in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        >>> s(-8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: `step` must be an int >= 0 (the optimizer steps taken so far, from 0), got -8. ...
    """

    warmup_steps: int
    start: float = 0.0

    def __post_init__(self) -> None:
        _check(self.warmup_steps, "warmup_steps", minimum=1, integer=True)
        _check(self.start, "start")

    def __call__(self, step: int) -> float:
        """The multiplier at ``step`` (an int >= 0; TypeError or ValueError otherwise)."""
        _check_step(step)
        if step >= self.warmup_steps:
            return 1.0
        return self.start + (1.0 - self.start) * step / self.warmup_steps


@dataclass(frozen=True)
class Cosine:
    """Cosine from ``start`` to ``end`` over ``total_steps`` steps, then ``end`` (as DINO does).

    DINO raises the weight decay from 0.04 to 0.4: with a rule λ of 0.04 that is
    ``Cosine(start=1.0, end=10.0)``.

    Args:
        start: Multiplier at step 0.
        end: Multiplier at ``total_steps`` and after.
        total_steps: Length in optimizer steps; None lets the callback use the trainer's estimate.

    Examples:
        >>> s = Cosine(start=1.0, end=10.0, total_steps=100)
        >>> round(s(0), 3), round(s(50), 3), round(s(100), 3), round(s(500), 3)
        (1.0, 5.5, 10.0, 10.0)
    """

    start: float = 1.0
    end: float = 0.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        _check(self.start, "start")
        _check(self.end, "end")
        if self.total_steps is not None:
            _check(self.total_steps, "total_steps", minimum=1, integer=True)

    def with_total_steps(self, total_steps: int) -> Cosine:
        """A copy whose ``total_steps`` is set (when it was None).

        Examples:
            >>> import lightning_wd as lwd
            >>> cosine = lwd.schedules.Cosine(start=1.0, end=0.0)
            >>> cosine.with_total_steps(10).total_steps, cosine.with_total_steps(10)(10)
            (10, 0.0)
            >>> lwd.schedules.Cosine(start=1.0, end=0.0, total_steps=4).with_total_steps(10).total_steps
            4
        """
        return self if self.total_steps is not None else replace(self, total_steps=max(int(total_steps), 1))

    def __call__(self, step: int) -> float:
        """The multiplier at ``step`` (an int >= 0; TypeError or ValueError otherwise).

        Raises:
            ValueError: if ``total_steps`` is still None, or ``step`` is negative.
            TypeError: if ``step`` is not an int.
        """
        _check_step(step)
        if self.total_steps is None:
            raise ValueError(
                "`Cosine.total_steps` is None. Give it, or let WeightDecayCallback fill it from the trainer."
            )
        t = min(step, self.total_steps) / self.total_steps
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))


def _check_positive(value: Any, argument: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{argument}` must be a number > 0, got {type(value).__name__} {value!r}. Pass for example {example}."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{argument}` must be a finite number > 0, got {value!r}. Pass for example {example}.")


def weight_decay_from_timescale(fraction: float, *, lr: float, total_steps: int) -> float:
    """The λ whose decay timescale ``τ = 1 / (η λ)`` is ``fraction`` of the run: ``1 / (fraction · total_steps · lr)``.

    Decoupled weight decay makes the weights an exponential moving average of the updates
    over about ``τ`` steps (Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale
    model and dataset size"); they find the best ``τ`` to be a roughly constant fraction of the run,
    so a fraction tuned once carries over to longer runs, larger data and other learning rates,
    where a fixed λ does not.

    Args:
        fraction: ``τ`` as a fraction of the run (> 0; 1.0 means one timescale over the whole run).
        lr: The learning rate η the decay is multiplied by, normally the peak lr (> 0; 1.0 for
            ``mode="independent"`` or ``"lr_ratio"``, where the step is λ at the peak).
        total_steps: The run's length in optimizer steps (an int >= 1).

    Returns:
        λ, a float.

    Raises:
        TypeError: if an argument is not a number (``total_steps``: not an int).
        ValueError: if an argument is not finite and > 0.

    Examples:
        >>> weight_decay_from_timescale(0.25, lr=1e-3, total_steps=10_000)
        0.4
        >>> weight_decay_from_timescale(0.0, lr=1e-3, total_steps=10_000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: `fraction` must be a finite number > 0, got 0.0. Pass for example 0.25.
    """
    _check_positive(fraction, "fraction", "0.25")
    _check_positive(lr, "lr", "3e-4")
    _check(total_steps, "total_steps", minimum=1, integer=True)
    return 1.0 / (fraction * total_steps * lr)
