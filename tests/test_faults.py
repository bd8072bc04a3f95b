"""Faults and awkward training set-ups: nothing lost, nothing applied twice, nothing made NaN.

* fp16 overflow under a grad scaler (``16-mixed`` on CPU with an explicit ``GradScaler``):
  the skipped step gets no decay and the callback introduces no NaN, also in ``relative``
  mode, where ``m`` measured on the overflowing gradients is inf or NaN.
* A run interrupted by an exception mid-epoch and resumed from ``last.ckpt`` ends bitwise
  where the uninterrupted run ends.
* Parameters unfrozen mid-run by ``BaseFinetuning`` are decayed by the rules from then on
  (checked step by step against a reference): ``WDMixin`` splits the added group by the rules,
  each part with the rules' λ as its own ``weight_decay`` (never applied twice), and all of it
  survives a resume.
* A ``torch.compile``-d inner module plans under the same names as the eager one.
* Parameters replaced between two fits are the ones planned and decayed by the second fit.

References are written here from the documented formulas (``tests.callback_helpers`` and the
``ShadowAdamW`` below), never through ``lightning_wd``'s own kernels.
"""

from __future__ import annotations

import math
import shutil
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_wd as lwd
from lightning_wd import schedules
from tests.callback_helpers import DECAYED, LR, WD, Net, StepRecorder, WDNet, loader, make_data, trainer

WDS = dict.fromkeys(DECAYED, WD)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- (a) fp16 overflow
def _scaler_plugin() -> MixedPrecision:
    # precision="16-mixed" on CPU has no grad scaler in Lightning 2.6: give one explicitly.
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**4))


class OverflowWatch(L.Callback):
    """The overflowing batch leaves every parameter bitwise as it was; every other batch moves them."""

    def __init__(self, overflow_at: int) -> None:
        self.overflow_at = overflow_at
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.before = params_of(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(batch_idx)
        after = params_of(pl_module)
        for name, value in after.items():
            assert torch.isfinite(value).all(), f"{name} is not finite after batch {batch_idx}"
        if batch_idx == self.overflow_at:
            for name, value in after.items():
                assert torch.equal(value, self.before[name]), f"{name} changed on the skipped step"
        else:
            assert not torch.equal(after["net.fc1.weight"], self.before["net.fc1.weight"])


@pytest.mark.parametrize(
    "cb_kwargs",
    [
        dict(mode="decoupled"),
        dict(mode="relative", source="grad"),
        dict(mode="relative", source="grad", metric="rms", ord=1),
        dict(mode="relative", source="params", cautious=True),
        dict(mode="relative", source="update"),
    ],
    ids=["decoupled", "relative-grad", "relative-grad-rms-L1", "relative-params-cautious", "relative-update"],
)
def test_fused_optimizer_overflow_step_is_not_decayed_and_stays_finite(tmp_path, cb_kwargs):
    """Fused AdamW is stepped by the scaler even on overflow (it reads ``found_inf`` itself), so the
    callback's post-step hook runs with inf gradients: ``m`` is inf there, and inf * 0 would be NaN."""
    model = WDNet(optimizer=partial(torch.optim.AdamW, lr=1e-2, fused=True), nan_at=(2,))
    watch = OverflowWatch(overflow_at=2)
    t = trainer(tmp_path, [lwd.WeightDecayCallback(**cb_kwargs), watch], plugins=[_scaler_plugin()])
    t.fit(model, loader())
    assert watch.seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("source", ["grad", "update"])
def test_skipped_step_relative_mode_matches_reference(tmp_path, source):
    """Plain SGD: the scaler skips ``optimizer.step()``; the other steps follow the relative formula."""
    recorder = StepRecorder(WDS, mode="relative", source=source, skipped=(2,))
    cb = lwd.WeightDecayCallback(mode="relative", source=source)
    t = trainer(tmp_path, [cb, recorder], plugins=[_scaler_plugin()])
    model = WDNet(nan_at=(2,))
    t.fit(model, loader())
    assert recorder.checked == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- (b) interrupted and resumed mid-epoch
class ResumableLoader(DataLoader):
    """A DataLoader that checkpoints its position (Lightning saves ``state_dict`` of stateful loaders),
    so that a mid-epoch resume sees the same batches as an uninterrupted run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._served = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._served += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["served"])


class Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


step_scheduler = {
    "scheduler": partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: 1.0 / (1.0 + 0.3 * s)),
    "interval": "step",
}


def _resume_run(root: Path, *, crash_at: int | None = None, ckpt: str | None = None) -> tuple[dict[str, Tensor], Any]:
    model = WDNet(optimizer=partial(torch.optim.AdamW, lr=1e-2), scheduler=step_scheduler)
    cb = lwd.WeightDecayCallback(
        mode="relative", source="update", cautious=True, schedule=schedules.LinearWarmup(warmup_steps=6)
    )
    callbacks: list[L.Callback] = [cb, ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=3)]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    t = trainer(root, callbacks, max_epochs=3, enable_checkpointing=True)
    try:
        t.fit(model, ResumableLoader(make_data(), batch_size=8), ckpt_path=ckpt)
    except RuntimeError as err:
        assert crash_at is not None and "simulated crash" in str(err)
    return params_of(model), t


def test_interrupted_run_resumes_bitwise(tmp_path):
    straight, t = _resume_run(tmp_path / "straight")
    assert t.global_step == 15
    _, crashed = _resume_run(tmp_path / "crashed", crash_at=8)
    assert crashed.global_step == 8
    last = tmp_path / "crashed" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 6
    assert checkpoint["global_step"] % 5 != 0  # mid-epoch (5 batches per epoch)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("WeightDecayCallback"))
    assert [e["steps"] for e in state["engines"]] == [6]
    resumed, t = _resume_run(tmp_path / "crashed", ckpt=str(last))
    assert t.global_step == 15
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


# ---------------------------------------------------------------- (c) unfrozen mid-run
class Backboned(lwd.WDMixin, L.LightningModule):
    """A frozen backbone (Linear + LayerNorm) and a head; standard preset with λ = WD."""

    show_decay_plan = False

    def __init__(self, optimizer: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)
        self.optimizer = optimizer
        self.decay_rules = lwd.presets.standard(WD)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.backbone(x))), y)


class PlainBackboned(L.LightningModule):
    """The same model with a plain optimizer over the head only; the callback needs ``rules=``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.backbone(x))), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.head.parameters(), lr=LR)


class UnfreezeAtEpoch1(BaseFinetuning):
    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=LR / 2)
        elif epoch > 1:
            # On a resume BaseFinetuning restores the added group but not `requires_grad`
            # (freeze_before_training ran again in setup): make the backbone trainable again.
            self.make_trainable(pl_module.backbone)


BACKBONE_WDS = {"backbone.0.weight": WD, "head.weight": WD}


class ShadowAdamW(L.Callback):
    """Replays every real step on copies: torch AdamW with ``weight_decay=0``, then the documented
    decoupled decay ``p <- p (1 - lr λ)`` of the parameters that had a gradient.

    A group appearing mid-run gets fresh copies and a fresh AdamW, as the real one does.
    """

    def __init__(self, wds: dict[str, float]) -> None:
        self.wds = wds
        self.shadows: dict[tuple[str, ...], tuple[list[Tensor], torch.optim.AdamW]] = {}
        self.pending: list[tuple[tuple[str, ...], float]] = []
        self.checked: dict[tuple[str, ...], int] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for group in optimizer.param_groups:
            key = tuple(names[id(p)] for p in group["params"])
            if key not in self.shadows:
                copies = [p.detach().clone().requires_grad_(True) for p in group["params"]]
                opt = torch.optim.AdamW(copies, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=0)
                self.shadows[key] = (copies, opt)
            copies, opt = self.shadows[key]
            for copy, p in zip(copies, group["params"], strict=True):
                copy.grad = None if p.grad is None else p.grad.detach().clone()
            opt.param_groups[0]["lr"] = group["lr"]
            self.pending.append((key, group["lr"]))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        params = dict(pl_module.named_parameters())
        for key, lr in self.pending:
            copies, opt = self.shadows[key]
            opt.step()
            for name, copy in zip(key, copies, strict=True):
                if copy.grad is not None:
                    copy.mul_(1 - lr * self.wds.get(name, 0.0))
                torch.testing.assert_close(params[name], copy, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
                copy.copy_(params[name])  # no drift from float rounding over many steps
            self.checked[key] = self.checked.get(key, 0) + 1
        self.pending = []


def test_unfrozen_group_of_mixin_module_is_split_by_the_rules(tmp_path):
    """BaseFinetuning adds the backbone without a weight_decay: WDMixin splits it by the rules, each part with its λ."""
    model = Backboned(partial(torch.optim.AdamW, lr=LR))
    shadow = ShadowAdamW(BACKBONE_WDS)
    t = trainer(tmp_path, [UnfreezeAtEpoch1(), lwd.WeightDecayCallback(), shadow], max_epochs=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weight_decay.*")  # nothing to warn about: no default λ used
        t.fit(model, loader())
    added = {g["name"]: (g["weight_decay"], g["param_names"]) for g in t.optimizers[0].param_groups[2:]}
    assert added == {
        "pg3/decay": (WD, ["backbone.0.weight"]),
        "pg3/no_decay": (0.0, ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]),
    }
    assert shadow.checked[("backbone.0.weight",)] == 5  # the five steps of epoch 1, each checked against the reference
    assert shadow.checked[("backbone.0.bias", "backbone.1.weight", "backbone.1.bias")] == 5
    assert shadow.checked[("head.bias",)] == 10 and shadow.checked[("head.weight",)] == 10


def test_unfrozen_group_of_mixin_module_with_sgd_matches_reference(tmp_path):
    """The same with SGD given weight_decay=0.01 (the optimizer's default, not used): stepped by the formula."""
    model = Backboned(partial(torch.optim.SGD, lr=LR, weight_decay=0.01))
    recorder = StepRecorder(BACKBONE_WDS, mode="decoupled")
    t = trainer(tmp_path, [UnfreezeAtEpoch1(), lwd.WeightDecayCallback(), recorder], max_epochs=2)
    t.fit(model, loader())
    assert recorder.checked == 10


def test_unfrozen_group_of_plain_module_is_decayed_by_callback_rules(tmp_path):
    recorder = StepRecorder(BACKBONE_WDS, mode="decoupled")
    cb = lwd.WeightDecayCallback(rules=lwd.presets.standard(WD))
    model = PlainBackboned()
    frozen_before = model.backbone[0].weight.detach().clone()
    t = trainer(tmp_path, [UnfreezeAtEpoch1(), cb, recorder], max_epochs=2)
    t.fit(model, loader())
    assert recorder.checked == 10
    assert not torch.equal(model.backbone[0].weight, frozen_before)
    assert sorted(b.name for b in cb.engines[0]._buckets if b.name.startswith("pg2")) == ["pg2/decay", "pg2/no_decay"]


def _finetune_run(root: Path, max_epochs: int, ckpt: str | None = None) -> tuple[dict[str, Tensor], L.Trainer]:
    model = Backboned(partial(torch.optim.AdamW, lr=LR))
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    t = trainer(
        root,
        [UnfreezeAtEpoch1(), lwd.WeightDecayCallback(), checkpoint],
        max_epochs=max_epochs,
        enable_checkpointing=True,
    )
    t.fit(model, loader(), ckpt_path=ckpt)
    return params_of(model), t


def test_unfrozen_group_survives_resume(tmp_path):
    straight, _ = _finetune_run(tmp_path / "straight", 3)
    _finetune_run(tmp_path / "first", 2)
    cb = lwd.WeightDecayCallback()
    model = Backboned(partial(torch.optim.AdamW, lr=LR))
    t = trainer(tmp_path / "first", [UnfreezeAtEpoch1(), cb], max_epochs=3)
    t.fit(model, loader(), ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    resumed = params_of(model)
    for name, value in straight.items():  # bitwise: the resumed run decays the added group as the straight one
        assert torch.equal(resumed[name], value), name
    groups = t.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups[2:]] == [("pg3/decay", WD), ("pg3/no_decay", 0.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)]: b.weight_decay for b in cb.engines[0]._buckets for p in b.params if b.weight_decay}
    assert decayed == BACKBONE_WDS


# ---------------------------------------------------------------- (d) torch.compile
def _can_compile() -> bool:
    dynamo = getattr(torch, "_dynamo", None)
    return bool(dynamo is not None and dynamo.is_dynamo_supported() and (shutil.which("cc") or shutil.which("gcc")))


class CompiledNet(WDNet):
    """The inner ``nn.Module`` compiled: its parameters are named ``net._orig_mod.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net)


@pytest.mark.skipif(not _can_compile(), reason="torch.compile is not supported here (no dynamo or no C compiler)")
def test_compiled_inner_module_plans_and_decays_under_canonical_names(tmp_path):
    model = CompiledNet()
    raw_names = [n for n, _ in model.named_parameters()]
    assert "net._orig_mod.fc1.weight" in raw_names
    eager = [(g["name"], g["param_names"]) for g in WDNet().configure_optimizers().param_groups]
    compiled = [(g["name"], g["param_names"]) for g in model.configure_optimizers().param_groups]
    assert (
        compiled
        == eager
        == [
            ("no_decay", ["net.fc1.bias", "net.norm.weight", "net.norm.bias", "net.fc2.bias"]),
            ("decay", ["net.fc1.weight", "net.fc2.weight"]),
        ]
    )
    recorder = StepRecorder({"net._orig_mod.fc1.weight": WD, "net._orig_mod.fc2.weight": WD}, mode="decoupled")
    t = trainer(tmp_path, [lwd.WeightDecayCallback(), recorder], max_steps=2)
    t.fit(model, loader())
    assert recorder.checked == 2


# ---------------------------------------------------------------- (e) parameters replaced between fits
@pytest.mark.parametrize("plain", [False, True], ids=["mixin", "plain-with-rules"])
def test_parameters_replaced_between_fits_are_planned_and_decayed(tmp_path, plain):
    from tests.callback_helpers import PlainNet

    model = PlainNet() if plain else WDNet()
    cb = lwd.WeightDecayCallback(rules=lwd.presets.standard(WD)) if plain else lwd.WeightDecayCallback()
    trainer(tmp_path, [cb], max_steps=2).fit(model, loader())

    stale = model.net.fc1
    stale_values = params_of(stale)
    torch.manual_seed(1)
    model.net.fc1 = nn.Linear(6, 8)  # new parameters, same names
    recorder = StepRecorder(WDS, mode="decoupled")
    t = trainer(tmp_path, [cb, recorder], max_steps=3)
    t.fit(model, loader())
    assert recorder.checked == 3  # every step of the new parameters follows the formula
    for name, value in params_of(stale).items():  # the stale layer is neither stepped nor decayed
        assert torch.equal(value, stale_values[name]), name
    planned = {id(p) for b in cb.engines[0]._buckets for p in b.params}
    assert id(model.net.fc1.weight) in planned and id(stale.weight) not in planned
    decayed = {id(p) for b in cb.engines[0]._buckets if b.weight_decay > 0 for p in b.params}
    assert decayed == {id(model.net.fc1.weight), id(model.net.fc2.weight)}


def test_net_helpers_are_the_documented_shapes():
    """The reference helpers above assume Net's layout; keep them honest."""
    assert [n for n, _ in Net().named_parameters()] == [
        "fc1.weight",
        "fc1.bias",
        "norm.weight",
        "norm.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    assert math.isclose(LR, 0.1) and math.isclose(WD, 0.3)
