"""Host time of the engine's step path per step, for 100 to 50,000 parameter tensors.

Run from the repository root::

    python benchmarks/bench_host.py                    # CPU, 2**20 float32 elements split into n tensors
    python benchmarks/bench_host.py --device cuda      # host time of the launches (no synchronize inside)
    python benchmarks/bench_host.py --quick            # smoke run

What counts on a GPU, where a small model's step takes a few milliseconds, is the time the host
spends in the engine per step: reading λ and putting it back, the change check, the check of
which parameters have a gradient, the step size and the kernel launches. This script times a
real ``optimizer.step()`` through the engine's wrapper, over an optimizer whose own update does
nothing, on non-logged steps, with the same number of elements split into ``n`` tensors:

* ``contiguous``: the tensors laid out in one buffer (``functional.make_contiguous_``,
  ``WDMixin.contiguous_parameters = True``), so the decay is one kernel whatever ``n``: the
  step's time is the engine's host time plus one pass over the buffer, and should not grow
  with ``n``;
* ``separate``: separately allocated tensors. The decay kernel itself (one
  ``torch._foreach_mul_`` over the list, with the factor as the engine passes it) is timed in the
  same rounds and subtracted: on CPU it calls the operator once per tensor, which is the kernel's
  cost, not the engine's. What is left is the engine's own work, which should not grow with ``n``
  either.

The clock stops when the call returns, before any ``torch.cuda.synchronize()``, so on CUDA the
figures are host time (launches, Python), whose device time would show in the step time. Each
round times every case once, in a shuffled order, after warm-up rounds; tables give medians and
minima over rounds, and the targets with their figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EngineHarness, machine_info, make_params, split_sizes, sync, table

from lightning_wd import functional as F

LR, WD = 1e-3, 0.1


def host_times(
    cases: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Host seconds per call of every case, once per round in a shuffled order (synchronised between calls)."""
    names = list(cases)
    rng = random.Random(0)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        rng.shuffle(names)
        for name in names:
            sync(device)
            start = time.perf_counter()
            cases[name]()
            elapsed = time.perf_counter() - start
            sync(device)
            if r >= warmup:
                samples[name].append(elapsed)
    return samples


def measure(n: int, total: int, device: torch.device, mode: str, repeats: int, warmup: int) -> dict[str, float]:
    """Median and minimum host ms per step of each layout for ``n`` tensors of ``total`` elements in all."""
    sizes = split_sizes(total, n)
    separate = make_params(sizes, device, torch.float32, grads=True)
    contiguous = make_params(sizes, device, torch.float32, grads=True)
    F.make_contiguous_(contiguous)
    kwargs: dict[str, Any] = {"mode": mode}
    # the factor as the engine passes it: a 0-dim tensor on CPU (see functional._factor), else a number
    factor: Any = torch.scalar_tensor(1 - LR * WD) if device.type == "cpu" else 1 - LR * WD
    cases = {
        "contiguous": EngineHarness(contiguous, weight_decay=WD, lr=LR, **kwargs).step,
        "separate": EngineHarness(separate, weight_decay=WD, lr=LR, **kwargs).step,
        "kernel": lambda: torch._foreach_mul_(separate, factor),
    }
    with torch.no_grad():
        samples = host_times(cases, repeats=repeats, warmup=warmup, device=device)
    beyond = [s - k for s, k in zip(samples["separate"], samples["kernel"], strict=True)]
    return {
        "contiguous": statistics.median(samples["contiguous"]) * 1e3,
        "contiguous_min": min(samples["contiguous"]) * 1e3,
        "separate": statistics.median(samples["separate"]) * 1e3,
        "kernel": statistics.median(samples["kernel"]) * 1e3,
        "beyond": statistics.median(beyond) * 1e3,
        "beyond_min": (min(samples["separate"]) - min(samples["kernel"])) * 1e3,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000, 50_000])
    parser.add_argument("--total-elements", type=int, default=2**20)
    parser.add_argument("--mode", default="decoupled", choices=["decoupled", "lr_ratio", "independent", "relative"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 and 1,000 tensors, 3 repeats")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes, repeats, warmup = args.sizes, args.repeats, args.warmup
    if args.quick:
        sizes, repeats, warmup = [100, 1_000], 3, 1
    print(f"# bench_host: {args.total_elements:,} float32 elements on {device}, mode={args.mode!r}, non-logged steps")
    print(machine_info(device))
    print()
    results = {n: measure(n, args.total_elements, device, args.mode, repeats, warmup) for n in sizes}
    rows = [
        [
            f"{n:,}",
            f"{r['contiguous']:.3f}",
            f"{r['contiguous_min']:.3f}",
            f"{r['separate']:.3f}",
            f"{r['kernel']:.3f}",
            f"{r['beyond']:.3f}",
            f"{r['beyond_min']:.3f}",
        ]
        for n, r in results.items()
    ]
    headers = [
        "tensors",
        "contiguous: step ms (median)",
        "contiguous: min",
        "separate: step ms (median)",
        "foreach_mul_ kernel ms (median)",
        "separate: engine beyond the kernel ms (median)",
        "beyond the kernel (mins)",
    ]
    print(table(headers, rows))
    low, high = min(sizes), max(sizes)
    if low != high:
        print()
        for key, label in (("contiguous", "contiguous group, step"), ("beyond", "separate tensors, beyond the kernel")):
            grown = results[high][key] / max(results[low][key], 1e-9)
            verdict = "met" if grown <= 2.0 else "missed"
            print(
                f"target: host time per step flat, within 2x from {low:,} to {high:,} tensors ({label}):"
                f" {grown:.2f}x ({verdict})"
            )


if __name__ == "__main__":
    main()
