"""Several optimizers declared with ``WDMixin.decay_optimizers``: groups, logged keys, fits, resumes, errors.

The reference is a plain loop over the same data with plain torch optimizers built over hand-listed
parameters (``weight_decay=0``), and the documented decoupled decay written out after each step:
p <- p * (1 - lr * λ) for the parameters the standard preset decays (the weights of the linear maps).
"""

from __future__ import annotations

import csv
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_wd as lwd
from tests.callback_helpers import trainer

WD_G, WD_D = 0.2, 0.05
LR_G, LR_D = 0.05, 0.02


def data(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g)), batch_size=6)


def make_nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    discriminator = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    return generator, discriminator


def g_loss(generator: nn.Module, discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    z = torch.linspace(-1, 1, real.shape[0] * 2).view(-1, 2)
    return -discriminator(generator(z)).mean()


def d_loss(generator: nn.Module, discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    z = torch.linspace(-1, 1, real.shape[0] * 2).view(-1, 2)
    return discriminator(generator(z).detach()).mean() - discriminator(real).mean()


class GAN(lwd.WDMixin, L.LightningModule):
    decay_optimizers = {
        "generator": lwd.OptimizerSpec(
            "generator", partial(torch.optim.SGD, lr=LR_G), lwd.presets.standard(weight_decay=WD_G)
        ),
        "discriminator": lwd.OptimizerSpec(
            "discriminator", partial(torch.optim.SGD, lr=LR_D), lwd.presets.standard(weight_decay=WD_D)
        ),
    }
    show_decay_plan = False

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.discriminator = make_nets()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        opt_g.zero_grad()
        self.manual_backward(g_loss(self.generator, self.discriminator, real))
        opt_g.step()
        opt_d.zero_grad()
        self.manual_backward(d_loss(self.generator, self.discriminator, real))
        opt_d.step()


def reference(epochs: int = 1) -> dict[str, torch.Tensor]:
    """The same run in plain torch, with the decay written out after each optimizer's step."""
    generator, discriminator = make_nets()
    opt_g = torch.optim.SGD(generator.parameters(), lr=LR_G)
    opt_d = torch.optim.SGD(discriminator.parameters(), lr=LR_D)
    decayed_g = [generator[0].weight, generator[2].weight]  # Linear weights; LayerNorm and biases are not
    decayed_d = [discriminator[0].weight, discriminator[2].weight]
    for (real,) in [batch for _ in range(epochs) for batch in data()]:
        opt_g.zero_grad()
        g_loss(generator, discriminator, real).backward()
        opt_g.step()
        with torch.no_grad():
            for p in decayed_g:
                p.mul_(1 - LR_G * WD_G)
        opt_d.zero_grad()
        d_loss(generator, discriminator, real).backward()
        opt_d.step()
        with torch.no_grad():
            for p in decayed_d:
                p.mul_(1 - LR_D * WD_D)
    return {
        **{f"generator.{k}": v for k, v in generator.state_dict().items()},
        **{f"discriminator.{k}": v for k, v in discriminator.state_dict().items()},
    }


def fit(model: L.LightningModule, root: Path, ckpt_path: Path | None = None, **kw: Any) -> L.Trainer:
    """A quiet CPU fit with the callback (``callbacks=`` replaces it), over ``data()``."""
    callbacks = kw.pop("callbacks", [lwd.WeightDecayCallback()])
    t = trainer(root, callbacks, **kw)
    t.fit(model, data(), ckpt_path=ckpt_path)
    return t


def test_each_optimizer_gets_its_own_named_groups_with_its_rules() -> None:
    model = GAN()
    opt_g, opt_d = model.configure_optimizers()
    assert [(g["name"], g["weight_decay"], g["param_names"], g["lr"]) for g in opt_g.param_groups] == [
        ("generator/no_decay", 0.0, ["generator.0.bias", "generator.1.weight", "generator.1.bias", "generator.2.bias"],
         LR_G),
        ("generator/decay", WD_G, ["generator.0.weight", "generator.2.weight"], LR_G),
    ]  # fmt: skip
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in opt_d.param_groups] == [
        ("discriminator/no_decay", 0.0, ["discriminator.0.bias", "discriminator.2.bias"]),
        ("discriminator/decay", WD_D, ["discriminator.0.weight", "discriminator.2.weight"]),
    ]
    assert set(model.decay_plans) == {"generator", "discriminator"}
    assert "discriminator" not in model.decay_plans["generator"].table()


def test_manual_gan_fit_decays_each_optimizer_once_per_step_and_logs_under_the_given_names(tmp_path: Path) -> None:
    model = GAN()
    logger = CSVLogger(tmp_path, name="gan")
    fit(model, tmp_path, logger=logger, log_every_n_steps=1)
    expected = reference()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        header = next(csv.reader(f))
    wd_keys = {k for k in header if k.startswith("wd/")}
    assert {"wd/generator/decay/param_norm", "wd/discriminator/decay/param_norm"} <= wd_keys
    assert not any("SGD" in k or "AdamW" in k for k in wd_keys), wd_keys


def test_a_resumed_gan_ends_where_the_uninterrupted_run_does(tmp_path: Path) -> None:
    first = GAN()
    trainer = fit(first, tmp_path)  # one epoch of 4 batches; each optimizer steps once per batch
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = GAN()
    fit(resumed, tmp_path, ckpt_path=ckpt, max_epochs=2)
    expected = reference(epochs=2)
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


class Finetune(lwd.WDMixin, L.LightningModule):
    """Automatic optimization over one submodule, with a scheduler; the other is frozen."""

    decay_optimizers = {
        "head": lwd.OptimizerSpec(
            "head",
            partial(torch.optim.SGD, lr=0.1),
            lwd.presets.standard(0.1),
            scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        )
    }
    show_decay_plan = False

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.backbone = nn.Linear(3, 4).requires_grad_(False)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.head(self.backbone(batch[0])).pow(2).mean()


def test_one_named_optimizer_with_automatic_optimization_and_its_scheduler(tmp_path: Path) -> None:
    model = Finetune()
    backbone = model.backbone.weight.detach().clone()
    head = nn.Linear(4, 1)
    head.load_state_dict(model.head.state_dict())
    fit(model, tmp_path, max_epochs=2)
    # reference: SGD over the head, lr halved each epoch, decay p * (1 - lr * 0.1) on its weight only
    for epoch in range(2):
        lr = 0.1 * 0.5**epoch
        for (x,) in data():
            head.zero_grad()
            head(x @ backbone.T + model.backbone.bias).pow(2).mean().backward()
            with torch.no_grad():
                for p in head.parameters():
                    p.sub_(lr * p.grad)
                head.weight.mul_(1 - lr * 0.1)
    torch.testing.assert_close(model.head.weight, head.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head.bias, head.bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.backbone.weight, backbone)
    (group_names,) = [[g["name"] for g in o.param_groups] for o in [model.trainer.optimizers[0]]]
    assert group_names == ["head/no_decay", "head/decay"]


def test_the_rest_entry_takes_every_parameter_no_other_entry_names() -> None:
    class Model(GAN):
        decay_optimizers = {
            "discriminator": lwd.OptimizerSpec("discriminator"),
            "rest": lwd.OptimizerSpec(None, partial(torch.optim.SGD, lr=0.1)),
        }

    opt_d, opt_rest = Model().configure_optimizers()
    assert {n for g in opt_rest.param_groups for n in g["param_names"]} == {
        "generator.0.weight", "generator.0.bias", "generator.1.weight", "generator.1.bias",
        "generator.2.weight", "generator.2.bias",
    }  # fmt: skip
    assert isinstance(opt_d, torch.optim.AdamW) and isinstance(opt_rest, torch.optim.SGD)


def test_build_param_groups_prefix_names_hand_built_optimizers_in_the_logs(tmp_path: Path) -> None:
    class HandBuilt(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.generator, self.discriminator = make_nets()

        training_step = GAN.training_step

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            rules = lwd.presets.standard(WD_G)
            g = lwd.build_param_groups(self.generator, rules, prefix="generator")
            d = lwd.build_param_groups(self.discriminator, lwd.presets.standard(WD_D), prefix="discriminator")
            return [torch.optim.SGD(g, lr=LR_G), torch.optim.SGD(d, lr=LR_D)]

    model = HandBuilt()
    logger = CSVLogger(tmp_path, name="hand")
    fit(model, tmp_path, logger=logger, log_every_n_steps=1)
    expected = reference()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "wd/generator/decay/param_norm" in header and "wd/discriminator/no_decay/param_norm" in header


@pytest.mark.parametrize(
    ("specs", "error", "match"),
    [
        ({}, TypeError, "non-empty mapping"),
        ({"g": "generator"}, TypeError, r"decay_optimizers\['g'\]` must be an lwd.OptimizerSpec"),
        ({"a/b": lwd.OptimizerSpec("generator")}, TypeError, "without '/'"),
        ({"g": lwd.OptimizerSpec("gen")}, ValueError, r"names submodule 'gen'.*\['generator', 'discriminator'\]"),
        (
            {"g": lwd.OptimizerSpec("generator"), "all": lwd.OptimizerSpec(["generator", "discriminator"])},
            ValueError,
            "belongs to both optimizer 'g' and 'all'",
        ),
        ({"g": lwd.OptimizerSpec("generator")}, ValueError, r"leaves 4 trainable parameter\(s\) out.*discriminator"),
        ({"a": lwd.OptimizerSpec(None), "b": lwd.OptimizerSpec(None)}, TypeError, "at most one can"),
    ],
)
def test_bad_decay_optimizers_are_refused_before_anything_is_built(specs: dict, error: type, match: str) -> None:
    model = GAN()
    model.decay_optimizers = specs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        model.configure_optimizers()
    assert not hasattr(model, "decay_plans")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modules": 3}, "`modules` must be an attribute path"),
        ({"modules": []}, "`modules` must be an attribute path"),
        ({"modules": "g", "optimizer": torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)}, "`optimizer` must be"),
        ({"modules": "g", "rules": ["bias"]}, "rules"),
    ],
)
def test_optimizer_spec_checks_its_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        lwd.OptimizerSpec(**kwargs)


def test_lr_attribute_with_several_optimizers_warns_that_it_is_not_used() -> None:
    model = GAN()
    model.lr = 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt_g, opt_d = model.configure_optimizers()
    assert any("`lr` is not used" in str(w.message) for w in caught)
    assert [g["lr"] for g in opt_g.param_groups + opt_d.param_groups] == [LR_G, LR_G, LR_D, LR_D]


class TracedPair(lwd.WDMixin, L.LightningModule):
    """Free matrices used in ``forward``: only the trace of ``example_input_array`` says they are weights."""

    show_decay_plan = False
    forwards = 0
    decay_optimizers = {
        "encoder": lwd.OptimizerSpec("encoder", partial(torch.optim.SGD, lr=0.1), lwd.presets.standard(0.1)),
        "rest": lwd.OptimizerSpec(None, partial(torch.optim.SGD, lr=0.1), lwd.presets.standard(0.2)),
    }

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Module()
        self.encoder.U = nn.Parameter(torch.randn(3, 4))
        self.encoder.gain = nn.Parameter(torch.ones(4))
        self.V = nn.Parameter(torch.randn(4, 2))
        self.example_input_array = torch.zeros(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).forwards += 1
        return (x @ self.encoder.U * self.encoder.gain) @ self.V


def test_several_optimizers_share_one_traced_forward_pass() -> None:
    TracedPair.forwards = 0
    model = TracedPair()
    opt_encoder, opt_rest = model.configure_optimizers()
    assert TracedPair.forwards == 1
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in opt_encoder.param_groups] == [
        ("encoder/no_decay", 0.0, ["encoder.gain"]),
        ("encoder/decay", 0.1, ["encoder.U"]),
    ]
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in opt_rest.param_groups] == [
        ("rest/decay", 0.2, ["V"])
    ]
