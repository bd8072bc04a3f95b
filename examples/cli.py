"""LightningCLI with lightning_wd: rules, optimizer, scheduler and callback all from a YAML config.

Run from the repository root::

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs=2
    python examples/cli.py fit --print_config          # every option, with defaults

The model's ``__init__`` takes ``optimizer: OptimizerCallable``, ``scheduler:
LRSchedulerCallable | None`` and ``decay_rules: list[lwd.DecayRule] | None`` and stores them
as attributes; ``lwd.WDMixin.configure_optimizers`` reads those attributes, so nothing else
is needed. See ``examples/config.yaml`` for the rules (``class_path: lightning_wd.DecayRule``)
and the callback (``class_path: lightning_wd.WeightDecayCallback``).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from digits import DigitsData  # examples/ is on sys.path when this file is run as a script
from lightning.pytorch.cli import LightningCLI, LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.nn import functional as F

import lightning_wd as lwd

warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a torch deprecation inside Lightning 2.6


class ScaleNorm(nn.Module):
    """A custom normalization (not a torch class): ``g * x / ||x||``; the ``*Norm*`` rule still finds it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class DigitsMLP(lwd.WDMixin, L.LightningModule):
    """An MLP on the 8x8 digits with a LayerNorm and a custom ScaleNorm.

    Args:
        hidden: Width of the hidden layers.
        optimizer: Builds the optimizer from the parameter groups (from the config's ``optimizer``).
        scheduler: Builds the lr scheduler from the optimizer, or None.
        decay_rules: Decay rules in priority order; None means ``lwd.presets.standard()``.
    """

    def __init__(
        self,
        hidden: int = 128,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        decay_rules: list[lwd.DecayRule] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.decay_rules = decay_rules
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            ScaleNorm(hidden),
            nn.GELU(),
        )
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)


def main() -> None:
    """Run the LightningCLI (``fit``, ``validate``, ...)."""
    torch.set_num_threads(1)  # the model is tiny: on a CPU one thread is faster than several
    LightningCLI(DigitsMLP, DigitsData)


if __name__ == "__main__":
    main()
