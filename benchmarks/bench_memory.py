"""Extra memory the callback uses at the optimizer step, per mode, in copies of the decayed parameters.

Run from the repository root::

    python benchmarks/bench_memory.py                   # CPU
    python benchmarks/bench_memory.py --device cuda
    python benchmarks/bench_memory.py --quick           # smoke run

Two measurements:

1. **The engine's step alone** (the real snapshot before the optimizer's update and the decay
   after it, on one group of parameters with gradients, see ``_common.EngineHarness``):
   ``held`` is the size of the copy the engine keeps through the optimizer's update
   (``engine._snapshot``), ``kept`` the copies it keeps between steps to copy into at the next
   (``engine._spare``: a few large CPU tensors), ``peak`` the most memory the engine has at any
   moment between the snapshot and the end of the decay (allocated above what was allocated
   before, plus the copies it kept from the step before), and ``left`` what the step leaves
   allocated beyond what was there before it. On CPU, allocations are read from
   ``torch.profiler`` (``profile_memory=True``: every allocation and free, in order); on CUDA
   from ``torch.cuda.max_memory_allocated``. Sizes are given as multiples of the decayed
   parameters' bytes.
2. **Inside ``Trainer.fit``** (the GPT of ``bench_fit.py``): a probe callback placed after
   ``WeightDecayCallback`` reads the engine's snapshot just before the decay and after the
   step; on CUDA it also records the peak memory of the steps, against the same run without the
   callback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
from _common import EngineHarness, machine_info, make_params, split_sizes, table

import lightning_wd as lwd

MODES: dict[str, dict[str, Any]] = {
    "decoupled": {"mode": "decoupled"},
    "lr_ratio": {"mode": "lr_ratio"},
    "independent": {"mode": "independent"},
    "relative, source=params": {"mode": "relative"},
    "relative, source=grad": {"mode": "relative", "source": "grad"},
    "relative, source=update": {"mode": "relative", "source": "update"},
    "ord=1 (L1)": {"ord": 1},
    "cautious": {"cautious": True},
    "cautious, ord=1": {"cautious": True, "ord": 1},
    "cautious, fused=True": {"cautious": True, "fused": True},
    "decoupled + log_update_norm, logged step": {"log_update_norm": True, "logging": True},
}


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def _snapshot_bytes(engine: Any) -> int | None:
    if engine._snapshot is None:
        return None
    return sum(t.numel() * t.element_size() for bucket in engine._snapshot for chunk in bucket for t in chunk)


def _spare_bytes(engine: Any) -> int:
    spare = engine._spare or []
    return sum(t.numel() * t.element_size() for bucket in spare for chunk in bucket for t in chunk)


def _cpu_window(fn: Any) -> tuple[int, int]:
    """(peak, left): the most bytes allocated at once while ``fn`` runs, and what it leaves allocated."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak, current


def _cuda_window(fn: Any, device: torch.device) -> tuple[int, int]:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base


def step_alone(sizes: list[int], device: torch.device, dtype: torch.dtype) -> list[list[str]]:
    params = make_params(sizes, device, dtype, grads=True)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    rows = []
    for label, options in MODES.items():
        options = dict(options)
        logging_step = options.pop("logging", False)
        h = EngineHarness(params, weight_decay=0.1, lr=1e-3, logging=logging_step, **options)
        with torch.no_grad():
            h.step()  # warm-up (first-step checks), then the measured step
            held: list[int | None] = []
            kept_before = _spare_bytes(h.engine)

            def one_step(h: EngineHarness = h, held: list[int | None] = held) -> None:
                h.before_step()
                held.append(_snapshot_bytes(h.engine))
                h.after_step()

            if device.type == "cuda":
                peak, left = _cuda_window(one_step, device)
            else:
                peak, left = _cpu_window(one_step)
        copy = held[0]
        peak += kept_before
        rows.append(
            [
                f"{len(sizes)} tensors",
                label,
                "None" if copy is None else f"{copy / nbytes:.2f}",
                f"{_spare_bytes(h.engine) / nbytes:.2f}",
                f"{peak / nbytes:.2f}",
                _human(peak),
                f"{left / nbytes:.2f}",
            ]
        )
        del h
        gc.collect()
    return rows


class SnapshotProbe(L.Callback):
    """Reads the WeightDecayCallback's snapshot before and after each optimizer step (place it after that callback)."""

    def __init__(self, wd_callback: lwd.WeightDecayCallback, device: torch.device) -> None:
        self.cb = wd_callback
        self.device = device
        self.before: list[int | None] = []
        self.after: list[int | None] = []
        self.kept: list[int] = []
        self.decayed_bytes = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.cb.engines[0]
        decay = engine._decay

        def probed(saved: Any) -> None:  # the copy held through the optimizer's update, just before the decay
            self.decayed_bytes = sum(
                p.numel() * p.element_size() for b in engine._buckets if b.weight_decay > 0 for p in b.params
            )
            self.before.append(_snapshot_bytes(engine))
            decay(saved)

        engine._decay = probed  # type: ignore[method-assign]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.after.append(_snapshot_bytes(self.cb.engines[0]))
        self.kept.append(_spare_bytes(self.cb.engines[0]))


def in_fit(device: torch.device, quick: bool) -> list[list[str]]:
    from bench_fit import GPT, DropLogger

    cfg = (
        {"vocab": 64, "d": 32, "layers": 2, "heads": 4, "seq": 16}
        if quick
        else (
            {"vocab": 8192, "d": 512, "layers": 8, "heads": 8, "seq": 256}
            if device.type == "cuda"
            else {"vocab": 512, "d": 128, "layers": 4, "heads": 4, "seq": 64}
        )
    )
    steps = 3
    data = torch.randint(0, cfg["vocab"], (steps * 8, cfg["seq"] + 1), generator=torch.Generator().manual_seed(0))
    rows = []
    base_peak = None
    modes = {k: MODES[k] for k in ("decoupled", "cautious")} if quick else MODES  # the smoke run: a few modes
    for label, options in [("no callback (AdamW's own decay)", None), *modes.items()]:
        options = dict(options) if options is not None else None
        logging_step = options.pop("logging", False) if options is not None else False
        callbacks: list[L.Callback] = []
        probe = None
        if options is not None:
            cb = lwd.WeightDecayCallback(**options)
            probe = SnapshotProbe(cb, device)
            callbacks = [cb, probe]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model = GPT(**cfg)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            logger=DropLogger(),
            log_every_n_steps=1 if logging_step else 50,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8))
        # Peak of the whole run (model, gradients, AdamW state, activations), above what was allocated before it.
        peak = torch.cuda.max_memory_allocated(device) - start if device.type == "cuda" else None
        del trainer, model
        if base_peak is None:
            base_peak = peak
        if probe is None:
            continue
        held = probe.before[-1]
        row = [
            label,
            "None" if held is None else f"{held / probe.decayed_bytes:.2f}",
            str(all(a is None for a in probe.after)),
            f"{probe.kept[-1] / probe.decayed_bytes:.2f}",
        ]
        if device.type == "cuda":
            assert peak is not None and base_peak is not None
            row.append(f"{(peak - base_peak) / probe.decayed_bytes:+.2f}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--total-elements", type=int, default=None, help="default: 4M on CPU, 64M on CUDA")
    parser.add_argument("--small", type=int, default=1000, help="number of tensors in the small-tensor layout")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256k elements, a tiny model")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_wd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    total = args.total_elements or (64 * 2**20 if device.type == "cuda" else 4 * 2**20)
    small = args.small
    if args.quick:
        total, small = min(total, 2**18), min(small, 100)

    print(f"# bench_memory: {total:,} {args.dtype} elements on {device}")
    print(machine_info(device))
    print()
    print("## The callback's step alone (multiples of the decayed parameters' bytes)")
    print()
    rows = step_alone(split_sizes(total, 4), device, dtype)
    rows += step_alone(split_sizes(total, small), device, dtype)
    headers = ["tensors", "mode", "held across the optimizer step", "kept between steps", "peak", "peak bytes"]
    print(table([*headers, "left after"], rows))
    print()
    print("## Inside Trainer.fit (snapshot read by a probe callback)")
    print()
    headers = [
        "mode",
        "snapshot held through the update (x decayed bytes)",
        "freed after the step",
        "kept between steps",
    ]
    if device.type == "cuda":
        headers.append("peak vs no callback (x decayed bytes)")
    print(table(headers, in_fit(device, args.quick)))


if __name__ == "__main__":
    main()
