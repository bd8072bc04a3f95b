"""LightningCLI: decay rules and the optimizer declared in a YAML config, then a short fit."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

import lightning_wd as lwd

pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI, OptimizerCallable


class CLIModel(lwd.WDMixin, BoringModel):
    """The documented pattern: `optimizer` and `decay_rules` as init arguments."""

    configure_optimizers = lwd.WDMixin.configure_optimizers  # BoringModel has its own
    show_decay_plan = False

    def __init__(
        self,
        hidden: int = 16,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        decay_rules: list[lwd.DecayRule] | None = None,
    ) -> None:
        super().__init__(decay_rules=decay_rules)
        self.optimizer = optimizer
        self.layer = nn.Sequential(nn.Linear(32, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 2))


class KwargsCLIModel(lwd.WDMixin, BoringModel):
    """`decay_rules` / `decay_plan_options` reach WDMixin.__init__ through **kwargs."""

    configure_optimizers = lwd.WDMixin.configure_optimizers  # BoringModel has its own
    show_decay_plan = False

    def __init__(self, hidden: int = 16, optimizer: OptimizerCallable = torch.optim.AdamW, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer = optimizer
        self.layer = nn.Sequential(nn.Linear(32, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 2))


RULES_YAML = """
- class_path: lightning_wd.DecayRule
  init_args:
    name: norms
    weight_decay: 0.0
    modules: ["torch.nn.LayerNorm", "*Norm*"]
- class_path: lightning_wd.DecayRule
  init_args:
    name: biases
    weight_decay: 0.0
    predicate: lightning_wd.presets.is_bias
    group: norms
- class_path: lightning_wd.DecayRule
  init_args:
    name: linear
    weight_decay: 0.1
    modules: torch.nn.Linear
    lr_scale: 0.5
"""


def write_config(tmp_path, model: dict[str, Any]) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
        },
        "model": model,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when `args=` is given while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["lightning-cli"])


MODEL_CONFIG = {
    "hidden": 8,
    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    "decay_rules": yaml.safe_load(RULES_YAML),
}


@pytest.mark.parametrize("model_class", [CLIModel, KwargsCLIModel], ids=["explicit", "kwargs"])
def test_lightning_cli_fits_with_rules_from_yaml(tmp_path, model_class):
    config = write_config(tmp_path, MODEL_CONFIG)
    cli = LightningCLI(
        model_class,
        args=["fit", "--config", config, "--trainer.max_steps=2"],
        save_config_kwargs={"overwrite": True},
    )
    assert cli.trainer.global_step == 2
    assert cli.model.decay_rules == [
        lwd.DecayRule("norms", 0.0, modules=("torch.nn.LayerNorm", "*Norm*")),
        lwd.DecayRule("biases", 0.0, predicate=lwd.presets.is_bias, group="norms"),
        lwd.DecayRule("linear", 0.1, modules="torch.nn.Linear", lr_scale=0.5),
    ]
    (opt,) = cli.trainer.optimizers
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["weight_decay"], g["lr"], g["param_names"]) for g in opt.param_groups] == [
        ("norms", 0.0, 0.01, ["layer.0.bias", "layer.1.weight", "layer.1.bias", "layer.2.bias"]),
        ("linear", 0.1, 0.005, ["layer.0.weight", "layer.2.weight"]),
    ]


def test_lightning_cli_without_rules_uses_the_class_default(tmp_path):
    config = write_config(tmp_path, {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}})
    cli = LightningCLI(
        CLIModel,
        args=["fit", "--config", config, "--trainer.max_steps=1"],
        save_config_kwargs={"overwrite": True},
    )
    (opt,) = cli.trainer.optimizers
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in opt.param_groups] == [
        ("no_decay", 0.0, ["layer.0.bias", "layer.1.weight", "layer.1.bias", "layer.2.bias"]),
        ("decay", 0.05, ["layer.0.weight", "layer.2.weight"]),
    ]


def test_lightning_cli_rejects_a_bad_rule_in_the_config(tmp_path):
    bad = {**MODEL_CONFIG, "decay_rules": [{"name": "oops", "weight_decay": -1.0}]}
    config = write_config(tmp_path, bad)
    with pytest.raises(ValueError, match=r"`weight_decay` must be >= 0, got -1.0"):
        LightningCLI(
            CLIModel,
            args=["fit", "--config", config, "--trainer.max_steps=1"],
            save_config_kwargs={"overwrite": True},
        )
