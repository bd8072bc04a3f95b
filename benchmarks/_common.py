"""Shared helpers of the step benchmarks: interleaved timing, tables, machine info, an engine harness.

Not a benchmark itself. ``bench_decay.py``, ``bench_fit.py`` and ``bench_memory.py`` import it
(``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import lightning_wd as lwd
from lightning_wd.plan import PLANNED_KEY


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (or ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> str:
    """One line describing where the numbers come from."""
    parts = [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores",
        f"torch {torch.__version__}",
        f"threads: {torch.get_num_threads()}",
    ]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    try:
        import lightning

        parts.insert(2, f"lightning {lightning.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def interleaved(
    cases: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Time every case once per round, in a shuffled order each round; seconds per call.

    Interleaving spreads the machine's noise (other processes, frequency changes) evenly over
    the cases, so ratios between them stay meaningful on a shared machine.
    """
    names = list(cases)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        rng.shuffle(names)
        for name in names:
            fn = cases[name]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def ratio(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time divided by ``reference``'s time in the same round."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[reference], strict=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def split_sizes(total: int, count: int) -> list[int]:
    """``count`` sizes adding up to ``total``, as equal as possible."""
    base, extra = divmod(total, count)
    return [base + (i < extra) for i in range(count)]


def make_params(sizes: Sequence[int], device: torch.device, dtype: torch.dtype, *, grads: bool) -> list[Tensor]:
    """Leaf parameters of the given sizes (2-D where it divides evenly), with zero gradients if asked."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for n in sizes:
        shape = (n // 64, 64) if n % 64 == 0 and n >= 64 else (n,)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device=device, dtype=dtype))
        if grads:
            p.grad = torch.zeros_like(p)
        params.append(p)
    return params


class NullLogger:
    """Stands in for a Lightning logger: counts ``log_metrics`` calls and drops the values."""

    def __init__(self) -> None:
        self.calls = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1


class _NoStep(torch.optim.SGD):
    """An SGD whose own update does nothing, so that a step times only what the engine adds."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return None


class EngineHarness:
    """The real step path of :class:`lightning_wd.WeightDecay` (what the callback runs), without a Trainer.

    One optimizer group built like ``WDMixin``'s (planned, its λ in ``weight_decay``) under an
    optimizer whose own update does nothing, so only the engine's work is timed. :meth:`step` is a
    real ``optimizer.step()`` through the engine's wrapper (λ out and back in, the snapshot in the
    modes that take one, the decay), followed on logging steps by :meth:`WeightDecay.metrics` and one
    ``log_metrics`` call, as the callback makes at batch end. :meth:`before_step` and
    :meth:`after_step` split it around the optimizer's update (snapshot; decay and metrics), for
    the memory benchmark.

    It touches private names of ``lightning_wd.engine``: keep it in step with that module.
    """

    def __init__(
        self, params: list[Tensor], *, weight_decay: float = 0.1, lr: float = 1e-3, logging: bool = False, **kwargs: Any
    ) -> None:
        self.optimizer = _NoStep(
            [{"params": params, "weight_decay": weight_decay, PLANNED_KEY: True, "name": "decay"}], lr=lr
        )
        track = logging and kwargs.pop("log_update_norm", False)
        self.engine = lwd.WeightDecay(self.optimizer, track_updates=track, **kwargs)
        self.logging = logging
        # As the callback sets it on the steps it logs: the norm is taken in the decay's own pass.
        self.engine.norms_in_step = logging
        self.logger = NullLogger()

    def before_step(self) -> None:
        engine = self.engine
        engine._refresh()
        engine._saved = [g.get("weight_decay") for g in self.optimizer.param_groups]
        if engine.options.needs_snapshot(engine.track_updates):
            engine._take_snapshot()

    def after_step(self) -> None:
        self.engine._decay(self.engine._saved)
        self._log()

    def step(self) -> None:
        self.optimizer.step()
        self._log()

    def _log(self) -> None:
        if self.logging:
            self.logger.log_metrics(self.engine.metrics(), step=self.engine.steps)
