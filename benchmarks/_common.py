"""Shared helpers of the step benchmarks: interleaved timing, tables, machine info, a callback harness.

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
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

import lightning_wd as lwd
from lightning_wd.callback import _OptimizerState
from lightning_wd.mixin import PLANNED_KEY


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


class CallbackHarness:
    """The real step path of :class:`lightning_wd.WeightDecayCallback`, without a Trainer.

    One SGD optimizer group built like ``WDMixin``'s (planned ``weight_decay``, handed over
    to the callback), set up with the callback's own ``_plan_buckets``/``_install``, and a
    stub trainer that says whether the step is a logging step. :meth:`before_step` runs the
    callback's ``on_before_optimizer_step`` (the snapshot, in the modes that take one) and
    :meth:`after_step` the optimizer step post-hook (decay, metrics, logging); the optimizer
    itself is never stepped, so only the callback's work is timed.

    It touches private names of ``lightning_wd.callback``: keep it in step with that module.
    """

    def __init__(
        self, params: list[Tensor], *, weight_decay: float = 0.1, lr: float = 1e-3, logging: bool = False, **kwargs: Any
    ) -> None:
        self.callback = lwd.WeightDecayCallback(**kwargs)
        self.optimizer = torch.optim.SGD(
            [{"params": params, "weight_decay": weight_decay, PLANNED_KEY: weight_decay, "name": "decay"}], lr=lr
        )
        self.logger = NullLogger()
        self.trainer = SimpleNamespace(
            loggers=[self.logger] if logging else [],
            is_global_zero=True,
            _logger_connector=SimpleNamespace(should_update_logs=logging),
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),
        )
        cb = self.callback
        cb._trainer = self.trainer  # type: ignore[assignment]
        self.state = _OptimizerState(optimizer=self.optimizer, prefix="", owned=True)
        buckets, handover = cb._plan_buckets(self.state, fit_start=True)
        cb._install(self.state, buckets, handover)
        cb._states = [self.state]

    def before_step(self) -> None:
        self.callback.on_before_optimizer_step(self.trainer, None, self.optimizer)  # type: ignore[arg-type]

    def after_step(self) -> None:
        self.callback._after_step(self.state, self.optimizer, (), {})

    def step(self) -> None:
        self.before_step()
        self.after_step()
