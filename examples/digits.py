"""Train a small CNN on scikit-learn's handwritten digits with lightning_wd, and plot its weight decay.

Run from the repository root (about 15 s on a laptop CPU, no download)::

    python examples/digits.py
    python examples/digits.py --epochs 30 --out outputs/digits --seed 1

What it shows:

* ``lwd.WDMixin`` builds the optimizer groups from the ``standard`` preset and prints the
  plan at fit start: conv and linear weights are decayed; biases and BatchNorm parameters
  are not.
* ``lwd.WeightDecayCallback(mode="decoupled")`` applies ``p <- p * (1 - lr * wd)`` after
  every optimizer step (the optimizer's own ``weight_decay`` is set to 0, so nothing is
  decayed twice) and logs ``wd/<group>/param_norm``, ``weight_decay`` and ``timescale``.
* The CSV logs are turned into a PNG with the same code as ``lightning-wd plot``.

Why λ = 0.5 and not the usual 0.05: what matters is the decay's timescale ``1/(lr * λ)``
compared with the run length. Values like 0.05 are tuned for runs of 10^5 steps; on this
400-step run (lr 3e-3) they give a timescale of 6,700 steps and more, so the decay would
barely act (try ``--weight-decay 0.05`` and compare the plots and the printed summary).

The data are the 1,797 8x8 images of ``sklearn.datasets.load_digits`` (bundled with
scikit-learn), split 70/10/20 into train/validation/test with ``--seed``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_wd as lwd
from lightning_wd._plotting import plot_metrics, read_logs, summarize

# Lightning 2.6 on torch 2.13 warns about a torch deprecation inside Lightning itself; not ours to fix.
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class DigitsData(L.LightningDataModule):
    """scikit-learn's 8x8 digits as tensors, split deterministically by ``seed``.

    Args:
        batch_size: Training batch size.
        seed: Seed of the train/validation/test permutation.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # pixels are 0..16
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val = int(0.7 * len(x)), int(0.1 * len(x))
        parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in parts)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (no bias: BatchNorm has one) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitsCNN(lwd.WDMixin, L.LightningModule):
    """A small CNN with BatchNorm; its optimizer groups come from ``decay_rules``.

    Args:
        lr: Peak learning rate of AdamW (cosine-annealed over the run).
        weight_decay: λ of the decayed group (conv and linear weights).
    """

    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        # What WDMixin reads: the rules, the optimizer factory and the scheduler factory.
        self.decay_rules = lwd.presets.standard(weight_decay=weight_decay)
        self.optimizer = partial(torch.optim.AdamW, lr=lr)
        self.scheduler = {
            "scheduler": lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=self.trainer.estimated_stepping_batches, eta_min=lr / 20
            ),
            "interval": "step",
        }
        self.features = nn.Sequential(
            conv_bn(1, 32), conv_bn(32, 32), nn.MaxPool2d(2), conv_bn(32, 64), conv_bn(64, 64), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")


class EpochLine(L.Callback):
    """Print one line per epoch: losses, validation accuracy and the decayed group's parameter norm."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        decayed = [p for g in trainer.optimizers[0].param_groups if g["name"] == "decay" for p in g["params"]]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in decayed]))
        print(
            f"epoch {trainer.current_epoch + 1:>3}/{trainer.max_epochs}  step {trainer.global_step:>4}"
            f"  train_loss {float(m.get('train_loss', float('nan'))):.3f}  val_loss {float(m['val_loss']):.3f}"
            f"  val_acc {float(m['val_acc']):.1%}  lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}"
            f"  |decayed weights| {float(norm):.2f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> float:
    """Train, test, plot; return the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    parser.add_argument("--out", default="outputs/digits", help="output directory (default: outputs/digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the model (default: 0)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.5, help="λ of the decayed group (default: 0.5)")
    args = parser.parse_args(argv)

    # The model is tiny: on a CPU one thread is faster than several (no synchronisation between them).
    torch.set_num_threads(1)
    start = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    out = Path(args.out)
    logger = CSVLogger(save_dir=out, name="logs")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[lwd.WeightDecayCallback(mode="decoupled"), EpochLine()],
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    data = DigitsData(seed=args.seed)
    model = DigitsCNN(lr=args.lr, weight_decay=args.weight_decay)
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    accuracy = result["test_acc"]
    elapsed = time.perf_counter() - start

    series, source = read_logs(logger.log_dir)
    png = plot_metrics(
        series,
        out / "weight_decay.png",
        title=f"digits CNN, standard preset (λ={args.weight_decay}), decoupled decay, cosine lr",
    )
    print()
    print("Weight decay over the run (from the logs):")
    print(summarize(series))
    print()
    print(f"test accuracy: {accuracy:.1%} on {len(data.test_set)} held-out images ({elapsed:.0f} s to train and test)")
    print(f"plot: {png}")
    print(f"logs: {source}")
    print(f"      re-plot with: lightning-wd plot {logger.log_dir} -o {png}")
    return accuracy


if __name__ == "__main__":
    main()
