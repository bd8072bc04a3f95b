"""Contiguous parameter groups: ``functional.make_contiguous_`` / ``flat_view`` and ``WDMixin.contiguous_parameters``.

A group laid out in one buffer is decayed by the callback with one kernel over the buffer; the
results must be bitwise those of the per-tensor path, which the tests compare with a plain loop
over DESIGN.md's formula (SGD without momentum: p <- p - lr * grad, then p <- p * (1 - lr * λ)).
"""

from __future__ import annotations

import csv
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

import lightning_wd as lwd
from lightning_wd import functional as F
from tests.callback_helpers import CleanDistributedExit, InterleavedData, loader, make_data, trainer

LR, WD = 0.1, 0.3


# ---------------------------------------------------------------- functional
def test_make_contiguous_keeps_identity_values_and_training():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(model.parameters())
    ids, values = [id(p) for p in params], [p.detach().clone() for p in params]
    buffer = F.make_contiguous_(params)
    assert buffer.numel() == sum(v.numel() for v in values)
    assert [id(p) for p in model.parameters()] == ids
    for p, v in zip(model.parameters(), values, strict=True):
        assert p.shape == v.shape and torch.equal(p, v) and p.requires_grad and p.is_contiguous()
    offsets = [p.data_ptr() - buffer.data_ptr() for p in params]
    assert offsets == [4 * sum(v.numel() for v in values[:i]) for i in range(len(values))]  # float32, in order
    model(torch.randn(5, 3)).sum().backward()  # gradients still flow to each parameter
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    assert not torch.equal(params[0], values[0])
    assert torch.equal(buffer[:12].view(4, 3), params[0].detach())  # the optimizer wrote into the buffer


class OddParameter(nn.Parameter):
    pass


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ([], r"`tensors` is empty"),
        ([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], r"mixes devices or dtypes.*group_by_device_and_dtype"),
        ("shared", r"holds a tensor more than once"),
        ([OddParameter(torch.zeros(2)), torch.zeros(2)], r"holds OddParameter tensors"),
    ],
    ids=["empty", "mixed-dtypes", "duplicate", "subclass"],
)
def test_make_contiguous_refuses_and_leaves_tensors_alone(tensors, match):
    if tensors == "shared":
        t = nn.Parameter(torch.ones(3))
        tensors = [t, t]
    pointers = [t.data_ptr() for t in tensors]
    with pytest.raises(ValueError, match=match):
        F.make_contiguous_(tensors)
    assert [t.data_ptr() for t in tensors] == pointers


def test_flat_view_only_for_tensors_back_to_back():
    buffer = torch.arange(10.0)
    a, b, c = buffer[:4].view(2, 2), buffer[4:7], buffer[7:]
    assert torch.equal(F.flat_view([a, b, c]), buffer)
    assert F.flat_view([a, c]) is None  # a gap
    assert F.flat_view([b, a]) is None  # out of order
    assert F.flat_view([buffer[:4].view(2, 2).t(), b]) is None  # not contiguous
    assert F.flat_view([torch.zeros(2), torch.zeros(2)]) is None  # two storages
    assert F.flat_view([]) is None
    F.flat_view([a, b]).mul_(2.0)
    assert torch.equal(buffer, torch.tensor([0.0, 2, 4, 6, 8, 10, 12, 7, 8, 9]))


# ---------------------------------------------------------------- through Trainer.fit
class ManySmall(lwd.WDMixin, L.LightningModule):
    """Twelve small linear layers: one decayed group of twelve weights, one undecayed of twelve biases."""

    show_decay_plan = False

    def __init__(self, contiguous: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.contiguous_parameters = contiguous
        self.decay_rules = lwd.presets.standard(WD)
        self.optimizer = partial(torch.optim.SGD, lr=LR)
        self.inp = nn.Linear(6, 4)
        self.hidden = nn.ModuleList(nn.Linear(4, 4) for _ in range(10))
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.inp(x))
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return self.out(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def reference_run(steps: int, batch_size: int = 8) -> dict[str, Tensor]:
    """Plain loop: SGD step, then p <- p * (1 - lr * λ) for the weights (biases: λ = 0)."""
    model = ManySmall()
    data = make_data()
    for k in range(steps):
        x, y = data[k * batch_size : (k + 1) * batch_size]
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= LR * p.grad
                if name.endswith("weight"):
                    p *= 1 - LR * WD
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class ReplaceData(L.Callback):
    """Gives one decayed weight new storage mid-run, which breaks its group's contiguity."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 2:
            w = pl_module.hidden[3].weight
            w.data = w.data.clone()


@pytest.mark.parametrize("replace", [False, True], ids=["contiguous", "data-replaced-mid-run"])
def test_contiguous_groups_decay_exactly_like_the_reference(tmp_path, replace):
    model = ManySmall(contiguous=True)
    cb = lwd.WeightDecayCallback(mode="decoupled")
    callbacks = [cb, ReplaceData()] if replace else [cb]
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, callbacks, logger=logger, log_every_n_steps=1).fit(model, loader())
    (state,) = cb.engines
    decay = next(b for b in state._buckets if b.name == "decay")
    assert [len(chunk) for chunk in decay.chunks] == [12]
    assert (decay.flat(0) is None) == replace  # one kernel over the group's buffer, until its layout breaks
    expected = reference_run(steps=5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-6, msg=name)
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    logged = float([r for r in rows if r.get("wd/decay/param_norm")][-1]["wd/decay/param_norm"])
    weights = [v for n, v in expected.items() if n.endswith("weight")]
    assert logged == pytest.approx(math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights)), rel=1e-5)
    plain = ManySmall(contiguous=False)
    trainer(tmp_path, [lwd.WeightDecayCallback(mode="decoupled")]).fit(plain, loader())
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name  # the same bits as the per-tensor path


def test_contiguous_parameters_flag_is_checked_before_anything_changes():
    model = ManySmall()
    model.contiguous_parameters = "yes"  # type: ignore[assignment]
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"`contiguous_parameters` must be True or False, got str 'yes'"):
        model.configure_optimizers()
    assert [p.data_ptr() for p in model.parameters()] == pointers


class CheckRanksAgree(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for name, p in pl_module.named_parameters():
            gathered = trainer.strategy.all_gather(p.detach())
            assert all(torch.equal(gathered[r], gathered[0]) for r in range(trainer.world_size)), name
        decay = next(b for b in trainer.callbacks[0].engines[0]._buckets if b.name == "decay")
        assert decay.flat(0) is not None


@pytest.mark.slow
def test_contiguous_groups_under_ddp_match_the_reference(tmp_path):
    model = ManySmall(contiguous=True)
    callbacks = [lwd.WeightDecayCallback(mode="decoupled"), CheckRanksAgree(), CleanDistributedExit()]
    t = trainer(tmp_path, callbacks, devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    t.fit(model, datamodule=InterleavedData(batch_size=4))  # global batch 8, as the reference
    expected = reference_run(steps=5)
    for name, p in model.named_parameters():  # ddp_spawn copies the trained weights back
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_contiguous_run_resumes_bitwise_from_a_checkpoint(tmp_path):
    """Two epochs straight equal one epoch, a checkpoint, and one more epoch resumed (views of one
    buffer are saved and loaded like any parameters; the resumed model is laid out again)."""

    def fit(root: Any, epochs: int, ckpt: str | None = None, save: str | None = None) -> ManySmall:
        model = ManySmall(contiguous=True)
        t = trainer(root, [lwd.WeightDecayCallback(mode="decoupled")], max_epochs=epochs)
        t.fit(model, loader(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return model

    straight = fit(tmp_path / "a", 2)
    ckpt = str(tmp_path / "half.ckpt")
    fit(tmp_path / "b", 1, save=ckpt)
    assert torch.load(ckpt, weights_only=True)["state_dict"]["hidden.3.weight"].shape == (4, 4)
    resumed = fit(tmp_path / "c", 2, ckpt=ckpt)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert F.flat_view([layer.weight for layer in resumed.hidden]) is not None  # still one buffer per group
