"""Models, data and an independent reference for the callback tests.

The reference re-derives every decay step from the documented formulas with plain
per-tensor loops (``reference_decay``), never through ``lightning_wd.functional``.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_wd as lwd

LR = 0.1
WD = 0.3


def trainer(root: Path, callbacks: list, **kw: Any) -> L.Trainer:
    """A quiet single-process CPU trainer (no logger, checkpoints or progress bar unless given in ``kw``)."""
    options: dict[str, Any] = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=root,
    )
    options.update(kw)
    return L.Trainer(callbacks=callbacks, **options)


def make_data(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 40, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


class Net(nn.Module):
    """Linear -> LayerNorm -> Linear; standard preset: the two weights decay, LN and biases do not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


DECAYED = {"net.fc1.weight", "net.fc2.weight"}


def constant_lr(step: int) -> float:
    return 1.0


def decaying_lr(step: int) -> float:
    return 1.0 / (1.0 + 0.5 * step)


class WDNet(lwd.WDMixin, L.LightningModule):
    """The mixin's module: SGD (no momentum) by default, so the optimizer update is just ``-lr * grad``."""

    show_decay_plan = False

    def __init__(
        self,
        optimizer: Any = None,
        scheduler: Any = None,
        decay_rules: Any = None,
        seed: int = 0,
        nan_at: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = Net()
        self.optimizer = optimizer if optimizer is not None else partial(torch.optim.SGD, lr=LR)
        self.scheduler = scheduler
        self.decay_rules = decay_rules if decay_rules is not None else lwd.presets.standard(WD)
        self.nan_at = nan_at

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.global_step in self.nan_at:
            loss = loss * float("inf")
        return loss


class PlainNet(L.LightningModule):
    """A module with a plain optimizer (no WDMixin): the callback needs ``rules=``."""

    def __init__(self, weight_decay: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = Net()
        self.weight_decay = weight_decay

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR, weight_decay=self.weight_decay)


class TwoOptNet(L.LightningModule):
    """Manual optimization with two optimizers over two halves of the model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = Net()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss = nn.functional.mse_loss(self.net(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        if batch_idx % 2 == 0:
            opt_b.step()

    def configure_optimizers(self) -> Any:
        a = torch.optim.SGD(list(self.net.fc1.parameters()) + list(self.net.norm.parameters()), lr=LR)
        b = torch.optim.SGD(self.net.fc2.parameters(), lr=LR / 2)
        return a, b


def reference_decay(
    params: dict[str, Tensor],
    before: dict[str, Tensor],
    grads: dict[str, Tensor | None],
    wds: dict[str, float],
    lr: dict[str, float],
    lr0: dict[str, float],
    *,
    mode: str,
    ord: int = 2,
    cautious: bool = False,
    source: str = "params",
    metric: str = "mean_abs",
    groups: dict[str, str] | None = None,
) -> dict[str, Tensor]:
    """One decay step written straight from DESIGN.md, tensor by tensor, on copies.

    ``params`` are the values after the optimizer step (before decay), ``before`` the values
    before it. Tensors without a gradient are not decayed. ``groups`` maps names to the group
    over which ``relative`` measures ``m`` (default: one group per decay value).
    """
    out = {k: v.clone() for k, v in params.items()}
    groups = groups or {k: str(wds[k]) for k in params}
    measure: dict[str, float] = {}
    if mode == "relative":
        for g in set(groups.values()):
            vals = []
            for k in params:
                if groups[k] != g or grads[k] is None:
                    continue
                s = {"grad": grads[k], "params": params[k], "update": params[k] - before[k]}[source]
                vals.append(s.double().flatten())
            if vals:
                allv = torch.cat(vals)
                measure[g] = float(allv.abs().mean()) if metric == "mean_abs" else float(allv.pow(2).mean().sqrt())
    for k, p in params.items():
        wd = wds[k]
        if wd == 0 or grads[k] is None:
            continue
        if mode == "decoupled":
            step = lr[k] * wd
        elif mode == "lr_ratio":
            step = wd * lr[k] / lr0[k]
        elif mode == "independent":
            step = wd
        else:
            step = lr[k] * wd * measure[groups[k]]
        decayed = torch.empty_like(p)
        flat_p, flat_d, flat_b = p.flatten(), decayed.view(-1), before[k].flatten()
        for i in range(flat_p.numel()):
            x = float(flat_p[i])
            if cautious and not ((x - float(flat_b[i])) * float(flat_b[i]) < 0):
                flat_d[i] = x
                continue
            if ord == 2:
                flat_d[i] = x * (1 - step)
            else:
                flat_d[i] = math.copysign(max(abs(x) - step, 0.0), x) if x != 0 else 0.0
        out[k] = decayed
    return out


class StepRecorder(Callback):
    """Checks every optimizer step against :func:`reference_decay`, for SGD without momentum.

    It records the parameters and lr just before each real optimizer step, and at batch end
    recomputes the expected parameters from the gradients that step used (clipped, unscaled).
    Batches without a step must leave the parameters unchanged.
    """

    def __init__(self, wds: dict[str, float], schedule: Any = None, skipped: tuple[int, ...] = (), **kw: Any):
        self.wds = wds
        self.schedule = schedule
        kw.pop("fused", None)  # how the decay is computed, not what it is
        self.kw = kw
        self.skipped = skipped
        self.pending: list[tuple[torch.optim.Optimizer, dict[str, Tensor], dict[str, float]]] = []
        self.last: dict[str, Tensor] = {}
        self.steps: dict[int, int] = {}
        self.lr0: dict[str, float] = {}
        self.checked = 0
        self.attempts = 0

    def _names(self, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        return {id(p): names[id(p)] for g in optimizer.param_groups for p in g["params"]}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.last = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        names = self._names(pl_module, optimizer)
        before = {names[id(p)]: p.detach().clone() for g in optimizer.param_groups for p in g["params"]}
        lrs = {names[id(p)]: float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        for k, v in lrs.items():
            self.lr0.setdefault(k, v)
        self.pending.append((optimizer, before, lrs))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        current = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        if not self.pending:
            for n in current:
                assert torch.equal(current[n], self.last[n]), f"{n} changed on a batch without an optimizer step"
        expected = dict(self.last)
        for optimizer, before, lrs in self.pending:
            t = self.steps.get(id(optimizer), 0)
            self.attempts += 1
            names = self._names(pl_module, optimizer)
            params = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
            grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in params.items()}
            if self.attempts - 1 in self.skipped:
                for n in params:
                    expected[n] = before[n]
                continue
            stepped = {n: before[n] - lrs[n] * grads[n] if grads[n] is not None else before[n] for n in params}
            mult = 1.0 if self.schedule is None else self.schedule(t)
            wds = {n: self.wds.get(n, 0.0) * mult for n in params}
            decayed = reference_decay(stepped, before, grads, wds, lrs, {n: self.lr0[n] for n in params}, **self.kw)
            expected.update(decayed)
            self.steps[id(optimizer)] = t + 1
            self.checked += 1
        for n in current:
            torch.testing.assert_close(current[n], expected[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        self.pending = []
        self.last = current


class InterleavedData(L.LightningDataModule):
    """Each rank takes every ``world_size``-th sample in order, so global batch k of a DDP run is
    exactly batch k of a single-process run with ``world_size`` times the batch size."""

    def __init__(self, n: int = 40, batch_size: int = 4) -> None:
        super().__init__()
        self.n = n
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        from torch.utils.data.distributed import DistributedSampler

        data = make_data(self.n)
        sampler = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class CleanDistributedExit(Callback):
    """Destroy the process group at the end of fit, in every process, after a barrier.

    Lightning leaves a gloo process group alive until the interpreter exits, where its worker
    threads are sometimes torn down mid-flight ("terminate called without an active exception",
    SIGABRT). Put it last in ``callbacks``, for every multi-process test run.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
