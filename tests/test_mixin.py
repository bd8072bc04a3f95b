"""WDMixin under a real ``Trainer.fit`` on CPU: groups, checkpoints, schedulers, hparams, logging."""

from __future__ import annotations

import copy
import logging
import warnings
from functools import partial
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_wd as lwd
from tests.helpers import unsafe_load_kwargs

NO_DECAY = ["layer.0.bias", "layer.1.weight", "layer.1.bias", "layer.2.bias"]
DECAY = ["layer.0.weight", "layer.2.weight"]


class LitWD(lwd.WDMixin, BoringModel):
    """A user's module: its own init arguments, save_hyperparameters, the mixin's configure_optimizers."""

    configure_optimizers = lwd.WDMixin.configure_optimizers  # BoringModel has its own
    decay_rules = lwd.presets.standard(weight_decay=0.05)

    def __init__(
        self,
        hidden: int = 16,
        optimizer: Any = partial(torch.optim.AdamW, lr=1e-2),  # noqa: B008 - the documented convention
        scheduler: Any = None,
        decay_rules: list[lwd.DecayRule] | None = None,
        show_plan: bool = False,
    ) -> None:
        super().__init__(decay_rules=decay_rules)
        self.save_hyperparameters()
        self.layer = nn.Sequential(nn.Linear(32, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 2))
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.show_decay_plan = show_plan


def trainer(tmp_path, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "default_root_dir": tmp_path,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def by_name(optimizer: torch.optim.Optimizer) -> dict[str, nn.Parameter]:
    return {n: p for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)}


def test_fit_uses_exactly_the_planned_groups(tmp_path):
    model = LitWD()
    t = trainer(tmp_path)
    t.fit(model)
    (opt,) = t.optimizers
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in opt.param_groups] == [
        ("no_decay", 0.0, NO_DECAY),
        ("decay", 0.05, DECAY),
    ]
    # Same tensors, by identity, as the module and the plan hold.
    for name, param in by_name(opt).items():
        assert param is model.get_parameter(name)
    for group, planned in zip(opt.param_groups, model.decay_plan.groups, strict=True):
        assert len(group["params"]) == len(planned.params)
        assert all(a is b for a, b in zip(group["params"], planned.params, strict=True))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert t.global_step == 2


class RecordOptimizerAtStart(Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        self.state_dict = copy.deepcopy(opt.state_dict())
        self.by_name = {n: copy.deepcopy(opt.state[p]) for n, p in by_name(opt).items()}
        self.global_step = trainer.global_step


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    first = trainer(tmp_path, max_steps=3)
    first.fit(LitWD())
    opt = first.optimizers[0]
    saved_groups = copy.deepcopy(opt.state_dict()["param_groups"])
    saved_by_name = {n: copy.deepcopy(opt.state[p]) for n, p in by_name(opt).items()}
    path = tmp_path / "last.ckpt"
    first.save_checkpoint(path)

    recorder = RecordOptimizerAtStart()
    second = trainer(tmp_path, max_steps=5, callbacks=[recorder])
    # The hyperparameters hold a functools.partial: the checkpoint is not a weights-only one.
    second.fit(LitWD(), ckpt_path=path, **unsafe_load_kwargs())
    assert recorder.global_step == 3
    assert recorder.state_dict["param_groups"] == saved_groups
    assert [(g["name"], g["weight_decay"]) for g in recorder.state_dict["param_groups"]] == [
        ("no_decay", 0.0),
        ("decay", 0.05),
    ]
    # Each named parameter got back its own state (exp_avg, exp_avg_sq, step).
    assert recorder.by_name.keys() == saved_by_name.keys() == set(NO_DECAY + DECAY)
    for name in saved_by_name:
        assert set(saved_by_name[name]) == {"step", "exp_avg", "exp_avg_sq"}
        assert_states_equal(recorder.by_name[name], saved_by_name[name])
    assert second.global_step == 5


class RecordLRs(Callback):
    def __init__(self) -> None:
        self.per_step: list[list[float]] = []
        self.per_epoch: list[list[float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.per_step.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.per_epoch.append([g["lr"] for g in trainer.optimizers[0].param_groups])


SCALED_RULES = [
    lwd.DecayRule("norms", 0.0, modules="*Norm*", lr_scale=0.1),
    lwd.DecayRule("biases", 0.0, params="*.bias"),
    lwd.DecayRule("weights", 0.01),
]


def test_lr_scale_gives_absolute_lr_and_a_step_scheduler_config_dict_follows_it(tmp_path):
    scheduler = {"scheduler": partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), "interval": "step"}
    model = LitWD(optimizer=partial(torch.optim.SGD, lr=0.1), scheduler=scheduler, decay_rules=SCALED_RULES)
    recorder = RecordLRs()
    trainer(tmp_path, max_steps=3, callbacks=[recorder]).fit(model)
    assert [g.name for g in model.decay_plan.groups] == ["norms", "biases", "weights"]
    expected = [[0.01, 0.1, 0.1], [0.005, 0.05, 0.05], [0.0025, 0.025, 0.025]]
    assert recorder.per_step == [pytest.approx(row) for row in expected]
    config = model.trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    assert config.scheduler.base_lrs == pytest.approx([0.01, 0.1, 0.1])


def test_scheduler_callable_steps_per_epoch_on_scaled_groups(tmp_path):
    model = LitWD(
        optimizer=partial(torch.optim.SGD, lr=0.1),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        decay_rules=SCALED_RULES,
    )
    recorder = RecordLRs()
    trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=2, callbacks=[recorder]).fit(model)
    assert recorder.per_epoch == [pytest.approx([0.01, 0.1, 0.1]), pytest.approx([0.005, 0.05, 0.05])]


def test_hyperparameters_are_saved_and_the_model_reloads(tmp_path):
    rules = [lwd.DecayRule("norms", 0.0, modules="torch.nn.LayerNorm"), lwd.DecayRule("rest", 0.02)]
    model = LitWD(hidden=8, decay_rules=rules)
    assert model.decay_rules == rules and type(model).decay_rules != rules
    t = trainer(tmp_path)
    t.fit(model)
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)

    reloaded = LitWD.load_from_checkpoint(path, **unsafe_load_kwargs())
    assert reloaded.hparams.hidden == 8
    assert reloaded.hparams.decay_rules == rules
    assert reloaded.decay_rules == rules
    assert reloaded.layer[0].out_features == 8
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)
    opt = reloaded.configure_optimizers()
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in opt.param_groups] == [
        ("norms", 0.0, ["layer.1.weight", "layer.1.bias"]),
        ("rest", 0.02, ["layer.0.weight", "layer.0.bias", "layer.2.weight", "layer.2.bias"]),
    ]


class UsesClassRules(LitWD):
    """A user who stores the init argument on the instance even when it is None."""

    decay_rules = lwd.presets.standard(weight_decay=0.07)

    def __init__(self, decay_rules: list[lwd.DecayRule] | None = None) -> None:
        super().__init__()
        self.decay_rules = decay_rules


def test_decay_rules_init_argument_and_class_attribute():
    default = LitWD().configure_optimizers()
    assert [g["name"] for g in default.param_groups] == ["no_decay", "decay"]  # the class attribute
    # None on the instance falls back to the class attribute, never to some other default.
    assert [g["weight_decay"] for g in UsesClassRules().configure_optimizers().param_groups] == [0.0, 0.07]
    custom = UsesClassRules(decay_rules=[lwd.DecayRule("all", 0.3)]).configure_optimizers()
    assert [(g["name"], g["weight_decay"]) for g in custom.param_groups] == [("all", 0.3)]
    with pytest.raises(TypeError, match="`decay_rules` was given as a set"):
        LitWD(decay_rules={lwd.DecayRule("all", 0.3)})


class MergedPlan(lwd.WDMixin, BoringModel):
    configure_optimizers = lwd.WDMixin.configure_optimizers  # BoringModel has its own
    show_decay_plan = False

    def __init__(self, decay_plan_options: dict | None = None) -> None:
        rules = [lwd.DecayRule("biases", 0.0, params="*.bias"), lwd.DecayRule("weights", 0.0, params="*.weight")]
        super().__init__(decay_rules=rules, decay_plan_options=decay_plan_options)


def test_decay_plan_options_init_argument():
    opt = MergedPlan().configure_optimizers()
    assert [(g["name"], g["param_names"]) for g in opt.param_groups] == [
        ("biases", ["layer.bias"]),
        ("weights", ["layer.weight"]),
    ]
    merged = MergedPlan(decay_plan_options={"merge": True}).configure_optimizers()
    assert [(g["name"], g["param_names"]) for g in merged.param_groups] == [
        ("biases+weights", ["layer.bias", "layer.weight"])
    ]
    with pytest.raises(TypeError, match="`decay_plan_options` got unknown option"):
        MergedPlan(decay_plan_options={"merged": True})


EXPECTED_TABLE = "\n".join(
    [
        "Weight decay plan for LitWD:",
        "group     rules               tensors  elements  weight_decay  lr_scale",
        "--------  ------------------  -------  --------  ------------  --------",
        "no_decay  bias,normalization        4        50             0         1",
        "decay     linear                    2       544          0.05         1",
        "--------  ------------------  -------  --------  ------------  --------",
        "total                               6       594",
    ]
)


def test_show_decay_plan_logs_the_table_and_can_be_switched_off(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, max_steps=1).fit(LitWD(show_plan=True))
    messages = [r.getMessage() for r in caplog.records if "Weight decay plan" in r.getMessage()]
    assert messages == [EXPECTED_TABLE]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, max_steps=1).fit(LitWD(show_plan=False))
    assert not [r for r in caplog.records if "Weight decay plan" in r.getMessage()]


def drop_first_group(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups[1:], lr=0.1)


def test_optimizer_factory_that_drops_groups_is_an_error(tmp_path):
    model = LitWD(optimizer=drop_first_group)
    with pytest.raises(MisconfigurationException, match="holds 2 parameters but the plan has 6"):
        model.configure_optimizers()
    with pytest.raises(MisconfigurationException, match="dropped some of the parameter groups"):
        trainer(tmp_path).fit(LitWD(optimizer=drop_first_group))


def test_optimizer_factory_with_its_own_weight_decay_warns():
    model = LitWD(optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    with pytest.warns(UserWarning, match=r"`optimizer` was given weight_decay=0.1, but every parameter group"):
        opt = model.configure_optimizers()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]  # the plan wins
    quiet = LitWD(optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.configure_optimizers()


@pytest.mark.parametrize(
    ("optimizer", "error", "match"),
    [
        (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), TypeError, r"`optimizer` must be a callable"),
        ("adamw", TypeError, r"`optimizer` must be a callable"),
        (lambda groups: "not an optimizer", TypeError, r"`optimizer` returned str, not a torch.optim.Optimizer"),
    ],
)
def test_bad_optimizer_factories(optimizer, error, match):
    with pytest.raises(error, match=match):
        LitWD(optimizer=optimizer).configure_optimizers()


def test_resuming_does_not_scale_the_lr_twice(tmp_path):
    """The resumed optimizer takes the checkpoint's (already scaled, already scheduled) lrs."""
    scheduler = {"scheduler": partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), "interval": "step"}

    def make() -> LitWD:
        return LitWD(optimizer=partial(torch.optim.SGD, lr=0.1), scheduler=scheduler, decay_rules=SCALED_RULES)

    first = trainer(tmp_path, max_steps=2)
    first.fit(make())
    path = tmp_path / "scaled.ckpt"
    first.save_checkpoint(path)
    recorder = RecordLRs()
    trainer(tmp_path, max_steps=4, callbacks=[recorder]).fit(make(), ckpt_path=path, **unsafe_load_kwargs())
    assert recorder.per_step == [
        pytest.approx([0.0025, 0.025, 0.025]),
        pytest.approx([0.00125, 0.0125, 0.0125]),
    ]
