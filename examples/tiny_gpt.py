"""A tiny GPT learns to reverse sequences; compare the `standard` and `gpt` decay presets on it.

Run from the repository root (about 20 s on a laptop CPU)::

    python examples/tiny_gpt.py
    python examples/tiny_gpt.py --preset gpt --steps 800

The model has what trips up the usual grouping heuristics:

* a token embedding **tied** to the output head (one tensor, reachable as
  ``tok_emb.weight`` and ``head.weight``);
* a custom ``RMSNorm`` class that does not subclass any torch normalization layer;
* a free-standing learned position table ``pos_emb`` (an ``nn.Parameter``, 2-D);
* attention and MLP projections without biases, and biases on the final projection.

The script prints the plans of ``lwd.presets.standard`` and ``lwd.presets.gpt`` side by side,
lists the parameters on which they disagree and why, then trains with one of them (``--preset``)
on a synthetic task shipped here: given ``n`` random digits and a separator, emit them reversed.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

import lightning_wd as lwd

warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a torch deprecation inside Lightning 2.6

DIGITS = 10
SEP = DIGITS  # token id of the separator
VOCAB = DIGITS + 1


class RMSNorm(nn.Module):
    """Root-mean-square normalization with a learned gain (written here, not torch's ``nn.RMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, projections without bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Token embedding tied to the head, learned position table, custom RMSNorm."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 32) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=True)
        self.head.weight = self.tok_emb.weight  # weight tying: one tensor, two names

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class ReverseTask(IterableDataset):
    """Endless batches of ``d1 .. dn SEP dn .. d1``; the loss is on the reversed half only."""

    def __init__(self, length: int, batch_size: int, seed: int) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed

    def __iter__(self) -> Any:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield make_batch(self.length, self.batch_size, gen)


def make_batch(length: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for next-token prediction; targets are -100 (ignored) before the separator."""
    digits = torch.randint(0, DIGITS, (batch_size, length), generator=gen)
    seq = torch.cat([digits, torch.full((batch_size, 1), SEP), digits.flip(1)], dim=1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, : length - 1] = -100  # only predict what follows the separator
    y[:, length - 1] = -100
    return x, y


class LitGPT(lwd.WDMixin, L.LightningModule):
    """The tiny GPT trained with AdamW; its decay groups come from the chosen preset."""

    def __init__(self, preset: str = "standard", weight_decay: float = 0.1, lr: float = 1e-2, steps: int = 600) -> None:
        super().__init__()
        self.model = TinyGPT()
        self.decay_rules = getattr(lwd.presets, preset)(weight_decay)
        self.optimizer = partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.98))
        self.scheduler = {
            # warm up over 10 % of the run (at least 3 steps, which OneCycleLR needs on very short runs)
            "scheduler": partial(
                torch.optim.lr_scheduler.OneCycleLR, max_lr=lr, total_steps=steps, pct_start=max(0.1, 3 / steps)
            ),
            "interval": "step",
        }
        self.show_decay_plan = False  # printed by main() instead, side by side with the other preset

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("loss", loss, prog_bar=True)
        return loss


def side_by_side(model: nn.Module, weight_decay: float) -> str:
    """Both presets' decisions per parameter, then the disagreements with the reason."""
    plans = {
        "standard": lwd.DecayPlan.from_module(model, lwd.presets.standard(weight_decay)),
        "gpt": lwd.DecayPlan.from_module(model, lwd.presets.gpt(weight_decay)),
    }
    std, gpt = ({e.name: e for e in plan.entries} for plan in plans.values())
    wd = {name: {g.name: g.weight_decay for g in plan.groups} for name, plan in plans.items()}

    def cell(entry: Any, preset: str) -> str:
        decay = wd[preset][entry.group]
        return f"{'decay' if decay else 'no decay'} ({entry.rule or 'default'})"

    width = max(len(n) for n in std)
    lines = [
        f"{'parameter':<{width}}  {'shape':<10} {'owner':<16} {'standard preset (rule)':<26} {'gpt preset (rule)':<22}",
        f"{'-' * width}  {'-' * 10} {'-' * 16} {'-' * 26} {'-' * 22}",
    ]
    differ = []
    for name, entry in std.items():
        a, b = cell(entry, "standard"), cell(gpt[name], "gpt")
        mark = "  <- differs" if a.split(" (")[0] != b.split(" (")[0] else ""
        if mark:
            differ.append(name)
        shape = "x".join(map(str, entry.shape))
        owner = "/".join(dict.fromkeys(entry.owners))
        lines.append(f"{name:<{width}}  {shape:<10} {owner:<16} {a:<26} {b:<22}{mark}".rstrip())
    lines.append("")
    lines.append(f"They disagree on {len(differ)} of {len(std)} tensors:")
    for name in differ:
        entry = std[name]
        if entry.rule == "embedding":
            aliases = " and ".join(entry.aliases)
            tied = f" (tied: reachable as {aliases})" if len(entry.aliases) > 1 else ""
            why = (
                f"an embedding table{tied}. standard never decays embeddings, even when the output head shares"
                f" them; gpt decays every tensor with ndim >= 2, so the head's weight is decayed too."
            )
        elif entry.rule is None:
            why = (
                "a free-standing tensor that is not the weight of a linear map (a position table): standard"
                " leaves it in the default no-decay group; gpt decays it because it is 2-D."
            )
        else:
            why = f"standard rule {entry.rule!r}, gpt rule {gpt[name].rule!r}."
        lines.append(f"  - {name}: {why}")
    lines.append(
        "They agree on the rest: Linear weights are decayed by both (ndim 2, linear maps); RMSNorm gains and"
        " biases are 1-D, so neither decays them (standard recognises the custom RMSNorm by its class name)."
    )
    return "\n".join(lines)


@torch.no_grad()
def exact_match(model: nn.Module, length: int, n: int = 512, seed: int = 1234) -> float:
    """Fraction of fresh sequences reversed without a single wrong digit (greedy, teacher-forced prefix)."""
    model.eval()
    x, y = make_batch(length, n, torch.Generator().manual_seed(seed))
    pred = model(x).argmax(-1)
    mask = y != -100
    correct = ((pred == y) | ~mask).all(dim=1)
    model.train()
    return float(correct.float().mean())


def main(argv: list[str] | None = None) -> float:
    """Compare the presets, train, and return the exact-match accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    parser.add_argument("--length", type=int, default=8, help="digits per sequence (default: 8)")
    parser.add_argument("--preset", choices=["standard", "gpt"], default="standard", help="preset to train with")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="λ of the decayed group (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # The model is tiny: on a CPU one thread is faster than several (no synchronisation between them).
    torch.set_num_threads(1)
    start = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    module = LitGPT(args.preset, args.weight_decay, steps=args.steps)
    print(f"Decay plans of the two presets on TinyGPT (weight_decay={args.weight_decay}):\n")
    print(side_by_side(module.model, args.weight_decay))
    print(f"\nTraining {args.steps} steps with the {args.preset!r} preset ...")

    data = DataLoader(ReverseTask(args.length, batch_size=64, seed=args.seed), batch_size=None)
    trainer = L.Trainer(
        max_steps=args.steps,
        callbacks=[lwd.WeightDecayCallback(mode="decoupled")],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    report_every = max(args.steps // 5, 1)

    class Report(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            step = trainer.global_step
            if step % report_every == 0 or step == args.steps:
                acc = exact_match(pl_module.model, args.length)
                print(f"step {step:>5}  loss {float(outputs['loss']):.3f}  exact-match {acc:.1%}", flush=True)

    trainer.callbacks.append(Report())
    trainer.fit(module, data)
    accuracy = exact_match(module.model, args.length, n=2048, seed=99)
    print(
        f"\nreversal exact-match on 2,048 fresh sequences: {accuracy:.1%}"
        f" ({args.preset} preset, {args.steps} steps, {time.perf_counter() - start:.0f} s)"
    )
    print(f"chance per sequence: {0.1**args.length:.0e}; per digit: {1 / DIGITS:.0%} (log-loss {math.log(10):.2f})")
    return accuracy


if __name__ == "__main__":
    main()
