"""Time one weight-decay pass of every mode against a single ``mul_`` over one flat buffer.

Run from the repository root::

    python benchmarks/bench_decay.py                      # CPU, 16M fp32 elements, 1 thread
    python benchmarks/bench_decay.py --device cuda        # 256M elements by default
    python benchmarks/bench_decay.py --quick              # smoke run (1M elements, few repeats)

The same number of elements is laid out two ways: a few large tensors (``--large``, 4 by
default) and many small ones (``--small``, 5,000 by default). Each row is one pass over all of
them; every round runs every row once in a shuffled order (after warm-up rounds), and the table
shows the median time and the median, over rounds, of the ratio to the flat buffer's ``mul_``
timed in the same round: the memory-bandwidth limit of a pass that reads and writes every
element once. On a shared machine the minimum over rounds (and the ratio of minima) is the
least disturbed by other processes, so it is shown too.

Rows:

* ``flat buffer mul_``: the reference, one ``mul_`` over one buffer holding all elements;
* ``flat buffer copy_``: a copy of that buffer into another, the bandwidth reference of the GPU
  target (the decay moves the same bytes: it reads and writes every element once);
* ``naive loop``: ``for p in params: p.mul_(1 - lr * wd)``;
* ``torch._foreach_mul_(float)``: the foreach kernel with a Python-number factor;
* ``apply_decay_`` rows: :func:`lightning_wd.functional.apply_decay_` alone, with a float step
  (decoupled, lr_ratio and independent all use it), a 0-dim tensor step, ``ord=1``, and a mask
  (cautious, with :func:`~lightning_wd.functional.cautious_mask` computed in the pass);
  ``relative`` adds :func:`~lightning_wd.functional.mean_abs` for the step (eager);
* ``global_norm``: the norm logged on logging steps;
* ``callback`` rows: the real step path of the callback's engine (``optimizer.step()`` through
  its wrapper, over an optimizer whose own update does nothing: λ out and back in, gradient check,
  step size, decay, and on a logged step the metrics and their one host sync); for ``cautious``
  also the snapshot it takes before the optimizer's update, in the full step and alone; the full
  step with the default ``fused=None`` (on CPU, the compiled kernel for a group of 8M elements or
  more, so for the large layout at the default size, else the foreach path), with ``fused=False``
  (the foreach path, what a machine without a C++ compiler gets) and with ``fused=True`` (the mask
  and decay as one ``torch.compile`` kernel per tensor; compiled in the warm-up rounds, so a C++
  compiler is needed on CPU); ``relative`` with the default (on CPU, the measure by one compiled
  kernel for a group of 8M elements or more) and with ``fused=False`` (the measure in cache-sized
  blocks, two operations each);
  ``contiguous group`` rows run it over parameters laid out in one buffer by
  :func:`~lightning_wd.functional.make_contiguous_` (``WDMixin.contiguous_parameters = True``).
* with ``--compiled``, ``torch.compile`` rows: the cautious mask and decay fused into one kernel
  per tensor, as a reference for what fusion would give (not a path of the package; the first
  call compiles, in the warm-up rounds).

After the table, every target with its figure (median of the per-round ratios, and the ratio of
minima) and whether it is met.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EngineHarness, interleaved, machine_info, make_params, ratio, split_sizes, table

from lightning_wd import functional as F

LR, WD = 1e-3, 0.1


def _compiled_cautious(params: list[torch.Tensor], before: list[torch.Tensor], step: float) -> Callable[[], None]:
    """The cautious mask and decay, ``p <- p (1 - step)`` where ``(p - b) b < 0``, as one compiled kernel per tensor."""

    def cautious(p: torch.Tensor, b: torch.Tensor, step: float) -> None:
        p.copy_(torch.where((p - b) * b < 0, p * (1 - step), p))

    fused = torch.compile(cautious, dynamic=True, fullgraph=True)

    def run() -> None:
        for p, b in zip(params, before, strict=True):
            fused(p, b, step)

    return run


def _cases(
    params: list[torch.Tensor],
    contiguous: list[torch.Tensor],
    flat: torch.Tensor,
    device: torch.device,
    compiled: bool = False,
) -> dict[str, Callable[[], Any]]:
    step = LR * WD
    tensor_step = torch.tensor(step, device=device)
    before = [p.detach().clone() for p in params]
    cases: dict[str, Callable[[], Any]] = {}

    cases["flat buffer mul_ (reference)"] = lambda: flat.mul_(1 - step)
    copy_to = torch.empty_like(flat)
    cases["flat buffer copy_ (bandwidth reference)"] = lambda: copy_to.copy_(flat)

    def naive() -> None:
        for p in params:
            p.mul_(1 - LR * WD)

    cases["naive loop p.mul_(1 - lr*wd)"] = naive
    cases["torch._foreach_mul_(float)"] = lambda: torch._foreach_mul_(params, 1 - step)
    cases["apply_decay_ float step (decoupled/lr_ratio/independent)"] = lambda: F.apply_decay_(params, step)
    cases["apply_decay_ tensor step"] = lambda: F.apply_decay_(params, tensor_step)
    cases["relative: mean_abs + apply_decay_"] = lambda: F.apply_decay_(params, F.mean_abs(params) * step)
    cases["L1: apply_decay_(ord=1)"] = lambda: F.apply_decay_(params, step, ord=1)
    cases["cautious: cautious_mask + apply_decay_(mask)"] = lambda: F.apply_decay_(
        params, step, mask=F.cautious_mask(params, before)
    )
    cases["logging: global_norm"] = lambda: F.global_norm(params)

    harnesses = {
        "decoupled": EngineHarness(params, weight_decay=WD, lr=LR, mode="decoupled"),
        "lr_ratio": EngineHarness(params, weight_decay=WD, lr=LR, mode="lr_ratio"),
        "independent": EngineHarness(params, weight_decay=WD * LR, lr=LR, mode="independent"),
        "relative (params, mean_abs)": EngineHarness(params, weight_decay=WD, lr=LR, mode="relative"),
        "relative, fused=False (the eager measure)": EngineHarness(
            params, weight_decay=WD, lr=LR, mode="relative", fused=False
        ),
        "L1 (ord=1)": EngineHarness(params, weight_decay=WD, lr=LR, ord=1),
        "decoupled, logged step": EngineHarness(params, weight_decay=WD, lr=LR, logging=True),
    }
    for label, h in harnesses.items():
        cases[f"callback {label}"] = h.step
    # The default (fused=None): the compiled kernel for CPU groups of 8M elements or more, else foreach.
    cases["callback cautious: full step (snapshot + mask + decay)"] = EngineHarness(
        params, weight_decay=WD, lr=LR, cautious=True
    ).step
    cases["callback cautious, fused=False: full step (the foreach path)"] = EngineHarness(
        params, weight_decay=WD, lr=LR, cautious=True, fused=False
    ).step
    # fused=True: the mask and decay as one torch.compile kernel per tensor (compiled in the warm-up rounds).
    cases["callback cautious, fused=True: full step"] = EngineHarness(
        params, weight_decay=WD, lr=LR, cautious=True, fused=True
    ).step
    # The same step over parameters laid out in one buffer (WDMixin's contiguous_parameters=True).
    for label, kwargs in (
        ("decoupled", {}),
        ("relative (params, mean_abs)", {"mode": "relative"}),
        ("L1 (ord=1)", {"ord": 1}),
    ):
        cases[f"callback {label}, contiguous group"] = EngineHarness(contiguous, weight_decay=WD, lr=LR, **kwargs).step
    if compiled:
        cases["torch.compile fused cautious mask + decay (reference)"] = _compiled_cautious(params, before, step)
    # The snapshot alone (taken before the optimizer's update), taken and dropped.
    cases["callback cautious: snapshot alone"] = EngineHarness(
        params, weight_decay=WD, lr=LR, cautious=True
    ).before_step
    return cases


#: The targets: (layout, row, at most this multiple of the flat-buffer pass).
TARGETS = [
    ("large", "callback decoupled", 1.15),
    ("large", "callback lr_ratio", 1.15),
    ("large", "callback independent", 1.15),
    ("large", "callback L1 (ord=1)", 2.5),
    ("large", "callback relative (params, mean_abs)", 2.5),
    ("large", "callback relative, fused=False (the eager measure)", 2.5),
    ("large", "callback cautious: full step (snapshot + mask + decay)", 4.0),
    ("large", "callback cautious, fused=True: full step", 4.0),
    ("large", "callback cautious, fused=False: full step (the foreach path)", 4.0),
    ("large", "callback decoupled, logged step", 1.5),
    ("small", "callback decoupled", 2.0),
    ("small", "callback decoupled, contiguous group", 2.0),
]


def run_layout(
    label: str,
    sizes: list[int],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    compiled: bool = False,
) -> tuple[list[list[Any]], dict[str, tuple[float, float]]]:
    params = make_params(sizes, device, dtype, grads=True)
    contiguous = make_params(sizes, device, dtype, grads=True)
    F.make_contiguous_(contiguous)
    flat = torch.randn(sum(sizes), device=device, dtype=dtype)
    cases = _cases(params, contiguous, flat, device, compiled)
    with torch.no_grad():  # as inside optimizer.step, where Lightning calls the callback's hooks
        samples = interleaved(cases, repeats=repeats, warmup=warmup, device=device)
    reference = next(iter(cases))
    rows = []
    ratios = {}
    for name in cases:
        best = min(samples[name])
        ratios[name] = (ratio(samples, name, reference), best / min(samples[reference]))
        rows.append(
            [
                label,
                name,
                f"{statistics.median(samples[name]) * 1e3:.3f}",
                f"{ratio(samples, name, reference):.2f}",
                f"{best * 1e3:.3f}",
                f"{best / min(samples[reference]):.2f}",
            ]
        )
    del params, contiguous, flat, cases, samples
    gc.collect()
    return rows, ratios


def target_lines(ratios: dict[str, dict[str, tuple[float, float]]], labels: dict[str, str]) -> list[str]:
    """Each target with its figure (median of the per-round ratios, and the ratio of minima) and met/missed."""
    lines = []
    # The GPU target: the decay moves as many bytes as a copy of the buffer (read and write every element once).
    copy, _ = ratios["large"]["flat buffer copy_ (bandwidth reference)"]
    decay, _ = ratios["large"]["callback decoupled"]
    fraction = 100 * copy / decay
    lines.append(
        f"target: {labels['large']}, callback decoupled at >= 80% of the copy bandwidth (GPU): {fraction:.0f}%"
        f" ({'met' if fraction >= 80 else 'missed'})"
    )
    for layout, row, limit in TARGETS:
        median, of_mins = ratios[layout][row]
        verdict = "met" if median <= limit else "missed"
        lines.append(
            f"target: {labels[layout]}, {row} <= {limit}x the flat pass: {median:.2f}x (median of rounds;"
            f" {of_mins:.2f}x of minima) ({verdict})"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--total-elements", type=int, default=None, help="default: 16M on CPU, 256M on CUDA")
    parser.add_argument("--large", type=int, default=4, help="number of tensors in the large-tensor layout")
    parser.add_argument("--small", type=int, default=5000, help="number of tensors in the small-tensor layout")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--compiled", action="store_true", help="add torch.compile fused reference rows (large)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1M elements, 200 small tensors, 3 repeats")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.total_elements or (256 * 2**20 if device.type == "cuda" else 16 * 2**20)
    repeats, warmup, small = args.repeats, args.warmup, args.small
    if args.quick:
        total, repeats, warmup, small = min(total, 2**20), 3, 1, min(small, 200)

    print(f"# bench_decay: {total:,} {args.dtype} elements on {device}, {repeats} rounds after {warmup} warm-up")
    print(machine_info(device))
    print()
    labels = {"large": f"{args.large} large tensors", "small": f"{small} small tensors"}
    rows, large = run_layout(
        labels["large"], split_sizes(total, args.large), device, dtype, repeats, warmup, args.compiled
    )
    more, small_ratios = run_layout(labels["small"], split_sizes(total, small), device, dtype, repeats, warmup)
    print(table(["tensors", "pass", "median ms", "x flat (median of rounds)", "min ms", "x flat (mins)"], rows + more))
    print()
    print("\n".join(target_lines({"large": large, "small": small_ratios}, labels)))


if __name__ == "__main__":
    main()
