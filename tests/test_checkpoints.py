"""Checkpoints: plain data only, and the decay survives every combination of writing and resuming.

* Everything the package puts in a checkpoint (the callback's state, the ``lwd_*`` keys of the
  optimizer groups, rules saved with a module's hyper-parameters) loads with
  ``torch.load(weights_only=True)``; a tampered rule is refused on load.
* Each group's λ is its own ``weight_decay`` in every checkpoint: written without the callback and
  resumed with it, the callback decays with it; written with the callback and resumed without it,
  the optimizer applies it itself. Checkpoints of older releases, which kept λ under
  ``lwd_weight_decay`` with ``weight_decay`` 0, get it back either way.

Each resumed step is checked against the documented formula: the callback's decoupled decay
(``StepRecorder``) or SGD's own coupled decay ``p <- p - lr (g + λ p)`` (``CoupledSGDCheck``).
"""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn

import lightning_wd as lwd
from lightning_wd import schedules
from tests.callback_helpers import DECAYED, WD, Net, PlainNet, StepRecorder, TwoOptNet, WDNet, loader, trainer

WDS = dict.fromkeys(DECAYED, WD)
PLAIN = (type(None), bool, int, float, str, Tensor)


def assert_plain(value: Any, where: str = "") -> None:
    """Only builtin containers of numbers, strings, None and tensors."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            assert_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert isinstance(value, PLAIN), f"{where}: {type(value).__name__} {value!r}"


class HParamsNet(lwd.WDMixin, L.LightningModule):
    """Rules as an init argument saved with the hyper-parameters (the LightningCLI way)."""

    show_decay_plan = False

    def __init__(self, decay_rules: Any = None, lr: float = 1e-2) -> None:
        super().__init__(decay_rules=decay_rules)
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = Net()
        self.optimizer = partial(torch.optim.AdamW, lr=lr)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


RULES = [
    lwd.DecayRule("norms", 0.0, modules="*Norm*", group="no_decay"),
    lwd.DecayRule("head", 0.2, params="net.fc2.*", max_ndim=2, lr_scale=0.5),
    *lwd.presets.standard(WD),
]


def test_everything_the_package_writes_loads_with_weights_only(tmp_path):
    cb = lwd.WeightDecayCallback(mode="lr_ratio", schedule=schedules.Cosine(start=1.0, end=0.1))
    t = trainer(tmp_path, [cb], max_epochs=2)
    t.fit(HParamsNet(decay_rules=RULES), loader())
    path = tmp_path / "run.ckpt"
    t.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][cb.state_key]
    assert state == {"version": 2, "engines": [{"version": 2, "steps": 10, "total_steps": 10}]}
    assert_plain(state, "callback")
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert_plain(groups, "param_groups")
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"no_decay", "head", "decay"}
    for name, wd in (("no_decay", 0.0), ("head", 0.2), ("decay", WD)):
        assert by_name[name]["weight_decay"] == wd  # λ where every tool reads it
        assert by_name[name]["lwd_planned"] is True
        assert not {"lwd_weight_decay", "lwd_planned_weight_decay", "lr_scale"} & set(by_name[name])
    assert by_name["head"]["lr"] == pytest.approx(0.5e-2)  # lr_scale 0.5 of the optimizer's 1e-2, applied once
    # the rules saved with the hyper-parameters come back equal, and a module rebuilt from them plans the same
    assert checkpoint["hyper_parameters"]["decay_rules"] == RULES
    restored = HParamsNet.load_from_checkpoint(path)
    assert restored.decay_rules == RULES
    assert [(g["name"], g["param_names"]) for g in restored.configure_optimizers().param_groups] == [
        ("no_decay", ["net.fc1.bias", "net.norm.weight", "net.norm.bias"]),
        ("head", ["net.fc2.weight", "net.fc2.bias"]),  # first match: the head rule claims its bias too
        ("decay", ["net.fc1.weight"]),
    ]


def test_callback_state_with_several_optimizers_is_plain(tmp_path):
    cb = lwd.WeightDecayCallback(rules=lwd.presets.standard(WD))
    t = trainer(tmp_path, [cb])
    t.fit(TwoOptNet(), loader())
    t.save_checkpoint(tmp_path / "two.ckpt")
    checkpoint = torch.load(tmp_path / "two.ckpt", weights_only=True)
    assert checkpoint["callbacks"][cb.state_key] == {
        "version": 2,
        "engines": [{"version": 2, "steps": 5, "total_steps": None}, {"version": 2, "steps": 3, "total_steps": None}],
    }
    for opt_state in checkpoint["optimizer_states"]:
        assert_plain(opt_state["param_groups"], "param_groups")
    assert_plain(cb.state_dict())


def test_tampered_rule_in_a_checkpoint_is_refused_on_load():
    rule = lwd.DecayRule("decay", 0.1)
    object.__setattr__(rule, "weight_decay", -1.0)  # as a hand-edited file could hold
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": {"decay_rules": [rule]}}, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match="`weight_decay` must be >= 0"):
        torch.load(buffer, weights_only=True)


def test_rules_with_user_code_are_not_loaded_by_weights_only():
    """A predicate of the user's is code: ``weights_only`` refuses it instead of importing it."""
    rule = lwd.DecayRule("custom", 0.1, predicate=_user_predicate)
    buffer = io.BytesIO()
    torch.save([rule], buffer)
    buffer.seek(0)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(buffer, weights_only=True)


def _user_predicate(name: str, param: Tensor, module: nn.Module) -> bool:
    return name.endswith("weight")


# ---------------------------------------------------------------- resume across the callback's presence
class CoupledSGDCheck(L.Callback):
    """Every step is plain SGD with its own decay: ``p <- p - lr (g + λ p)`` (torch's documented update)."""

    def __init__(self, wds: dict[str, float]) -> None:
        self.wds = wds
        self.checked = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.lr = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for name, p in pl_module.named_parameters():
            before, lr, wd = self.before[name], self.lr[name], self.wds.get(name, 0.0)
            expected = before - lr * (p.grad + wd * before)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        self.checked += 1


def _groups(t: L.Trainer) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in t.optimizers[0].param_groups}


def test_checkpoint_without_callback_resumes_with_callback(tmp_path):
    """The optimizer decayed by itself; on resume the callback decays with the same λ, after the step."""
    coupled = CoupledSGDCheck(WDS)
    first = trainer(tmp_path, [coupled], max_epochs=1)
    first.fit(WDNet(), loader())
    assert coupled.checked == 5
    first.save_checkpoint(tmp_path / "plain.ckpt")

    recorder = StepRecorder(WDS, mode="decoupled")
    second = trainer(tmp_path, [lwd.WeightDecayCallback(), recorder], max_epochs=2)
    second.fit(WDNet(), loader(), ckpt_path=str(tmp_path / "plain.ckpt"))
    assert recorder.checked == 5  # every resumed step: optimizer without decay, then the callback's decay
    groups = _groups(second)
    assert groups["decay"]["weight_decay"] == WD and groups["no_decay"]["weight_decay"] == 0.0


def test_checkpoint_with_callback_resumed_without_it_keeps_the_decay(tmp_path):
    """The checkpoint holds λ in each group's weight_decay: without the callback the optimizer applies it."""
    recorder = StepRecorder(WDS, mode="decoupled")
    first = trainer(tmp_path, [lwd.WeightDecayCallback(), recorder], max_epochs=1)
    first.fit(WDNet(), loader())
    assert recorder.checked == 5 and _groups(first)["decay"]["weight_decay"] == WD
    first.save_checkpoint(tmp_path / "callback.ckpt")
    saved = torch.load(tmp_path / "callback.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["weight_decay"]) for g in saved] == [("no_decay", 0.0), ("decay", WD)]

    coupled = CoupledSGDCheck(WDS)
    second = trainer(tmp_path, [coupled], max_epochs=2)
    second.fit(WDNet(), loader(), ckpt_path=str(tmp_path / "callback.ckpt"))
    assert coupled.checked == 5  # every resumed step decays, through the optimizer


def _legacy_checkpoint(tmp_path: Any) -> str:
    """A checkpoint as older releases wrote it: λ under ``lwd_weight_decay``, the group's own weight_decay 0."""
    first = trainer(tmp_path, [lwd.WeightDecayCallback()], max_epochs=1)
    first.fit(WDNet(), loader())
    first.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    for g in checkpoint["optimizer_states"][0]["param_groups"]:
        wd = g["weight_decay"]
        del g["lwd_planned"]
        g.update(weight_decay=0.0, lwd_weight_decay=wd, lwd_planned_weight_decay=wd)
    for key in list(checkpoint["callbacks"]):
        checkpoint["callbacks"][key] = {"version": 1, "steps": [5], "total_steps": None}
    torch.save(checkpoint, tmp_path / "legacy.ckpt")
    return str(tmp_path / "legacy.ckpt")


def test_legacy_checkpoint_resumed_without_the_callback_gets_its_decay_back(tmp_path):
    ckpt = _legacy_checkpoint(tmp_path)
    coupled = CoupledSGDCheck(WDS)
    second = trainer(tmp_path, [coupled], max_epochs=2)
    with pytest.warns(UserWarning, match=r"kept their decay under `lwd_weight_decay`.*decay=0.3"):
        second.fit(WDNet(), loader(), ckpt_path=ckpt)
    assert coupled.checked == 5
    assert _groups(second)["decay"]["weight_decay"] == WD and "lwd_weight_decay" not in _groups(second)["decay"]


def test_legacy_checkpoint_resumed_with_the_callback_gets_its_decay_back(tmp_path):
    ckpt = _legacy_checkpoint(tmp_path)
    recorder = StepRecorder(WDS, mode="decoupled")
    cb = lwd.WeightDecayCallback()
    second = trainer(tmp_path, [cb, recorder], max_epochs=2)
    second.fit(WDNet(), loader(), ckpt_path=ckpt)
    assert recorder.checked == 5 and [e.steps for e in cb.engines] == [10]
    assert _groups(second)["decay"]["weight_decay"] == WD


def test_resume_with_other_decay_rules_says_which_lambda_is_used(tmp_path):
    first = trainer(tmp_path, [lwd.WeightDecayCallback()], max_epochs=1)
    first.fit(WDNet(), loader())
    first.save_checkpoint(tmp_path / "a.ckpt")
    changed = WDNet()
    changed.decay_rules = lwd.presets.standard(0.05)
    recorder = StepRecorder(WDS, mode="decoupled")  # the checkpoint's λ, as torch keeps the checkpoint's lr
    second = trainer(tmp_path, [lwd.WeightDecayCallback(), recorder], max_epochs=2)
    with pytest.warns(UserWarning, match=r"'decay': 0.3 \(rules: 0.05\).*checkpoint's optimizer state wins"):
        second.fit(changed, loader(), ckpt_path=str(tmp_path / "a.ckpt"))
    assert recorder.checked == 5


def test_plain_module_checkpoint_carries_no_plan_keys(tmp_path):
    """A plain optimizer's groups, decayed through ``rules=``, keep their own weight_decay (0) and no lambda key."""
    cb = lwd.WeightDecayCallback(rules=lwd.presets.standard(WD))
    t = trainer(tmp_path, [cb])
    t.fit(PlainNet(), loader())
    t.save_checkpoint(tmp_path / "p.ckpt")
    (group,) = torch.load(tmp_path / "p.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert group["weight_decay"] == 0.0 and "lwd_weight_decay" not in group
    assert set(k for k in group if k.startswith("lwd_")) <= {"lwd_initial_lr"}
