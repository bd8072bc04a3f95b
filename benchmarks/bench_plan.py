"""Time building a :class:`lightning_wd.DecayPlan` on models with many parameter tensors.

Run from the repository root::

    python benchmarks/bench_plan.py            # 1k, 10k and 100k tensors, median of 5 runs
    python benchmarks/bench_plan.py --repeat 3 --sizes 1000 10000

Each model is a ``ModuleList`` of small ``Linear`` + ``LayerNorm`` blocks (4 tensors per
block), planned with :func:`lightning_wd.presets.standard`. The script prints a markdown
table: tensors, median wall seconds and median CPU seconds of the process (steadier on a
shared machine), their ratios to the 10k-tensor model, and for scale the CPU seconds of
torch's own ``list(model.named_parameters())`` over the same model with the plan's multiple
of it (constant when the plan scales like torch's own walk).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import lightning_wd as lwd


class Block(nn.Module):
    """Linear + LayerNorm: two decayed-or-not tensors each."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)


class Stack(nn.Module):
    """``n_tensors // 4`` blocks in a ``ModuleList``."""

    def __init__(self, n_tensors: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n_tensors // 4))


def time_plan(n_tensors: int, repeat: int) -> tuple[float, float, float]:
    """Median wall and CPU seconds of ``DecayPlan.from_module`` over ``repeat`` runs (after one warm-up),
    and median CPU seconds of ``list(model.named_parameters())``."""
    model = Stack(n_tensors)
    rules = lwd.presets.standard(0.05)
    assert sum(1 for _ in model.parameters()) == n_tensors
    lwd.DecayPlan.from_module(model, rules)
    wall, cpu, walk = [], [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        lwd.DecayPlan.from_module(model, rules)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        start_cpu = time.process_time()
        list(model.named_parameters())
        walk.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), statistics.median(walk)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {n: time_plan(n, args.repeat) for n in args.sizes}
    ref = results.get(10_000)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, torch {torch.__version__}, lightning_wd {lwd.__version__}")
    print()
    print(
        "| tensors | wall s (median) | wall ratio to 10k | CPU s (median) | CPU ratio to 10k"
        " | named_parameters() CPU s | plan / named_parameters() |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, (wall, cpu, walk) in results.items():
        wall_ratio = f"{wall / ref[0]:.2f}" if ref else "n/a"
        cpu_ratio = f"{cpu / ref[1]:.2f}" if ref else "n/a"
        print(f"| {n:,} | {wall:.4f} | {wall_ratio} | {cpu:.4f} | {cpu_ratio} | {walk:.4f} | {cpu / walk:.1f} |")
    print()
    for line in target_lines(results):
        print(line)


def target_lines(results: dict[int, tuple[float, float, float]]) -> list[str]:
    """The plan-building targets with their figures, for the sizes that were run."""
    lines = []
    if 10_000 in results:
        cpu = results[10_000][1]
        verdict = "met" if cpu < 0.5 else "missed"
        lines.append(f"target: 10,000 tensors planned in under 0.5 s of CPU time: {cpu:.3f} s ({verdict})")
    if 10_000 in results and 100_000 in results:
        wall, cpu = (results[100_000][i] / results[10_000][i] for i in (0, 1))
        verdict = "met" if cpu <= 11 else "missed"
        lines.append(
            f"target: plan building linear, 100,000 / 10,000 tensors <= 11x: {cpu:.2f}x CPU time"
            f" ({wall:.2f}x wall) ({verdict})"
        )
    return lines


if __name__ == "__main__":
    main()
