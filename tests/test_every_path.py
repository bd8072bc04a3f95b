"""The decay on the paths a real run takes: a callback reused, optimizers re-created, groups added,
parameters replaced, lr scales under every scheduler, a base class's configure_optimizers, a crash.

Each step is checked against the documented formula by ``StepRecorder`` (plain per-tensor loops in
``tests.callback_helpers``), never through ``lightning_wd``'s own kernels.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import Tensor, nn

import lightning_wd as lwd
from lightning_wd import schedules
from tests.callback_helpers import DECAYED, LR, WD, Net, PlainNet, StepRecorder, WDNet, loader, trainer

WDS = dict.fromkeys(DECAYED, WD)


def test_a_callback_reused_for_a_second_fit_starts_afresh(tmp_path):
    """Cosine without total_steps: each fit gets its own length and counts from 0 (else the multiplier is 0)."""
    cb = lwd.WeightDecayCallback(schedule=schedules.Cosine(start=1.0, end=0.0))
    first = StepRecorder(WDS, mode="decoupled", schedule=lambda s: 0.5 * (1 + math.cos(math.pi * min(s, 2) / 2)))
    trainer(tmp_path, [cb, first], max_steps=2, max_epochs=None).fit(WDNet(), loader())
    assert first.checked == 2
    second = StepRecorder(WDS, mode="decoupled", schedule=lambda s: 0.5 * (1 + math.cos(math.pi * min(s, 5) / 5)))
    trainer(tmp_path, [cb, second], max_steps=5, max_epochs=None).fit(WDNet(), loader())
    assert second.checked == 5
    assert cb.state_dict()["engines"] == [{"version": 2, "steps": 5, "total_steps": 5}]


# ---------------------------------------------------------------- a base class's configure_optimizers
class Existing(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_wdmixin_refuses_to_shadow_a_bases_configure_optimizers_silently():
    with pytest.raises(TypeError, match=r"`Shadowing` puts WDMixin before Existing.*configure_optimizers = "):

        class Shadowing(lwd.WDMixin, Existing):
            pass


def test_either_configure_optimizers_can_be_chosen_in_one_line():
    class Mixins(lwd.WDMixin, Existing):
        configure_optimizers = lwd.WDMixin.configure_optimizers
        show_decay_plan = False

    class Keeps(lwd.WDMixin, Existing):
        configure_optimizers = Existing.configure_optimizers

    assert [g["name"] for g in Mixins().configure_optimizers().param_groups] == ["no_decay", "decay"]
    kept = Keeps().configure_optimizers()
    assert len(kept.param_groups) == 1 and kept.param_groups[0]["lr"] == 0.5

    class Sub(Mixins):  # a subclass inherits the choice
        pass

    assert [g["name"] for g in Sub().configure_optimizers().param_groups] == ["no_decay", "decay"]


# ---------------------------------------------------------------- lr scaled exactly once
class TimmLikeScheduler:
    """What timm's schedulers do each step: ``lr = base_lr * group["lr_scale"]`` when the group has the key."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base, strict=True):
            g["lr"] = base * g["lr_scale"] if "lr_scale" in g else base

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = state["base"]


class ScaledHead(WDNet):
    def __init__(self, scheduler: Any) -> None:
        rules = [lwd.DecayRule("head", WD, params="net.fc2.weight", lr_scale=0.5), *lwd.presets.standard(WD)]
        super().__init__(decay_rules=rules, scheduler=scheduler)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step()


class LrProbe(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


@pytest.mark.parametrize(
    "scheduler",
    [
        None,
        partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda t: 1.0),
        {"scheduler": partial(torch.optim.lr_scheduler.StepLR, step_size=100), "interval": "step"},
        {"scheduler": TimmLikeScheduler, "interval": "step"},
    ],
    ids=["no-scheduler", "torch-epoch", "lightning-step", "timm-like"],
)
def test_a_rules_lr_scale_is_applied_exactly_once_whatever_drives_the_lr(tmp_path, scheduler):
    probe = LrProbe()
    t = trainer(tmp_path, [lwd.WeightDecayCallback(), probe], max_epochs=2)
    t.fit(ScaledHead(scheduler), loader())
    assert probe.lrs and all(lrs == {"head": LR * 0.5, "no_decay": LR, "decay": LR} for lrs in probe.lrs), probe.lrs[-1]
    assert not any("lr_scale" in g for g in t.optimizers[0].param_groups)


# ---------------------------------------------------------------- optimizers and groups changing mid-run
class RecreateOptimizers(L.Callback):
    """Re-creates the optimizers at the start of epoch 1 (as a user switching optimizers would)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            trainer.strategy.setup_optimizers(trainer)


def test_an_optimizer_recreated_mid_run_is_decayed_from_its_next_step(tmp_path):
    recorder = StepRecorder(WDS, mode="decoupled")
    cb = lwd.WeightDecayCallback()
    t = trainer(tmp_path, [RecreateOptimizers(), cb, recorder], max_epochs=2)
    with pytest.warns(UserWarning, match="optimizers changed during training.*same rules"):
        t.fit(WDNet(), loader())
    assert recorder.checked == 10  # no step without its decay, none decayed twice
    assert [e.optimizer for e in cb.engines] == [t.optimizers[0]]
    assert cb.engines[0].steps == 10  # the new optimizer's engine goes on counting: a schedule does not restart


class AddGroup(L.Callback):
    """Adds the module's ``extra`` parameter as a new group at the start of epoch 1."""

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            trainer.optimizers[0].add_param_group({"params": [pl_module.extra], **self.group})


class WithExtra(PlainNet):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.ones(3, 3))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx) + self.extra.sum() * 0.01

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=LR)


def test_groups_added_mid_run_warn_instead_of_crashing(tmp_path):
    """A duplicate name and a group's own λ under plain rules=: fit-start errors, mid-run warnings."""
    model = WithExtra()
    cb = lwd.WeightDecayCallback(rules=lwd.presets.standard(WD))
    t = trainer(tmp_path, [AddGroup({"name": "decay", "weight_decay": 0.2}), cb], max_epochs=2)
    with pytest.warns(UserWarning) as record:
        t.fit(model, loader())
    messages = " | ".join(str(w.message) for w in record)
    assert "own `weight_decay`=0.2" in messages or "named ['decay']" in messages, messages
    names = [b.name for b in cb.engines[0]._buckets]
    assert len(names) == len(set(names)), names  # logged under unique names
    extra = next(b for b in cb.engines[0]._buckets if b.params == [model.extra])
    assert extra.weight_decay == 0.2  # its own λ, applied once (SGD's own decay is off during its step)


def test_a_parameter_replaced_mid_run_is_reported(tmp_path):
    class Replace(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 2:
                pl_module.net.fc1.weight = nn.Parameter(pl_module.net.fc1.weight.detach().clone())

    t = trainer(
        tmp_path,
        [Replace(), lwd.WeightDecayCallback()],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    with pytest.warns(UserWarning, match=r"no longer parameters of the module.*Re-create the optimizer"):
        t.fit(WDNet(), loader())


class Crash(WDNet):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if batch_idx == 2:
            raise RuntimeError("crash in the closure")
        return super().training_step(batch, batch_idx)


def test_a_crash_inside_the_step_leaves_every_groups_lambda_in_place(tmp_path):
    model = Crash(optimizer=partial(torch.optim.AdamW, lr=LR))
    t = trainer(tmp_path, [lwd.WeightDecayCallback()])
    with pytest.raises(RuntimeError, match="crash in the closure"):
        t.fit(model, loader())
    groups = {g["name"]: g["weight_decay"] for g in t.optimizers[0].param_groups}
    assert groups == {"no_decay": 0.0, "decay": WD}
    assert "step" not in t.optimizers[0].__dict__  # detached on the exception


class BoringWD(lwd.WDMixin, BoringModel):
    configure_optimizers = lwd.WDMixin.configure_optimizers
    show_decay_plan = False


def test_the_logged_weight_decay_follows_a_schedule_written_as_a_callback(tmp_path):
    """A DINO-style callback writes each group's weight_decay: the decay and its log follow it."""

    class Grow(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            for g in trainer.optimizers[0].param_groups:
                if g["name"] == "decay":
                    g["weight_decay"] = 0.01 * (batch_idx + 1)

    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [Grow(), lwd.WeightDecayCallback()], max_steps=4, logger=logger, log_every_n_steps=1)
    t.fit(BoringWD(), torch.utils.data.DataLoader(torch.randn(16, 32), batch_size=4))
    import csv
    from pathlib import Path

    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    logged = [float(r["wd/decay/weight_decay"]) for r in rows if r.get("wd/decay/weight_decay")]
    assert logged == pytest.approx([0.01, 0.02, 0.03, 0.04])


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ([1], TypeError, r"`state_dict` must be a dict.*Pass what state_dict\(\) returned"),
        ({"version": 7}, ValueError, r"`state_dict` was not written by WeightDecayCallback.*Pass"),
        ({"version": 1, "steps": 3}, TypeError, r"`state_dict\['steps'\]` must be a list"),
        (
            {"version": 2, "engines": [{"version": 2, "steps": -1}]},
            TypeError,
            r"`state_dict\['engines'\]\[0\]\['steps'\]`",
        ),
    ],
)
def test_the_callbacks_load_state_dict_refuses_what_it_did_not_write(state, error, match):
    cb = lwd.WeightDecayCallback()
    with pytest.raises(error, match=match):
        cb.load_state_dict(state)
    assert cb.state_dict() == {"version": 2, "engines": []}  # nothing half-loaded
    cb.load_state_dict({"version": 1, "steps": [4], "total_steps": None})  # what older releases wrote
    assert cb.state_dict()["engines"] == [{"version": 2, "steps": 4, "total_steps": None}]


class HandWritten(L.LightningModule):
    """The documented recipe for a hand-written configure_optimizers: groups from build_param_groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(lwd.build_param_groups(self, lwd.presets.standard(WD)), lr=LR)


def test_groups_from_build_param_groups_need_no_rules_on_the_callback(tmp_path):
    recorder = StepRecorder(WDS, mode="decoupled")
    t = trainer(tmp_path, [lwd.WeightDecayCallback(), recorder])
    t.fit(HandWritten(), loader())
    assert recorder.checked == 5


class WithLr(WDNet):
    """The documented pattern for the learning-rate finder: an ``lr`` attribute beside the ``optimizer`` factory."""

    def __init__(self) -> None:
        rules = [lwd.DecayRule("head", WD, params="net.fc2.weight", lr_scale=0.5), *lwd.presets.standard(WD)]
        super().__init__(decay_rules=rules)
        self.lr = 0.05


def test_the_lr_attribute_is_the_optimizers_lr_so_lr_find_s_suggestion_is_used(tmp_path):
    from lightning.pytorch.tuner import Tuner

    model = WithLr()
    assert {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups} == {
        "head": 0.025,
        "no_decay": 0.05,
        "decay": 0.05,
    }
    t = trainer(tmp_path, [lwd.WeightDecayCallback()], max_epochs=1)
    finder = Tuner(t).lr_find(model, train_dataloaders=loader(n=320), min_lr=1e-3, max_lr=0.5, num_training=40)
    suggested = finder.suggestion()
    assert suggested is not None and suggested != 0.05 and model.lr == suggested
    probe = LrProbe()
    trainer(tmp_path, [lwd.WeightDecayCallback(), probe]).fit(model, loader())
    assert probe.lrs[0] == {"head": suggested * 0.5, "no_decay": suggested, "decay": suggested}


def test_a_bad_lr_attribute_is_refused_by_name():
    model = WithLr()
    model.lr = "fast"
    with pytest.raises(TypeError, match=r"`lr` must be a finite number > 0.*got str 'fast'.*Set it"):
        model.configure_optimizers()


class WithBatchSize(WDNet):
    """The documented pattern for the batch-size finder: a ``batch_size`` attribute the dataloader reads."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 2

    def train_dataloader(self) -> Any:
        return loader(n=64, batch_size=self.batch_size)


def test_scale_batch_size_trials_leave_no_decay_or_step_count_behind(tmp_path):
    from lightning.pytorch.tuner import Tuner

    model = WithBatchSize()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = lwd.WeightDecayCallback(schedule=schedules.LinearWarmup(warmup_steps=4))
    t = trainer(tmp_path, [callback], max_epochs=1)
    found = Tuner(t).scale_batch_size(model, mode="power", steps_per_trial=2, max_trials=3)
    # 2 -> 4 -> 8 (Lightning 2.5+ counts the first size as a trial; 2.4 goes on to 16)
    assert found == model.batch_size and found in (8, 16)
    for name, p in model.named_parameters():  # the trials' steps (and their decay) are undone
        torch.testing.assert_close(p.detach(), initial[name], msg=name)
    recorder = StepRecorder(WDS, schedule=schedules.LinearWarmup(warmup_steps=4), mode="decoupled")
    t = trainer(tmp_path, [callback, recorder], max_epochs=1)
    t.fit(model)
    assert recorder.checked == 64 // found == callback.engines[0].steps  # one step per batch; warm-up from step 0
