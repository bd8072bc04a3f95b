"""Weight averaging (Lightning's StochasticWeightAveraging and EMAWeightAveraging) with the decay.

The decay acts on the live weights, once per real optimizer step; the averaged copy is never in the
optimizer and is never decayed. SWA's batch-norm update epoch runs no backward and steps the optimizer
once on the last real step's gradients: that step is not a training step, so it is not decayed.

The check is per step, against the documented formula with plain SGD (no momentum): a decayed
weight goes from p to (p - lr * g) * (1 - lr * λ), any other parameter to p - lr * g, and in the
batch-norm update epoch every parameter goes to p - lr * g.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_wd as lwd
from tests.callback_helpers import trainer

LR, WD = 0.05, 0.4


def data() -> DataLoader:
    g = torch.Generator().manual_seed(5)
    return DataLoader(TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)), batch_size=4)


class Net(lwd.WDMixin, L.LightningModule):
    decay_rules = lwd.presets.standard(weight_decay=WD)
    show_decay_plan = False

    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.optimizer = partial(torch.optim.SGD, lr=LR)
        norm = nn.BatchNorm1d(4) if batch_norm else nn.LayerNorm(4)
        self.net = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.net(x) - y).pow(2).mean()


class Steps(Callback):
    """Each optimizer step's parameters, gradients and lr before it, and the parameters after it."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._pending = {
            "epoch": trainer.current_epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "before": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "grad": {
                n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for n, p in pl_module.named_parameters()
            },
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._pending is not None:
            self._pending["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.steps.append(self._pending)
            self._pending = None


DECAYED = {"net.0.weight", "net.3.weight"}


def expected_after(step: dict[str, Any], decayed: bool) -> dict[str, torch.Tensor]:
    lr = step["lr"]
    out = {}
    for name, before in step["before"].items():
        value = before - lr * step["grad"][name]
        if decayed and name in DECAYED:
            value = value * (1 - lr * WD)
        out[name] = value
    return out


def fit(model: L.LightningModule, root: Path, callbacks: list[Callback], epochs: int) -> L.Trainer:
    t = trainer(root, callbacks, max_epochs=epochs)
    t.fit(model, data())
    return t


def test_swa_batch_norm_update_epoch_is_not_decayed_and_real_steps_are_decayed_once(tmp_path: Path) -> None:
    steps, decay = Steps(), lwd.WeightDecayCallback()
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1, annealing_epochs=1)
    fit(Net(batch_norm=True), tmp_path, [swa, decay, steps], epochs=2)
    real = [s for s in steps.steps if s["epoch"] < 2]
    bn_update = [s for s in steps.steps if s["epoch"] == 2]
    assert len(real) == 8 and len(bn_update) == 1  # Lightning steps once in the batch-norm epoch
    assert decay.engines[0].steps == 8
    for step in real:
        for name, value in expected_after(step, decayed=True).items():
            torch.testing.assert_close(step["after"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    (step,) = bn_update
    assert any(g.abs().sum() > 0 for g in step["grad"].values())  # stale gradients: the step does move weights
    for name, value in expected_after(step, decayed=False).items():
        torch.testing.assert_close(step["after"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_ema_averages_the_decayed_live_weights_and_the_average_is_not_decayed(tmp_path: Path) -> None:
    ema_module = pytest.importorskip("lightning.pytorch.callbacks")
    averaging = getattr(ema_module, "EMAWeightAveraging", None)
    if averaging is None:
        pytest.skip("this Lightning has no EMAWeightAveraging")
    steps, decay = Steps(), lwd.WeightDecayCallback()
    model = Net(batch_norm=False)
    fit(model, tmp_path, [averaging(decay=0.5), decay, steps], epochs=2)
    assert len(steps.steps) == 8 and decay.engines[0].steps == 8
    ema: dict[str, torch.Tensor] | None = None
    for step in steps.steps:
        after = expected_after(step, decayed=True)
        for name, value in after.items():
            torch.testing.assert_close(step["after"][name], value, rtol=1e-5, atol=1e-7, msg=name)
        # torch's EMA: the first update copies, then ema + (1 - decay) * (p - ema)
        live = step["after"]
        ema = dict(live) if ema is None else {n: ema[n] + 0.5 * (live[n] - ema[n]) for n in live}
    assert ema is not None
    for name, p in model.named_parameters():  # the average is copied into the model at the end of the fit
        torch.testing.assert_close(p.detach(), ema[name], rtol=1e-5, atol=1e-7, msg=name)
