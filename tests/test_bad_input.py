"""Bad input, argument by argument: every public argument has a row, every row checks the whole contract.

Each row of ``ROWS`` is ``(owner, argument, callable, kwargs, error, match)``. The test calls
``callable(**kwargs)`` and asserts that

* it raises exactly ``error`` (``PlanError`` is a ``ValueError``, ``MisconfigurationException``
  what Lightning's own callbacks raise for what needs the trainer);
* the message names ``argument`` in backticks and matches ``match``, which holds the fix the
  message must offer (or, for unknown strings, the list of valid choices);
* every module and optimizer involved is exactly as it was (values, identity and
  ``requires_grad`` of each parameter, buffers; optimizer groups).

Rows whose owner is a Trainer-level object run a real ``Trainer.fit`` and assert that the
error came at fit start: zero optimizer steps, the optimizer's groups as ``configure_optimizers``
built them. ``test_every_public_argument_has_a_row`` reads the public signatures, so a new
argument cannot skip the table.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lightning_wd as lwd
from lightning_wd import functional as F
from lightning_wd import presets, schedules
from lightning_wd.plan import PlanError
from tests.callback_helpers import Net, PlainNet, WDNet, loader

R = lwd.DecayRule
#: Words by which a message says what to do; each row's ``match`` pins the exact advice.
FIX = re.compile(
    r"\b(use|pass|give|set|remove|rename|check|write|shorten|split|swap|drop|run|mark|make|build|bind|decode|"
    r"fix|add|start|list|put|declare|wrap|return|delete|choose|for example|such as)\b",
    re.IGNORECASE,
)


# ---------------------------------------------------------------- models, built when a row runs
class Fresh:
    """A value built when the row runs (so every row gets its own model)."""

    def __init__(self, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.factory, self.args, self.kwargs = factory, args, kwargs

    def build(self) -> Any:
        return self.factory(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"Fresh({getattr(self.factory, '__name__', self.factory)})"


def lazy_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))


def frozen_net() -> nn.Module:
    return Net().requires_grad_(False)


class InitNet(lwd.WDMixin, L.LightningModule):
    """Passes ``decay_rules`` / ``decay_plan_options`` through ``WDMixin.__init__`` (the LightningCLI way)."""

    show_decay_plan = False

    def __init__(self, decay_rules: Any = None, decay_plan_options: Any = None) -> None:
        super().__init__(decay_rules=decay_rules, decay_plan_options=decay_plan_options)
        self.net = Net()


class LazyWDNet(WDNet):
    """A WDMixin module whose last layer is lazy, never run before the optimizer is configured."""

    def __init__(self) -> None:
        super().__init__()
        self.net.fc2 = nn.LazyLinear(2)


class TwoNamedGroups(PlainNet):
    """Two optimizer groups with the same ``name``."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [
                {"params": self.net.fc1.parameters(), "name": "same"},
                {"params": list(self.net.norm.parameters()) + list(self.net.fc2.parameters()), "name": "same"},
            ],
            lr=0.1,
        )


class ZeroLrNet(WDNet):
    def __init__(self) -> None:
        super().__init__(optimizer=partial(torch.optim.SGD, lr=0.0))


class Endless(IterableDataset):
    """An iterable of unknown length: the trainer cannot estimate the number of steps."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            yield torch.randn(6, generator=g), torch.randn(2, generator=g)


def mixin(**attrs: Any) -> WDNet:
    """A WDNet with attributes set after construction, as a subclass's class attributes would be."""
    model = WDNet()
    for key, value in attrs.items():
        setattr(model, key, value)
    return model


def configure(model: lwd.WDMixin) -> Any:
    return model.configure_optimizers()


def negative(step: int) -> float:
    return -1.0


def not_a_number(step: int) -> float:
    return math.nan


# ---------------------------------------------------------------- snapshots
class ModuleSnapshot:
    """Values, identity and ``requires_grad`` of every parameter and buffer of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.state = {
            k: None if isinstance(v, nn.parameter.UninitializedTensorMixin) else v.detach().clone()
            for k, v in module.state_dict(keep_vars=True).items()
        }
        self.identity = [(n, id(p), p.requires_grad) for n, p in module.named_parameters(remove_duplicate=False)]
        self.lazy = [n for n, p in module.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]

    def assert_unchanged(self) -> None:
        module = self.module
        assert [(n, id(p), p.requires_grad) for n, p in module.named_parameters(remove_duplicate=False)] == (
            self.identity
        )
        state = module.state_dict(keep_vars=True)
        assert list(state) == list(self.state)
        for key, value in state.items():
            if isinstance(value, nn.parameter.UninitializedTensorMixin):
                assert key in self.lazy and self.state[key] is None
                continue
            assert torch.equal(value.detach(), self.state[key]), f"{key} changed"


def groups_snapshot(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    out = []
    for group in optimizer.param_groups:
        g = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        g["params"] = [id(p) for p in group["params"]]
        out.append(g)
    return out


class Watch(L.Callback):
    """Counts optimizer steps and snapshots the optimizers just after ``configure_optimizers``."""

    def __init__(self) -> None:
        self.steps = 0
        self.groups: list[list[dict[str, Any]]] | None = None
        self.states: list[dict[Any, Any]] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.groups = [groups_snapshot(o) for o in trainer.optimizers]
        self.states = [copy.deepcopy(dict(o.state)) for o in trainer.optimizers]

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps += 1


def fit(model: L.LightningModule, callbacks: list[L.Callback] = (), data: Any = None, **trainer_kw: Any) -> None:
    """``Trainer.fit`` that must fail at fit start: no optimizer step, optimizers as they were built."""
    watch = Watch()
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(trainer_kw)
    trainer = L.Trainer(callbacks=[*callbacks, watch], **options)
    try:
        trainer.fit(model, data if data is not None else loader())
    except BaseException:
        assert watch.steps == 0, "the error came after an optimizer step"
        assert trainer.global_step == 0
        if watch.groups is not None:  # the optimizers existed: they are as configure_optimizers built them
            assert [groups_snapshot(o) for o in trainer.optimizers] == watch.groups
            assert [dict(o.state) for o in trainer.optimizers] == watch.states
        raise


# ---------------------------------------------------------------- the table
ROWS: list[Any] = []


def case(owner: str, argument: str, func: Callable[..., Any], kwargs: dict[str, Any], error: type, match: str) -> None:
    n = sum(1 for r in ROWS if r.values[:2] == (owner, argument))
    ROWS.append(pytest.param(owner, argument, func, kwargs, error, match, id=f"{owner}-{argument}-{n}"))


def rule(**kw: Any) -> dict[str, Any]:
    return {"name": "r", "weight_decay": 0.1, **kw}


# DecayRule
for kwargs, error, match in [
    (dict(name=1, weight_decay=0.1), TypeError, "Use for example 'no_decay_norms'"),
    (dict(name="", weight_decay=0.1), ValueError, "use for example 'no_decay_norms'"),
    (dict(name="no decay", weight_decay=0.1), ValueError, "letters, digits.*use for example"),
    (dict(name=None, weight_decay=0.1), TypeError, "Use for example"),
]:
    case("DecayRule", "name", R, kwargs, error, match)
for value, error, match in [
    ("0.1", TypeError, "got str '0.1'. Pass a Python float such as 0.05"),
    (True, TypeError, "got bool True. Pass a Python float"),
    (None, TypeError, "Pass a Python float"),
    (torch.tensor(0.1), TypeError, "got Tensor.*Pass a Python float"),
    (math.nan, ValueError, "must be finite, got nan. Use a finite value"),
    (math.inf, ValueError, "must be finite, got inf. Use a finite value"),
    (-0.1, ValueError, "must be >= 0, got -0.1.*use 0.0 for no decay"),
]:
    case("DecayRule", "weight_decay", R, dict(name="r", weight_decay=value), error, match)
for value, error, match in [
    (3, TypeError, "got int 3. Pass for example"),
    ({"*Norm*"}, TypeError, "set.*not deterministic. Pass a list"),
    (frozenset({nn.LayerNorm}), TypeError, "not deterministic. Pass a list"),
    ([], ValueError, "empty list.*Pass None for no module matcher"),
    ([3], TypeError, "must be classes or strings.*Write a glob such as"),
    (int, TypeError, "not a subclass of torch.nn.Module. Give module classes"),
    ("", ValueError, "empty pattern. Remove it"),
    ("x" * 300, ValueError, "longer than the limit of 256 characters. Shorten it"),
    ("lwd_no_such_package.sub.Norm", ValueError, "no prefix of it can be imported. Give an importable path"),
    ("torch.nn.Linearr", ValueError, "has no attribute 'Linearr'. Check the spelling"),
    ("os.path.join", TypeError, "not a class. Import paths may only name module classes: give one"),
    ("math.pi", TypeError, "resolves to float.*not a class.*give one such as 'torch.nn.Linear'"),
    ("os.path", TypeError, "resolves to module.*not a class"),
    ("collections.OrderedDict", TypeError, "not a torch.nn.Module subclass. Give a module class"),
    (b"Linear", TypeError, "must be str, not bytes.*Decode them"),
]:
    case("DecayRule", "modules", R, rule(modules=value), error, match)
for value, error, match in [
    (3, TypeError, "got int 3. Pass for example"),
    ([1], TypeError, "glob strings or compiled regular expressions.*Write for example"),
    (b"*.bias", TypeError, "must be str, not bytes"),
    ({"*.bias"}, TypeError, "Pass a list or a tuple"),
    ([], ValueError, "empty list.*list at least one glob"),
    ("", ValueError, "empty pattern. Remove it, or use '\\*'"),
    ("*" * 10_000, ValueError, "length 10000 is longer than the limit of 256 characters. Shorten it"),
    (re.compile("a" * 300), ValueError, "longer than the limit of 256.*Shorten it"),
]:
    case("DecayRule", "params", R, rule(params=value), error, match)
for argument in ("min_ndim", "max_ndim"):
    for value, error, match in [
        (1.5, TypeError, "must be an int or None, got float 1.5. Pass for example 2"),
        ("2", TypeError, "Pass for example 2, or None"),
        (True, TypeError, "got bool True"),
        (-1, ValueError, "must be >= 0, got -1. Use None for no bound"),
    ]:
        case("DecayRule", argument, R, rule(**{argument: value}), error, match)
case("DecayRule", "min_ndim", R, rule(min_ndim=3, max_ndim=1), ValueError, "greater than `max_ndim`.*Swap them")
case("DecayRule", "predicate", R, rule(predicate=3), TypeError, "must be callable.*Pass a module-level function")
case("DecayRule", "predicate", R, rule(predicate="lambda n, p, m: True"), TypeError, "got str.*Pass a module-level")
for value, error, match in [
    (0, ValueError, "must be > 0, got 0.0. Use 1.0 to keep the optimizer's learning rate"),
    (-2.0, ValueError, "must be > 0.*Use 1.0"),
    (math.nan, ValueError, "must be finite.*Use a finite value such as 1.0"),
    ("2", TypeError, "Pass a Python float such as 1.0"),
]:
    case("DecayRule", "lr_scale", R, rule(lr_scale=value), error, match)
for value, error, match in [
    (3, TypeError, "must be None or a string, got int 3. Use a group name such as 'decay'"),
    ("", ValueError, "non-empty string.*Use for example 'decay'"),
    ("my group", ValueError, "letters, digits.*Use for example 'decay'"),
]:
    case("DecayRule", "group", R, rule(group=value), error, match)
case("DecayRule", "optional", R, rule(optional="yes"), TypeError, "must be a bool, got str 'yes'. Pass True or False")
case("DecayRule", "optional", R, rule(optional=1), TypeError, "Pass True or False")

# presets
for name in ("standard", "gpt", "uniform"):
    func = getattr(presets, name)
    for value, error, match in [
        (-0.1, ValueError, "must be >= 0.*use 0.0 for no decay"),
        (math.nan, ValueError, "must be finite.*Use a finite value"),
        ("0.1", TypeError, "Pass a Python float"),
        (None, TypeError, "Pass a Python float"),
    ]:
        case(f"presets.{name}", "weight_decay", func, dict(weight_decay=value), error, match)
for value, error, match in [
    (0.0, ValueError, "must be > 0.*Use 1.0"),
    (math.inf, ValueError, "must be finite"),
    ("1", TypeError, "Pass a Python float such as 1.0"),
]:
    case("presets.standard", "lr_scale", presets.standard, dict(lr_scale=value), error, match)

for argument, kwargs, error, match in [
    ("name", dict(name="standart"), ValueError, r"`name` must be one of \['gpt', 'none', 'standard', 'uniform'\]"),
    ("name", dict(name=3), TypeError, "must be a string, got int 3. Use for example 'standard'"),
    ("weight_decay", dict(name="none", weight_decay=0.1), ValueError, "decays nothing, so it takes no `weight_decay`"),
    ("weight_decay", dict(name="uniform"), ValueError, "needs its λ: pass `weight_decay`, for example 0.01"),
    ("weight_decay", dict(weight_decay=-1.0), ValueError, "must be >= 0.*use 0.0 for no decay"),
    ("lr_scale", dict(name="gpt", lr_scale=0.5), ValueError, "Add a DecayRule with lr_scale to `before` instead"),
    ("lr_scale", dict(lr_scale=0.0), ValueError, "must be > 0.*Use 1.0"),
    ("before", dict(before=["bias"]), ValueError, "`before` must be a list of lwd.DecayRule.*Build each"),
    ("after", dict(after=R("a", 0.1)), ValueError, "`after` must be a list of lwd.DecayRule"),
]:
    case("presets.Preset", argument, presets.Preset, kwargs, error, match)

# traced roles: the rule matcher, the plan's inputs, the mixin's switch
for value, error, match in [
    (3, TypeError, r"`roles` must be a role or a non-empty list of roles, got int 3\. Pass for example 'linear'"),
    ([], TypeError, "non-empty list of roles.*Pass for example"),
    ("weight", ValueError, "`roles` entry 'weight' is not a role; use any of the following"),
]:
    case("DecayRule", "roles", R, rule(roles=value), error, match)

# build_param_groups and DecayPlan.from_module share the plan options
PLAN_OWNERS: dict[str, Callable[..., Any]] = {
    "build_param_groups": lwd.build_param_groups,
    "DecayPlan.from_module": lwd.DecayPlan.from_module,
}
for owner, func in PLAN_OWNERS.items():
    for argument, kwargs, error, match in [
        ("module", dict(module="model"), TypeError, "got str. Pass the model itself"),
        ("module", dict(module=Fresh(lambda: list(Net().parameters()))), TypeError, "got list. Pass the model"),
        ("module", dict(module=Fresh(lazy_net)), PlanError, "lazy parameter '1.weight'.*Run one forward pass"),
        ("module", dict(module=Fresh(frozen_net)), PlanError, "no trainable parameter.*pass include_frozen=True"),
        ("rules", dict(rules="standard"), TypeError, "list of DecayRule, got str.*Pass for example"),
        ("rules", dict(rules={R("a", 0.1)}), TypeError, "set.*Pass a list, in priority order"),
        ("rules", dict(rules=[R("a", 0.1), "b"]), TypeError, r"`rules\[1\]` must be a DecayRule.*Build it"),
        ("rules", dict(rules=[R("a", 0.1), R("a", 0.2)]), PlanError, "duplicate rule names.*Give every rule"),
        (
            "rules",
            dict(rules=[R("a", 0.1, params="*.weight", group="g"), R("b", 0.2, params="*.bias", group="g")]),
            PlanError,
            "group 'g' is given weight_decay=0.1.*weight_decay=0.2.*give one of the rules a different `group`",
        ),
        (
            "rules",
            dict(rules=[R("a", 0.1, params="*.weight", group="no_decay")]),
            PlanError,
            "by the default group.*give one of the `rules` a different `group`",
        ),
        (
            "rules",
            dict(rules=[R("typo", 0.1, params="*.wieght")], strict=True),
            PlanError,
            r"\['typo'\] claimed no parameter.*mark the rule `optional=True`.*`strict=False`",
        ),
        ("strict", dict(strict=1), TypeError, "must be True or False, got int 1"),
        ("include_frozen", dict(include_frozen="yes"), TypeError, "must be True or False"),
        ("respect_no_weight_decay", dict(respect_no_weight_decay=None), TypeError, "must be True or False"),
        ("merge", dict(merge="no"), TypeError, "must be True or False"),
        ("default_weight_decay", dict(default_weight_decay=-1), ValueError, "must be >= 0.*use 0.0"),
        ("default_weight_decay", dict(default_weight_decay=math.inf), ValueError, "Use a finite value"),
        ("default_weight_decay", dict(default_weight_decay="0"), TypeError, "Pass a Python float"),
        ("default_group", dict(default_group=3), TypeError, "string or None, got int 3. Use for example 'default'"),
        ("default_group", dict(default_group=""), ValueError, "use for example 'default'"),
        ("default_group", dict(default_group="no decay"), ValueError, "letters, digits.*use for example"),
        ("example_inputs", dict(example_inputs=torch.zeros(2, 3)), PlanError, "forward pass of Net.*raised.*Pass"),
        ("example_inputs", dict(example_inputs="x"), PlanError, "on `example_inputs` raised.*or drop them"),
        ("trace", dict(trace={"fc1.weight": "linear"}), TypeError, r"`trace` must be a RoleTrace.*got dict.*Pass"),
        (
            "trace",
            dict(
                trace=Fresh(lambda: lwd.trace.trace_roles(Net(), torch.zeros(2, 6))), example_inputs=torch.zeros(2, 6)
            ),
            ValueError,
            "were both given.*Pass one",
        ),
    ]:
        case(owner, argument, func, {"module": Fresh(Net), **kwargs}, error, match)
    if owner == "build_param_groups":
        for value, error, match in [
            ("1e-3", TypeError, "got str '1e-3'. Pass the lr you give the optimizer"),
            (math.nan, ValueError, "finite number >= 0.*Pass the lr"),
            (-1.0, ValueError, "got float -1.0. Pass the lr"),
        ]:
            case(owner, "lr", func, dict(module=Fresh(Net), lr=value), error, match)
        for value, error, match in [
            ("", TypeError, "`prefix` must be a non-empty string naming the optimizer"),
            (3, TypeError, "got int 3"),
        ]:
            case(owner, "prefix", func, dict(module=Fresh(Net), prefix=value), error, match)
        case(
            owner,
            "lr_scale",
            func,
            dict(module=Fresh(Net), lr_scale=2.0),
            TypeError,
            "unknown option.*use any of the following: default_group, default_weight_decay, include_frozen, merge,"
            " respect_no_weight_decay, strict",
        )

# WDMixin: init arguments, attributes read by configure_optimizers, and fit
for kwargs, error, match in [
    (dict(decay_rules="standard"), TypeError, "list of DecayRule, got str.*Pass for example"),
    (dict(decay_rules=[R("a", 0.1), 3]), TypeError, r"`decay_rules\[1\]` must be a DecayRule.*Build it"),
    (dict(decay_rules=(R("a", 0.1), R("a", 0.0))), PlanError, "duplicate rule names.*Give every rule"),
]:
    case("WDMixin", "decay_rules", InitNet, kwargs, error, match)
case("WDMixin", "decay_rules", configure, dict(model=Fresh(mixin, decay_rules=[1])), TypeError, r"\[0\].*Build it")
case(
    "WDMixin",
    "decay_rules",
    fit,
    dict(model=Fresh(mixin, decay_rules=[R("typo", 0.1, params="net.fc3.*")], decay_plan_options={"strict": True})),
    PlanError,
    r"\['typo'\] claimed no parameter of WDNet.*mark the rule `optional=True`",
)
case("WDMixin", "decay_rules", fit, dict(model=Fresh(LazyWDNet)), PlanError, "lazy parameter 'net.fc2.weight'.*Run one")
for func, kwargs, error, match in [
    (InitNet, dict(decay_plan_options=[("merge", True)]), TypeError, "must be a mapping such as {'merge': True}"),
    (InitNet, dict(decay_plan_options={"stict": True}), TypeError, "unknown option.*`stict`.*use any of the following"),
    (configure, dict(model=Fresh(mixin, decay_plan_options="merge")), TypeError, "must be a mapping such as"),
    (fit, dict(model=Fresh(mixin, decay_plan_options={"lr": 1.0})), TypeError, "`lr`; use any of the following"),
]:
    case("WDMixin", "decay_plan_options", func, kwargs, error, match)
case("WDMixin", "strict", InitNet, dict(decay_plan_options={"strict": "yes"}), TypeError, "must be True or False")
for value, error, match in [
    (torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), TypeError, "must be a callable.*for example"),
    ("adamw", TypeError, "must be a callable that takes parameter groups \\(for example functools.partial"),
    (lambda groups: list(groups), TypeError, "returned list, not a torch.optim.Optimizer. It must build"),
    (
        lambda groups: torch.optim.SGD(groups[:1], lr=0.1),
        MisconfigurationException,
        "dropped some of the parameter groups.*Make `optimizer` pass its argument straight",
    ),
    (partial(torch.optim.AdamW, lrr=0.1), TypeError, "raised TypeError.*unexpected keyword.*bind them"),
    (partial(torch.optim.SGD, lr=-1.0), ValueError, "raised ValueError.*Invalid learning rate.*Make it a callable"),
    (
        partial(torch.optim.LBFGS, lr=0.5),
        ValueError,
        "per-parameter options.*takes a single group.*WeightDecayCallback\\(rules=",
    ),
]:
    case("WDMixin", "optimizer", configure, dict(model=Fresh(mixin, optimizer=value)), error, match)
case("WDMixin", "optimizer", fit, dict(model=Fresh(mixin, optimizer="sgd")), TypeError, "must be a callable")
for value, error, match in [
    ("cosine", TypeError, "must be None, a callable taking the optimizer \\(for example"),
    ({"interval": "step"}, ValueError, "has no 'scheduler' key. Use \\{'scheduler'"),
    (lambda opt: 3, TypeError, "returned int, which has no step\\(\\); return an LR scheduler"),
    (torch.optim.lr_scheduler.StepLR, TypeError, "step_size.*bind them with functools.partial"),
]:
    case("WDMixin", "scheduler", configure, dict(model=Fresh(mixin, scheduler=value)), error, match)
case("WDMixin", "scheduler", fit, dict(model=Fresh(mixin, scheduler="cosine")), TypeError, "a callable taking")
case("WDMixin", "show_decay_plan", configure, dict(model=Fresh(mixin, show_decay_plan="no")), TypeError, "Pass a bool")
case(
    "WDMixin",
    "contiguous_parameters",
    configure,
    dict(model=Fresh(mixin, contiguous_parameters=1)),
    TypeError,
    r"`contiguous_parameters` must be True or False, got int 1\. Pass a bool",
)
case("WDMixin", "trace_roles", configure, dict(model=Fresh(mixin, trace_roles="yes")), TypeError, "Pass a bool")
Spec = lwd.OptimizerSpec
for value, error, match in [
    ({}, TypeError, "non-empty mapping from the optimizer's name to lwd.OptimizerSpec"),
    ({"a": "net"}, TypeError, r"`decay_optimizers\['a'\]` must be an lwd.OptimizerSpec.*Write lwd.OptimizerSpec"),
    ({"a/b": Spec("net")}, TypeError, "names \\(non-empty strings without '/'\\)"),
    ({"a": Spec("nett")}, ValueError, r"names submodule 'nett', which WDNet does not have.*\['net'\]"),
    ({"a": Spec("net.fc1")}, ValueError, r"leaves 4 trainable parameter\(s\) out of every optimizer.*give one entry"),
    ({"a": Spec("net"), "b": Spec("net.fc1")}, ValueError, "belongs to both optimizer 'a' and 'b'.*Give each"),
    ({"a": Spec(None), "b": Spec(None)}, TypeError, r"\['a', 'b'\] all have modules=None.*Give the others"),
]:
    case("WDMixin", "decay_optimizers", configure, dict(model=Fresh(mixin, decay_optimizers=value)), error, match)
case(
    "WDMixin",
    "decay_optimizers",
    fit,
    dict(model=Fresh(mixin, decay_optimizers={"a": Spec("net", optimizer=lambda groups: [])})),
    TypeError,
    r"`decay_optimizers\['a'\].optimizer` returned list, not a torch.optim.Optimizer",
)

# WeightDecayCallback: arguments, then what needs the trainer (at fit start)
CB = lwd.WeightDecayCallback
MODES = "use any of the following: 'decoupled', 'lr_ratio', 'independent', 'relative'"
for value in ("adamw", "Decoupled", 1, None):
    case("WeightDecayCallback", "mode", CB, dict(mode=value), ValueError, MODES)
for value, error, match in [
    ("standard", TypeError, "list of DecayRule, got str.*Pass for example lwd.presets.standard"),
    (presets.standard, TypeError, "got function.*Pass for example"),
    ({R("a", 0.1)}, TypeError, "Pass a list, in priority order"),
    ([R("a", 0.1), None], TypeError, r"`rules\[1\]`.*Build it"),
    ([R("a", 0.1), R("a", 0.1)], PlanError, "duplicate rule names.*Give every rule a unique `name`"),
    ([R("a", 0.1, group="g"), R("b", 0.0, group="g")], PlanError, "give one of the rules a different `group`"),
]:
    case("WeightDecayCallback", "rules", CB, dict(rules=value), error, match)
for value in (3, 0, "1", True, 2.5):
    case("WeightDecayCallback", "ord", CB, dict(ord=value), ValueError, "use any of the following: 1, 2")
for argument in ("cautious", "log_norms", "log_grad_norm", "log_update_norm"):
    for value in ("yes", 1, None):
        case("WeightDecayCallback", argument, CB, {argument: value}, TypeError, "must be True or False.*Pass a bool")
for value in ("yes", 1, 0.0):
    case("WeightDecayCallback", "fused", CB, {"fused": value}, TypeError, "must be None.*True or False.*bool or None")
case("WeightDecayCallback", "fused", CB, dict(fused=True), ValueError, "needs cautious=True.*or drop fused")
for kwargs, match in [
    (dict(mode="relative", source="gradient"), "use any of the following: 'grad', 'params', 'update'"),
    (dict(mode="decoupled", source="grad"), "only apply to mode='relative'.*Use mode='relative' or drop them"),
]:
    case("WeightDecayCallback", "source", CB, kwargs, ValueError, match)
for kwargs, match in [
    (dict(mode="relative", metric="l2"), "use any of the following: 'mean_abs', 'rms'"),
    (dict(mode="independent", metric="rms"), "Use mode='relative' or drop them"),
]:
    case("WeightDecayCallback", "metric", CB, kwargs, ValueError, match)
for value in (3, "cosine", [schedules.Constant()]):
    case("WeightDecayCallback", "schedule", CB, dict(schedule=value), TypeError, "callable step -> multiplier.*Cosine")
for callbacks, model, data, error, argument, match in [
    (
        [CB()],
        PlainNet,
        None,
        MisconfigurationException,
        "rules",
        "built from raw parameters.*Pass `rules=`.*build_param_groups",
    ),
    (
        [CB(rules=presets.standard(0.1))],
        Fresh(PlainNet, weight_decay=0.01),
        None,
        MisconfigurationException,
        "weight_decay",
        "decayed twice.*build_param_groups.*give that group weight_decay=0.0",
    ),
    ([CB(mode="lr_ratio")], ZeroLrNet, None, MisconfigurationException, "mode", "starts at lr=0.*use mode='decoupled'"),
    ([CB(schedule=negative)], WDNet, None, MisconfigurationException, "schedule", "returned float -1.0. Fix the sched"),
    ([CB(schedule=not_a_number)], WDNet, None, MisconfigurationException, "schedule", "finite multiplier >= 0"),
    (
        [CB(schedule=schedules.Cosine(start=1.0, end=0.0))],
        WDNet,
        Fresh(DataLoader, Endless(), batch_size=2),
        MisconfigurationException,
        "schedule",
        "Cosine without `total_steps`.*Give Cosine\\(total_steps=...\\)",
    ),
    (
        [CB(rules=presets.standard(0.1))],
        TwoNamedGroups,
        None,
        MisconfigurationException,
        "name",
        r"named \['same/decay', 'same/no_decay'\].*Give each group a unique `name`",
    ),
]:
    model = model if isinstance(model, Fresh) else Fresh(model)
    case("WeightDecayCallback", argument, fit, dict(model=model, callbacks=callbacks, data=data), error, match)

# schedules
for value, error, match in [
    ("1", TypeError, "must be a number, got str '1'. Pass for example 1.0"),
    (-0.5, ValueError, "finite and >= 0, got -0.5. Use a finite value >= 0"),
    (math.nan, ValueError, "Use a finite value"),
    (True, TypeError, "got bool"),
]:
    case("schedules.Constant", "value", schedules.Constant, dict(value=value), error, match)
for value, error, match in [
    (0, ValueError, "finite and >= 1, got 0. Use a finite value >= 1, for example 100"),
    (2.0, TypeError, "must be an int, got float 2.0. Pass for example 100"),
    (None, TypeError, "must be an int"),
]:
    case("schedules.LinearWarmup", "warmup_steps", schedules.LinearWarmup, dict(warmup_steps=value), error, match)
for value, error, match in [
    (-1, ValueError, "Use a finite value >= 0"),
    (math.inf, ValueError, "finite"),
    ("0", TypeError, "Pass"),
]:
    case("schedules.LinearWarmup", "start", schedules.LinearWarmup, dict(warmup_steps=3, start=value), error, match)
for argument in ("start", "end"):
    for value, error, match in [
        (-1.0, ValueError, "Use a finite value >= 0"),
        (math.nan, ValueError, "finite"),
        ("1", TypeError, "Pass for example 1.0"),
    ]:
        case("schedules.Cosine", argument, schedules.Cosine, {argument: value}, error, match)
for value, error, match in [
    (0, ValueError, ">= 1.*for example 100"),
    (1.5, TypeError, "must be an int.*Pass for example 100"),
]:
    case("schedules.Cosine", "total_steps", schedules.Cosine, dict(total_steps=value), error, match)


# ---- lower-level API
# The functional kernels, the role predicates, DecayPlan's views and the schedules' __call__. Tensors are
# built fresh for every row; `test_refused_in_place_calls_leave_every_tensor_as_it_was` reruns the rows of
# the in-place functions and checks that each tensor is bitwise as it was.
def floats(*sizes: int) -> list[torch.Tensor]:
    """Float tensors of the given sizes holding 1, 2, 3, ... in turn (values a decay would change)."""
    out, start = [], 1.0
    for n in sizes:
        out.append(torch.arange(start, start + n))
        start += n
    return out


def with_entry(entry: Any, *sizes: int) -> list[Any]:
    """``floats(*sizes)`` followed by ``entry`` (a non-tensor, or a tensor of another dtype or device)."""
    return [*floats(*sizes), entry]


def scaled_plan() -> lwd.DecayPlan:
    """Net's plan with the norm parameters' learning rate scaled by 0.5."""
    return lwd.DecayPlan.from_module(Net(), [R("norms", 0.0, modules="*Norm*", lr_scale=0.5), R("rest", 0.1)])


def merged_scaled_plan() -> lwd.DecayPlan:
    """Net's plan with two rules scaling the lr by 2, merged into one group ``a+b``."""
    rules = [R("a", 0.1, params="fc1.*", lr_scale=2.0), R("b", 0.1, params="fc2.*", lr_scale=2.0)]
    return lwd.DecayPlan.from_module(Net(), rules, merge=True)


def plain_plan() -> lwd.DecayPlan:
    return lwd.DecayPlan.from_module(Net(), presets.standard(0.1))


TENSOR_LISTS = [  # (value, error, match), refused as `tensors` by every function that takes a list
    (Fresh(with_entry, 0.5, 2), TypeError, r"`tensors\[1\]` is float 0.5\. Pass tensors only"),
    (Fresh(with_entry, None, 2, 3), TypeError, r"`tensors\[2\]` is NoneType None\. Pass tensors only"),
    (Fresh(torch.ones, 3), TypeError, r"got Tensor \(one tensor: wrap it in a list, `\[t\]`\)\. Pass for example"),
    (Fresh(dict, w=torch.ones(2)), TypeError, r"got dict\. Pass for example `list\(model\.parameters\(\)\)`"),
    (3, TypeError, r"must be a list of tensors, got int\. Pass for example"),
]
for name in ("apply_decay_", "flat_view", "global_norm", "group_by_device_and_dtype", "make_contiguous_", "mean_abs"):
    func = getattr(F, name)
    extra = {"step": 0.1} if name == "apply_decay_" else {}
    for value, error, match in TENSOR_LISTS:
        case(f"functional.{name}", "tensors", func, {"tensors": value, **extra}, error, match)
for value, error, match in TENSOR_LISTS[:2]:
    case("functional.rms", "tensors", F.rms, dict(tensors=value), error, match)
for name in ("global_norm", "mean_abs", "rms"):
    case(f"functional.{name}", "tensors", getattr(F, name), dict(tensors=[]), ValueError, "is empty.*Pass at least")

# apply_decay_: every refusal leaves the tensors as they were (checked again below)
DECAY = F.apply_decay_
for value, error, match in [
    (True, TypeError, r"got bool True\. Pass the step size η·λ as a float, for example step=1e-4"),
    (False, TypeError, r"got bool False\. Pass the step size"),
    (-1, ValueError, r"finite number >= 0, got -1 \(a negative step grows the tensors.*Pass the step size"),
    (-1e-4, ValueError, r"got -0\.0001.*for example step=1e-4"),
    (math.nan, ValueError, r"finite number >= 0, got nan.*Pass the step size"),
    (math.inf, ValueError, r"finite number >= 0, got inf"),
    (-math.inf, ValueError, r"got -inf.*or 0\.0 for no decay"),
    ("0.1", TypeError, r"got str '0\.1'\. Pass the step size"),
    (None, TypeError, r"got NoneType None\. Pass"),
    (1j, TypeError, r"got complex 1j\. Pass"),
    (Fresh(torch.full, (2,), 0.1), ValueError, r"got a tensor of shape \(2,\)\. Pass one step size.*reshape"),
    (Fresh(torch.tensor, 1), TypeError, r"got a tensor of dtype torch\.int64\. Pass a floating-point step"),
]:
    case("functional.apply_decay_", "step", DECAY, dict(tensors=Fresh(floats, 2, 1), step=value), error, match)
for value in (True, 2.0, 3, 0, "2", None):
    case(
        "functional.apply_decay_",
        "ord",
        DECAY,
        dict(tensors=Fresh(floats, 2), step=0.1, ord=value),
        ValueError,
        r"must be 1 \(L1 soft threshold\) or 2 \(multiplicative decay\), got .*; use any of the following: 1, 2\.",
    )
for tensors, error, match in [
    (Fresh(with_entry, torch.tensor([1, 2]), 2), TypeError, r"`tensors\[1\]` has dtype torch\.int64.*Pass only float"),
    (Fresh(with_entry, torch.tensor([True]), 2), TypeError, r"`tensors\[1\]` has dtype torch\.bool"),
]:
    case("functional.apply_decay_", "tensors", DECAY, dict(tensors=tensors, step=0.1), error, match)
case(  # a tensor step lives on one device: the first tensor's (meta here, which the CPU tensor cannot use)
    "functional.apply_decay_",
    "tensors",
    DECAY,
    dict(tensors=Fresh(lambda: [torch.ones(2, device="meta"), *floats(2)]), step=Fresh(torch.tensor, 0.1)),
    ValueError,
    r"spans devices \['cpu', 'meta'\], but a tensor `step` lives on one\. Split the list with",
)
for ord in (1, 2):
    for mask, error, match in [
        ([], ValueError, r"`mask` has 0 tensors for 2 tensors; give one mask per tensor"),
        (Fresh(floats, 2), ValueError, r"`mask` has 1 tensors for 2 tensors; give one mask per tensor"),
        (Fresh(lambda: [torch.ones(2), torch.ones(2)]), ValueError, r"`mask\[1\]` has shape \(2,\) for a tensor of sh"),
        (
            Fresh(lambda: [torch.ones(2), torch.ones(1, 3)]),
            ValueError,
            r"shape \(1, 3\) for a tensor of shape \(3,\); give",
        ),
        (Fresh(lambda: [torch.ones(2), 1.0]), TypeError, r"`mask\[1\]` is float 1\.0\. Pass tensors only.*cautious_ma"),
        (Fresh(torch.ones, 2), TypeError, r"`mask` must be a list of tensors, got Tensor \(one tensor: wrap it"),
        (Fresh(lambda: [torch.ones(2), torch.ones(3, device="meta")]), ValueError, r"`mask\[1\]` is on meta.*put each"),
        (Fresh(lambda: [torch.ones(2), torch.ones(3, dtype=torch.complex64)]), TypeError, r"complex64.*Pass a float"),
    ]:
        kwargs = dict(tensors=Fresh(floats, 2, 3), step=0.1, ord=ord, mask=mask)
        case("functional.apply_decay_", "mask", DECAY, kwargs, error, match)

# cautious_mask
for argument in ("after", "before"):
    for value, error, match in [
        (Fresh(with_entry, 0.5, 2), TypeError, rf"`{argument}\[1\]` is float 0\.5\. Pass tensors only"),
        (Fresh(torch.ones, 2), TypeError, r"got Tensor \(one tensor: wrap it in a list"),
        (None, TypeError, r"must be a list of tensors, got NoneType\. Pass for example"),
    ]:
        kwargs = {"after": Fresh(floats, 2, 1), "before": Fresh(floats, 2, 1), argument: value}
        case("functional.cautious_mask", argument, F.cautious_mask, kwargs, error, match)
for before, match in [
    (Fresh(floats, 2), r"`before` has 1 tensors for 2 tensors in `after`; give the same parameters, in the same"),
    (Fresh(floats, 2, 3), r"`before\[1\]` has shape \(3,\) but `after\[1\]` has shape \(1,\); give the same"),
]:
    kwargs = dict(after=Fresh(floats, 2, 1), before=before)
    case("functional.cautious_mask", "before", F.cautious_mask, kwargs, ValueError, match)

# make_contiguous_: what one buffer cannot hold
for tensors, match in [
    ([], r"`tensors` is empty; give the parameters"),
    (Fresh(lambda: [torch.ones(2), torch.ones(2, dtype=torch.float64)]), r"mixes devices or dtypes.*Split them"),
    (Fresh(lambda: [torch.ones(2)] * 2), r"holds a tensor more than once.*give each tensor once"),
]:
    case("functional.make_contiguous_", "tensors", F.make_contiguous_, dict(tensors=tensors), ValueError, match)

# global_norm's order; mean_abs's and rms's element count
for value in (0, -1.0, math.nan, True, "2", None):
    kwargs = dict(tensors=Fresh(floats, 2), ord=value)
    case("functional.global_norm", "ord", F.global_norm, kwargs, ValueError, r"number > 0 .*pass for example ord=2\.0")
for name in ("mean_abs", "rms"):
    for value, error, match in [
        (-1, ValueError, r"`numel` must be an int >= 0, got -1\. Pass the total element count"),
        (2.0, TypeError, r"must be None or an int >= 0, got float 2\.0\. Pass the total element count"),
        (True, TypeError, r"got bool True\. Pass the total"),
        ("6", TypeError, r"got str '6'\. Pass"),
    ]:
        case(f"functional.{name}", "numel", getattr(F, name), dict(tensors=Fresh(floats, 2), numel=value), error, match)

# presets: the role predicates
for name in ("is_bias", "is_embedding", "is_linear_weight", "is_normalization", "role_of"):
    func = getattr(presets, name)
    ok = dict(name="fc.weight", param=Fresh(lambda: nn.Parameter(torch.ones(2, 2))), module=Fresh(nn.Linear, 2, 2))
    for argument, value, match in [
        ("name", 3, r"`name` must be the parameter's name as a string, got int 3\. Pass for example 'fc\.weight'"),
        ("name", None, r"got NoneType None\. Pass for example 'fc\.weight'"),
        ("name", b"fc.weight", r"got bytes b'fc\.weight'\. Pass for example"),
        ("param", "fc.weight", r"`param` must be the parameter tensor, got str 'fc\.weight'\. Pass for example"),
        ("param", (2, 2), r"got tuple \(2, 2\)\. Pass for example `module\.weight`"),
        ("module", None, r"`module` must be the torch\.nn\.Module that holds the parameter, got NoneType.*Pass for"),
        ("module", nn.Linear, r"got type <class 'torch\.nn\.modules\.linear\.Linear'>\. Pass for example"),
    ]:
        case(f"presets.{name}", argument, func, {**ok, argument: value}, TypeError, match)

# DecayPlan's views, called on a plan of Net
for method in (lwd.DecayPlan.explain, lwd.DecayPlan.entry):
    owner = f"DecayPlan.{method.__name__}"
    for value, error, match in [
        (3, TypeError, r"`name` must be a parameter's name as a string, got int 3\. Pass for example 'fc\.weight'"),
        (None, TypeError, r"got NoneType None\. Pass for example"),
        (
            "fc1.wieght",
            KeyError,
            r"No planned parameter is named 'fc1\.wieght'; `name` must be a canonical name or alias of a trainable"
            r" parameter\. Did you mean 'fc1\.weight' or 'fc2\.weight'\? List the planned names with",
        ),
        ("nothing.like.it", KeyError, r"'nothing\.like\.it'; `name` must be .*parameter\. List the planned names"),
    ]:
        case(owner, "name", method, {"self": Fresh(plain_plan), "name": value}, error, match)
GROUPS = lwd.DecayPlan.param_groups
for value, error, match in [
    ("1e-3", TypeError, r"got str '1e-3'\. Pass the lr you give the optimizer, for example 3e-4"),
    (True, TypeError, r"got bool True\. Pass the lr"),
    (math.nan, ValueError, r"finite number >= 0.*got float nan\. Pass the lr"),
    (-1.0, ValueError, r"got float -1\.0\. Pass the lr"),
    (
        None,
        ValueError,
        r"`lr` is None, but rule 'norms' scales the learning rate of group 'norms' by 0\.5; pass the optimizer's base"
        r" lr, for example lr=3e-4, so that the group gets its absolute lr",
    ),
]:
    case("DecayPlan.param_groups", "lr", GROUPS, {"self": Fresh(scaled_plan), "lr": value}, error, match)
for kwargs, error, match in [
    (dict(lr_scale_key=3), TypeError, r"must be None or a string, got int 3\. Pass the group key.*'lwd_lr_scale'"),
    (dict(lr_scale_key=""), ValueError, r"non-empty key the groups do not already have.*got ''\. Use a key of your"),
    (
        dict(lr_scale_key="lr"),
        ValueError,
        r"\(lr, lwd_planned, name, param_names, params, weight_decay\), got 'lr'\. Use a key",
    ),
    (dict(lr_scale_key="k", lr=0.1), ValueError, r"`lr_scale_key`='k' comes with lr=0\.1.*Pass either lr"),
]:
    case("DecayPlan.param_groups", "lr_scale_key", GROUPS, {"self": Fresh(scaled_plan), **kwargs}, error, match)

case(
    "build_param_groups",
    "lr",
    lwd.build_param_groups,
    dict(module=Fresh(Net), rules=[R("norms", 0.0, modules="*Norm*", lr_scale=0.5), R("rest", 0.1)]),
    ValueError,
    r"`lr` is None, but rule 'norms' scales the learning rate of group 'norms' by 0\.5; pass the optimizer's base lr",
)
case(
    "DecayPlan.param_groups",
    "lr",
    GROUPS,
    dict(self=Fresh(merged_scaled_plan)),
    ValueError,
    r"`lr` is None, but rules \['a', 'b'\] scale the learning rate of group 'a\+b' by 2; pass the optimizer's base",
)

# schedules: the step a schedule is called with
for name, schedule in [
    ("Constant", schedules.Constant(0.5)),
    ("LinearWarmup", schedules.LinearWarmup(4)),
    ("Cosine", schedules.Cosine(total_steps=10)),
]:
    for value, error, match in [
        (-8, ValueError, r"`step` must be an int >= 0 \(the optimizer steps taken so far, from 0\), got -8\. Pass for"),
        (1.5, TypeError, r"must be an int \(the optimizer steps taken so far, from 0\), got float 1\.5\. Pass for"),
        (True, TypeError, r"got bool True\. Pass for example `trainer\.global_step`"),
        ("3", TypeError, r"got str '3'\. Pass for example"),
        (None, TypeError, r"got NoneType None\. Pass"),
    ]:
        call = type(schedule).__call__
        case(f"schedules.{name}.__call__", "step", call, {"self": schedule, "step": value}, error, match)


@pytest.mark.parametrize(("owner", "argument", "func", "kwargs", "error", "match"), ROWS)
def test_bad_input(owner, argument, func, kwargs, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Trainer rows write nothing, but keep them out of the repository anyway
    kwargs = {k: v.build() if isinstance(v, Fresh) else v for k, v in kwargs.items()}
    watched = [ModuleSnapshot(v) for v in kwargs.values() if isinstance(v, nn.Module)]
    with pytest.raises(Exception) as info:  # the exact type is checked below
        func(**kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert re.search(rf"`{re.escape(argument)}\b", message), f"the message does not name `{argument}`: {message}"
    assert re.search(match, message), f"{match!r} not in: {message}"
    assert FIX.search(message), f"the message does not say how to fix it: {message}"
    for snapshot in watched:
        snapshot.assert_unchanged()


# ---------------------------------------------------------------- the table covers every public argument
# decay toward a reference, λ from a timescale, diagnostics
for value, error, match in [
    ("pretrained", ValueError, "got 'pretrained'; use 'init'"),
    ([1.0], TypeError, r"got list\. Pass 'init' or for example `pretrained\.state_dict\(\)`"),
    ({1: torch.zeros(1)}, TypeError, "mapping of parameter names to tensors"),
]:
    case("WeightDecayCallback", "toward", CB, dict(toward=value), error, match)
case("WeightDecayCallback", "toward", CB, dict(toward="init", mode="relative"), ValueError, "Use mode='decoupled'")
for value in (0.0, -1.0, math.inf, "0.2", True):
    case(
        "WeightDecayCallback",
        "timescale_fraction",
        CB,
        dict(timescale_fraction=value),
        ValueError,
        "finite number > 0.*Pass for example timescale_fraction=0.25",
    )
case("WeightDecayCallback", "timescale_fraction", CB, dict(timescale_fraction=0.2, ord=1), ValueError, "Use ord=2")
for value in ("yes", 1, None):
    case("WeightDecayCallback", "log_diagnostics", CB, dict(log_diagnostics=value), TypeError, "Pass a bool")
TIMESCALE = schedules.weight_decay_from_timescale
for argument, kwargs, error, match in [
    ("fraction", dict(fraction=0.0, lr=1e-3, total_steps=10), ValueError, "> 0, got 0.0. Pass for example 0.25"),
    ("fraction", dict(fraction="0.2", lr=1e-3, total_steps=10), TypeError, "number > 0, got str '0.2'"),
    ("lr", dict(fraction=0.2, lr=-1.0, total_steps=10), ValueError, "got -1.0. Pass for example 3e-4"),
    ("lr", dict(fraction=0.2, lr=math.nan, total_steps=10), ValueError, "finite number > 0, got nan"),
    ("total_steps", dict(fraction=0.2, lr=1e-3, total_steps=0), ValueError, ">= 1, got 0"),
    ("total_steps", dict(fraction=0.2, lr=1e-3, total_steps=10.5), TypeError, "must be an int, got float"),
]:
    case("schedules.weight_decay_from_timescale", argument, TIMESCALE, kwargs, error, match)
TOWARD = F.apply_decay_toward_
for argument, kwargs, error, match in [
    ("tensors", dict(tensors=torch.ones(2), reference=[torch.ones(2)], step=0.1), TypeError, "wrap it in a list"),
    ("reference", dict(tensors=Fresh(floats, 2), reference=Fresh(floats, 3), step=0.1), ValueError, "the shape, dtype"),
    ("reference", dict(tensors=Fresh(floats, 2), reference=[], step=0.1), ValueError, "one reference per tensor"),
    ("reference", dict(tensors=Fresh(floats, 2), reference=torch.ones(2), step=0.1), TypeError, "wrap it in a list"),
    ("step", dict(tensors=Fresh(floats, 2), reference=Fresh(floats, 2), step=-0.1), ValueError, "finite number >= 0"),
    ("ord", dict(tensors=Fresh(floats, 2), reference=Fresh(floats, 2), step=0.1, ord=3), ValueError, "1, 2"),
    (
        "mask",
        dict(tensors=Fresh(floats, 2), reference=Fresh(floats, 2), step=0.1, mask=[torch.ones(3)]),
        ValueError,
        "give each mask the shape of its tensor",
    ),
]:
    case("functional.apply_decay_toward_", argument, TOWARD, kwargs, error, match)


def _parameters(func: Callable[..., Any]) -> list[str]:
    out = []
    for p in inspect.signature(func).parameters.values():
        if p.name in ("self", "cls") or p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if p.kind is not inspect.Parameter.VAR_KEYWORD:  # build_param_groups' options: from_module's, added below
            out.append(p.name)
    return out


def _mixin_attributes() -> list[str]:
    """The attributes ``WDMixin`` documents as read (its docstring's bullet list) and its init arguments."""
    documented = re.findall(r"^\s*\* ``(\w+)``:", lwd.WDMixin.__doc__ or "", flags=re.MULTILINE)
    assert {"decay_rules", "optimizer", "scheduler", "decay_plan_options", "show_decay_plan"} <= set(documented)
    return documented + _parameters(lwd.WDMixin.__init__)


def required_rows() -> set[tuple[str, str]]:
    required = {("DecayRule", a) for a in _parameters(lwd.DecayRule)}
    for name in presets.__all__:
        if not name.startswith("is_"):  # the role predicates are not configuration
            required |= {(f"presets.{name}", a) for a in _parameters(getattr(presets, name))}
    plan_options = _parameters(lwd.DecayPlan.from_module)
    required |= {("DecayPlan.from_module", a) for a in plan_options}
    required |= {("build_param_groups", a) for a in _parameters(lwd.build_param_groups) + plan_options}
    required |= {("WeightDecayCallback", a) for a in _parameters(lwd.WeightDecayCallback.__init__)}
    for name in schedules.__all__:
        cls = getattr(schedules, name)
        if name != "Schedule":  # the protocol
            required |= {(f"schedules.{name}", a) for a in _parameters(cls)}
    required |= {("WDMixin", a) for a in _mixin_attributes()}
    # the lower-level API: the functional kernels, the role predicates, DecayPlan's views, the schedules' __call__
    for name in F.__all__:
        required |= {(f"functional.{name}", a) for a in _parameters(getattr(F, name))}
    for name in presets.__all__:
        if name.startswith("is_"):
            required |= {(f"presets.{name}", a) for a in _parameters(getattr(presets, name))}
    for name in ("explain", "entry", "param_groups"):
        required |= {(f"DecayPlan.{name}", a) for a in _parameters(getattr(lwd.DecayPlan, name))}
    for name in schedules.__all__:
        if name != "Schedule":
            required |= {(f"schedules.{name}.__call__", a) for a in _parameters(getattr(schedules, name).__call__)}
    return required


#: The in-place functions: a refused call must leave every tensor it was given as it was.
IN_PLACE = ("functional.apply_decay_", "functional.apply_decay_toward_", "functional.make_contiguous_")


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of a row's argument: a tensor, or the tensors of a list, tuple or dict."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


@pytest.mark.parametrize(
    ("owner", "argument", "func", "kwargs", "error", "match"), [r for r in ROWS if r.values[0] in IN_PLACE]
)
def test_refused_in_place_calls_leave_every_tensor_as_it_was(owner, argument, func, kwargs, error, match):
    kwargs = {k: v.build() if isinstance(v, Fresh) else v for k, v in kwargs.items()}
    given = [t for v in kwargs.values() for t in _tensors_in(v) if not t.is_meta]  # (meta tensors hold no values)
    before = [(t.detach().clone(), t.data_ptr(), t.shape) for t in given]
    with pytest.raises(error):
        func(**kwargs)
    for t, (values, address, shape) in zip(given, before, strict=True):
        assert t.shape == shape and t.data_ptr() == address, "a tensor was moved"
        assert torch.equal(t, values), f"a tensor changed: {values} -> {t}"


def test_every_public_argument_has_a_row():
    covered = {tuple(p.values[:2]) for p in ROWS}
    missing = sorted(required_rows() - covered)
    assert not missing, f"bad-input rows missing for {missing}"
    # unknown strings list the valid choices in every table row for a Literal argument
    for p in ROWS:
        owner, argument, _, _, error, match = p.values
        if owner == "WeightDecayCallback" and argument in ("mode", "ord") and error is ValueError:
            assert "use any of the following" in match


def test_presets_none_takes_no_argument():
    """``presets.none()`` has no parameter, so it has no row; it returns a rule list that decays nothing."""
    assert _parameters(presets.none) == []
    assert [r.weight_decay for r in presets.none()] == [0.0]


# ---------------------------------------------------------------- warnings instead of errors
@pytest.mark.parametrize(
    "rules",
    [
        [R("typo", 0.1, params="*.wieght")],
        [R("all", 0.1), R("shadowed", 0.2, params="*.bias")],  # an earlier rule claims everything it matches
        [R("norms", 0.0, modules="*Norm1d*")],
    ],
    ids=["nothing-matches", "shadowed", "no-such-class"],
)
def test_rule_that_claims_nothing_warns_and_strict_refuses(rules):
    model = Net()
    snapshot = ModuleSnapshot(model)
    with pytest.warns(UserWarning, match=r"claimed no parameter of Net.*`rules`.*`optional=True`"):
        groups = lwd.build_param_groups(model, rules)
    # the warning does not stop the plan: every trainable parameter is still in exactly one group
    planned = [id(p) for g in groups for p in g["params"]]
    assert sorted(planned) == sorted(id(p) for p in model.parameters())
    with pytest.raises(PlanError, match="`strict=False`"):
        lwd.build_param_groups(model, rules, strict=True)
    optional = [R(r.name, r.weight_decay, params=r.params, modules=r.modules, optional=True) for r in rules]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lwd.build_param_groups(model, optional, strict=True)
    snapshot.assert_unchanged()


def test_optimizer_weight_decay_given_to_the_mixin_warns_and_is_not_applied():
    model = mixin(optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.5))
    with pytest.warns(UserWarning, match=r"`optimizer` was given weight_decay=0.5.*Remove it from the optimizer"):
        optimizer = model.configure_optimizers()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.3]


def test_misconfiguration_stops_fit_before_any_step(tmp_path):
    """A plain optimizer that decays by itself, plus the callback: refused at fit start, nothing touched."""
    model = PlainNet(weight_decay=0.01)
    snapshot = ModuleSnapshot(model)
    watch = Watch()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[lwd.WeightDecayCallback(rules=presets.standard(0.1)), watch],
    )
    with pytest.raises(MisconfigurationException, match=r"`weight_decay`=0.01.*decayed twice"):
        trainer.fit(model, loader())
    assert watch.groups is not None  # the optimizer had been built ...
    assert watch.steps == 0 and trainer.global_step == 0  # ... and never stepped
    assert [groups_snapshot(o) for o in trainer.optimizers] == watch.groups
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.01  # no half-done hand-over
    assert not any(k.startswith("lwd_") for k in trainer.optimizers[0].param_groups[0])
    snapshot.assert_unchanged()


def test_refused_fit_can_be_fixed_and_rerun(tmp_path):
    """After a refused fit, the same model trains normally once the configuration is fixed."""
    model = PlainNet(weight_decay=0.01)
    with pytest.raises(MisconfigurationException):
        fit(model, [lwd.WeightDecayCallback(rules=presets.standard(0.1))], default_root_dir=tmp_path)
    model.weight_decay = 0.0
    before = model.net.fc1.weight.detach().clone()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[lwd.WeightDecayCallback(rules=presets.standard(0.1))],
    )
    trainer.fit(model, loader())
    assert trainer.global_step == 2
    assert not torch.equal(model.net.fc1.weight, before)


# ---------------------------------------------------------------- nothing is evaluated as code
CODE = "__import__('pathlib').Path('{marker}').touch()"


@pytest.mark.parametrize("path", ["os.system", "os.path.join", "builtins.eval", "subprocess.run", "math.pi", "os.path"])
def test_import_paths_resolve_only_classes_and_are_never_called(path, monkeypatch):
    """A dotted path in ``modules`` may name a module class, nothing else; what it names is never called."""
    import builtins
    import os
    import subprocess

    called: list[Any] = []

    def recorder(*args: Any, **kwargs: Any) -> None:
        called.append(args)

    monkeypatch.setattr(os, "system", recorder)
    monkeypatch.setattr(builtins, "eval", recorder)
    monkeypatch.setattr(subprocess, "run", recorder)
    with pytest.raises(TypeError, match=r"not a class\. Import paths may only name module classes"):
        R("r", 0.1, modules=path)
    assert called == []


@pytest.mark.parametrize("field", ["name", "group", "modules", "params", "predicate"])
def test_strings_that_look_like_code_are_never_evaluated(field, tmp_path):
    """Rule fields from a config file are data: a Python expression in any of them runs nothing."""
    marker = tmp_path / "pwned"
    code = CODE.format(marker=marker)
    kwargs: dict[str, Any] = {"name": "r", "weight_decay": 0.1, field: code}
    try:
        rule = R(**kwargs)
    except (TypeError, ValueError):
        pass  # refused: names, groups and predicates are not expressions; the path does not import
    else:
        assert field == "params"  # a glob: it matches no name, so it claims nothing
        with pytest.warns(UserWarning, match="claimed no parameter"):
            lwd.build_param_groups(Net(), [rule])
    assert not marker.exists()


def test_patterns_are_length_limited():
    """Globs and compiled expressions over 256 characters are refused (no pathological matching)."""
    for kwargs in (dict(params="*" * 10_000), dict(modules="*" * 10_000), dict(params=re.compile("a?" * 5_000))):
        with pytest.raises(ValueError, match=r"longer than the limit of 256 characters"):
            R("r", 0.1, **kwargs)
    # at the limit a glob of many stars still matches in linear time (fnmatch's translation backtracks little)
    rule = R("r", 0.1, params="*a" * 120 + "b")
    assert not rule.matches_name("a" * 300)
