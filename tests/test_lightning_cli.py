"""LightningCLI with WDMixin: a preset with its λ as one config entry, rules composed around it,
LightningCLI's own ``--optimizer`` / ``--lr_scheduler``, and the optimizer-default warning.

Each test runs a real ``LightningCLI`` over a real parser (``args=`` in place of the command line).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI, LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

import lightning_wd as lwd

TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 4, generator=g)), batch_size=4)


class Model(lwd.WDMixin, L.LightningModule):
    """The documented pattern: optimizer, scheduler and rules are init arguments."""

    show_decay_plan = False

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        decay_rules: lwd.presets.Preset | list[lwd.DecayRule] | None = None,
    ) -> None:
        super().__init__(decay_rules=decay_rules)
        self.optimizer = optimizer
        self.scheduler = scheduler
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
        self.head = torch.nn.Linear(6, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.head(self.body(batch[0])).pow(2).mean()


class Bare(lwd.WDMixin, L.LightningModule):
    """No optimizer argument: LightningCLI's ``--optimizer`` is the way to choose one."""

    decay_rules = [lwd.DecayRule("head", 0.02, params="head.weight", lr_scale=0.5), *lwd.presets.standard(0.1)]
    show_decay_plan = False

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
        self.head = torch.nn.Linear(6, 1)

    training_step = Model.training_step


def cli(model: type, args: list[str]) -> LightningCLI:
    return LightningCLI(model, Data, run=False, args=[*TRAINER, *args], save_config_callback=None)


def groups(optimizer: torch.optim.Optimizer) -> list[tuple]:
    return [(g["name"], g["weight_decay"], tuple(g["param_names"])) for g in optimizer.param_groups]


def test_a_preset_with_its_lambda_and_rules_around_it_is_one_config_entry(tmp_path: Path) -> None:
    config = {
        "model": {
            "decay_rules": {
                "class_path": "lightning_wd.presets.Preset",
                "init_args": {
                    "name": "standard",
                    "weight_decay": 0.07,
                    "before": [
                        {
                            "class_path": "lightning_wd.DecayRule",
                            "init_args": {"name": "head", "weight_decay": 0.01, "params": ["head.weight"]},
                        }
                    ],
                },
            }
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = cli(Model, [f"--config={path}"])
    optimizer = run.model.configure_optimizers()
    assert groups(optimizer) == [
        ("head", 0.01, ("head.weight",)),
        ("no_decay", 0.0, ("body.0.bias", "body.1.weight", "body.1.bias", "head.bias")),
        ("decay", 0.07, ("body.0.weight",)),
    ]


def test_a_plain_list_of_rules_still_works_in_the_same_argument() -> None:
    rules = '[{"class_path": "lightning_wd.DecayRule", "init_args": {"name": "all", "weight_decay": 0.3}}]'
    optimizer = cli(Model, [f"--model.decay_rules={rules}"]).model.configure_optimizers()
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("all", 0.3)]


def test_lightning_cli_optimizer_and_scheduler_options_build_from_the_plans_groups() -> None:
    run = cli(
        Bare,
        [
            "--optimizer=AdamW",
            "--optimizer.lr=0.01",
            "--lr_scheduler=StepLR",
            "--lr_scheduler.step_size=1",
            "--lr_scheduler.gamma=0.5",
            "--trainer.max_epochs=3",
            "--trainer.callbacks=lightning_wd.WeightDecayCallback",
        ],
    )
    run.trainer.fit(run.model, run.datamodule)
    (optimizer,) = run.trainer.optimizers
    assert groups(optimizer) == [
        ("head", 0.02, ("head.weight",)),
        ("no_decay", 0.0, ("body.0.bias", "body.1.weight", "body.1.bias", "head.bias")),
        ("decay", 0.1, ("body.0.weight",)),
    ]
    # every group followed the schedule (3 epochs: 0.5 ** 3), the head at half the lr as its rule says
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005 * 0.125, 0.01 * 0.125, 0.01 * 0.125])
    (engine,) = next(c for c in run.trainer.callbacks if isinstance(c, lwd.WeightDecayCallback)).engines
    assert engine.steps == 6  # 2 batches x 3 epochs, each decayed once (no "decayed twice" refusal)


def test_lightning_cli_one_cycle_scheduler_is_repeated_for_each_group_with_the_rules_lr_scale() -> None:
    run = cli(
        Bare,
        ["--optimizer=SGD", "--optimizer.lr=0.1", "--lr_scheduler=OneCycleLR", "--lr_scheduler.max_lr=0.2",
         "--lr_scheduler.total_steps=10"],
    )  # fmt: skip
    config = run.model.configure_optimizers()
    (optimizer,), (scheduler,) = config
    assert [g["max_lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.2, 0.2])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] == pytest.approx(lrs[1] / 2) and lrs[1] == pytest.approx(lrs[2])


@pytest.mark.parametrize(
    ("args", "warns"),
    [
        (["--model.optimizer=AdamW", "--model.optimizer.lr=0.01"], False),  # LightningCLI fills in 0.01
        (["--model.optimizer=AdamW", "--model.optimizer.weight_decay=0.05"], True),
        (["--model.optimizer=AdamW", "--model.optimizer.weight_decay=0.0"], False),
    ],
)
def test_the_optimizer_default_warning_fires_only_for_a_value_the_user_chose(args: list[str], warns: bool) -> None:
    run = cli(Model, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.model.configure_optimizers()
    assert any("is ignored" in str(w.message) for w in caught) is warns


@pytest.mark.parametrize(("value", "warns"), [(None, False), ("0.05", True)])
def test_the_same_holds_for_lightning_clis_own_optimizer_option(value: str | None, warns: bool) -> None:
    args = ["--optimizer=AdamW"] + ([f"--optimizer.weight_decay={value}"] if value else [])
    run = cli(Bare, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.model.configure_optimizers()
    assert any("is ignored" in str(w.message) for w in caught) is warns


def test_lightning_clis_optimizer_is_refused_with_the_fix_where_the_module_declares_several() -> None:
    class Several(Bare):
        decay_optimizers = {"body": lwd.OptimizerSpec("body"), "head": lwd.OptimizerSpec("head")}

    run = cli(Several, ["--optimizer=SGD", "--optimizer.lr=0.1"])
    with pytest.raises(MisconfigurationException, match=r"declares 2 \('body', 'head'\)\. Drop `--optimizer`"):
        run.model.configure_optimizers()
