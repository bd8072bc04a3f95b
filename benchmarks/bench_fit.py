"""End-to-end ``Trainer.fit`` step time of a small GPT-like model, with and without the callback.

Run from the repository root::

    python benchmarks/bench_fit.py                    # CPU: 4 layers, d=128, vocab 512, seq 64, batch 16
    python benchmarks/bench_fit.py --device cuda      # 8 layers, d=512, vocab 8192, seq 256, batch 32
    python benchmarks/bench_fit.py --quick            # smoke run

Configurations (same model, data and seed; the model uses ``WDMixin`` with
``presets.standard(weight_decay=0.1)`` and AdamW):

* **A**: no callback; AdamW applies its own decay to the decayed group (``weight_decay=0.1``).
* **B**: ``WeightDecayCallback(mode="decoupled")`` with the default ``log_every_n_steps=50``
  (AdamW sees ``weight_decay=0`` during its step only; the callback's engine decays after it).
* **C**: as B, but ``log_every_n_steps=1``: the callback measures and logs every step.

The model logs nothing itself and the logger drops what it receives, so C isolates the
callback's logging cost. A timing callback records ``time.perf_counter()`` at every
``on_train_batch_start`` (after a CUDA synchronize on GPU); a step is the time from one batch
start to the next, after ``--warmup`` steps. Runs are interleaved (A, B, C in a rotating order,
``--rounds`` times); the table shows the median over rounds of each run's median step time,
the median over rounds of the ratio to A in the same round, and the time spent inside the
callback's own hooks per step, averaged over the timed steps (measured directly, so it hardly
depends on the machine's noise; on CUDA it is the host time of the hooks, whose device time
shows in the step time).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
from _common import machine_info, table
from lightning.pytorch.loggers import Logger

import lightning_wd as lwd


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class GPT(lwd.WDMixin, L.LightningModule):
    """A small GPT: token and position embeddings, ``layers`` blocks, a final norm and an untied head."""

    decay_rules = lwd.presets.standard(weight_decay=0.1)
    show_decay_plan = False

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.optimizer = partial(torch.optim.AdamW, lr=3e-4)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        x = self.tok(tokens[:, :-1]) + self.pos[: tokens.shape[1] - 1]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


class DropLogger(Logger):
    """A logger that counts ``log_metrics`` calls and drops the values."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @property
    def name(self) -> str:
        return "drop"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1


class StepTimer(L.Callback):
    """``time.perf_counter()`` at every ``on_train_batch_start``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())


def _time_hooks(cb: lwd.WeightDecayCallback, device: torch.device) -> list[float]:
    """Time the callback's per-step work; returns the list of per-step totals it fills.

    A step starts at the callback's ``on_train_batch_start``; its ``on_train_batch_end`` and the
    engine's own work inside each optimizer step (following the optimizer's groups, the snapshot,
    the decay) are added to it. The optimizer's update, which the engine wraps, is not counted.
    """
    spent: list[float] = []

    def timed(fn: Any, *, new_step: bool = False) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # No synchronize here: it would stall B and C where A runs on. On CUDA this is the host
            # time of the hooks (launches, Python); their device time shows in the step time.
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            elapsed = time.perf_counter() - start
            if new_step or not spent:
                spent.append(elapsed)
            else:
                spent[-1] += elapsed
            return out

        return wrapper

    attach = cb.on_train_start

    def on_train_start(trainer: Any, pl_module: Any) -> None:
        attach(trainer, pl_module)
        for engine in cb.engines:
            for name in ("_refresh", "_take_snapshot", "_decay"):
                setattr(engine, name, timed(getattr(engine, name)))

    cb.on_train_start = on_train_start  # type: ignore[method-assign]
    cb.on_train_batch_start = timed(cb.on_train_batch_start, new_step=True)  # type: ignore[method-assign]
    cb.on_train_batch_end = timed(cb.on_train_batch_end)  # type: ignore[method-assign]
    return spent


def run(config: str, args: argparse.Namespace, data: torch.Tensor, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(args.vocab, args.d, args.layers, args.heads, args.seq)
    timer = StepTimer(device)
    callbacks: list[L.Callback] = [timer]
    spent: list[float] = []
    if config != "A":
        cb = lwd.WeightDecayCallback(mode="decoupled")
        spent = _time_hooks(cb, device)
        callbacks.append(cb)
    logger = DropLogger()
    steps = args.warmup + args.steps
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=steps + 1,
        precision=args.precision,
        logger=logger,
        log_every_n_steps=1 if config == "C" else 50,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=args.batch, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    gaps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)][args.warmup :]
    per_step = spent[args.warmup : steps]
    # The mean, not the median: it spreads the logged steps' cost over the steps in between.
    hooks = statistics.fmean(per_step) if per_step else 0.0
    return {"step": statistics.median(gaps), "hooks": hooks, "log_calls": logger.calls}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--d", type=int, default=None)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--steps", type=int, default=50, help="timed steps per run (>= 40 includes the logged step 49 in B)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved A/B/C rounds")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, 1 round of 5 steps")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_wd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cuda = device.type == "cuda"
    defaults = (
        {"layers": 8, "d": 512, "vocab": 8192, "seq": 256, "batch": 32}
        if cuda
        else {"layers": 4, "d": 128, "vocab": 512, "seq": 64, "batch": 16}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.layers, args.d, args.vocab, args.seq, args.batch = 2, 32, 64, 16, 4
        args.warmup, args.steps, args.rounds = 2, 5, 1

    n_batches = args.warmup + args.steps + 2
    data = torch.randint(
        0, args.vocab, (n_batches * args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    n_params = sum(p.numel() for p in GPT(args.vocab, args.d, args.layers, args.heads, args.seq).parameters())
    print(
        f"# bench_fit: GPT {args.layers} layers, d={args.d}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}"
        f" ({n_params / 1e6:.2f}M parameters), {args.precision} on {device}; {args.rounds} rounds of"
        f" {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(machine_info(device))
    print()

    configs = ["A", "B", "C"]
    results: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    run("B", args, data, device)  # untimed: the process's first fit pays one-time start-up costs
    for r in range(args.rounds):
        order = configs[r % 3 :] + configs[: r % 3]
        for config in order:
            results[config].append(run(config, args, data, device))

    labels = {
        "A": "A: AdamW's own decay, no callback",
        "B": "B: callback (decoupled), log every 50 steps",
        "C": "C: callback (decoupled), log every step",
    }
    rows = []
    base = statistics.median(x["step"] for x in results["A"])
    for c in configs:
        step = statistics.median(x["step"] for x in results[c])
        rel = statistics.median(x["step"] / a["step"] for x, a in zip(results[c], results["A"], strict=True))
        hooks = statistics.median(x["hooks"] for x in results[c])
        rows.append(
            [
                labels[c],
                f"{step * 1e3:.2f}",
                f"{rel:.3f}",
                f"{hooks * 1e3:.3f}" if c != "A" else "-",
                f"{100 * hooks / base:.2f}%" if c != "A" else "-",
                " ".join(f"{x['step'] * 1e3:.1f}" for x in results[c]),
            ]
        )
    print(
        table(
            [
                "configuration",
                "median step ms",
                "x A (same round)",
                "callback hooks ms/step",
                "hooks / A step",
                "per-round medians ms",
            ],
            rows,
        )
    )
    b_hooks = statistics.median(x["hooks"] for x in results["B"])
    b_rel = statistics.median(x["step"] / a["step"] for x, a in zip(results["B"], results["A"], strict=True))
    share = 100 * b_hooks / base
    print()
    print(
        f"target: the callback's and the engine's time, default logging, <= 3% of the step (CPU): {share:.2f}%"
        f" ({'met' if share <= 3 else 'missed'})"
    )
    print(
        f"target: end to end, default logging, <= 1% over AdamW's own decay (GPU): {100 * (b_rel - 1):+.2f}%"
        f" (median of per-round ratios; {'met' if b_rel <= 1.01 else 'missed'}"
        f"{'' if device.type == 'cuda' else ', measured on ' + device.type + ', where rounds differ by more than 1%'})"
    )


if __name__ == "__main__":
    main()
