"""DecayRule serialization: safe to load, and complete.

* Loading a rule imports nothing: a file naming a module in ``modules`` (a hand-edited or
  malicious checkpoint) loads with ``torch.load(weights_only=True)`` and with ``pickle`` without
  importing it, and matching the loaded rule does not import it either; a module's
  ``__getattr__`` is never called. A path that resolves later (its module imported by the user)
  matches from then on.
* Every documented form survives ``torch.save`` + ``torch.load(weights_only=True)`` and ``pickle``:
  the loaded rules are equal and plan the same groups as the originals (hand-written below).
* A rule's pickled state is plain data and is validated again on loading.
* A Lightning checkpoint whose hyper-parameters hold rules with a class and a compiled regex loads
  with ``weights_only=True`` and through ``load_from_checkpoint``.
"""

from __future__ import annotations

import copy
import importlib
import io
import pickle
import re
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn

import lightning_wd as lwd
from lightning_wd import presets
from tests.callback_helpers import Net, loader, trainer

R = lwd.DecayRule


# --------------------------------------------------------------------------------- models
class ScaleNorm(nn.Module):
    """A custom norm that subclasses no torch norm (matched by the class, its path or its name)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class Tiny(nn.Module):
    """Parameters in registration order: emb.weight, fc.weight, fc.bias, ln.weight, ln.bias, norm.gain,
    head.weight, head.bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.norm = ScaleNorm(4)
        self.head = nn.Linear(4, 2)


def groups(rules: list[lwd.DecayRule], model: nn.Module | None = None) -> list[tuple[Any, ...]]:
    """``(name, weight_decay, param_names)`` of each group, and its ``lr`` where a rule scales it (base lr 0.1)."""
    built = lwd.build_param_groups(Tiny() if model is None else model, rules, lr=0.1)
    return [(g["name"], g["weight_decay"], g["param_names"], *([g["lr"]] if "lr" in g else [])) for g in built]


def via_torch(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def via_pickle(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


LOADERS = [pytest.param(via_torch, id="torch_weights_only"), pytest.param(via_pickle, id="pickle")]
#: torch 2.4's weights_only unpickler: no `safe_globals` context manager, no bytes.
OLD_WEIGHTS_ONLY = not hasattr(torch.serialization, "safe_globals")


def crafted(state: Any) -> lwd.DecayRule:
    """A rule that pickles with ``state`` as it is, as a hand-edited or malicious file could hold it."""
    rule = R("template", 0.0, modules="*Norm*")
    object.__setattr__(rule, "__getstate__", lambda: state)
    return rule


def state(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "crafted",
        "weight_decay": 0.0,
        "modules": None,
        "params": None,
        "min_ndim": None,
        "max_ndim": None,
        "predicate": None,
        "lr_scale": 1.0,
        "group": None,
        "optional": True,
    }
    return {**base, **changes}


# ----------------------------------------------------------- loading never imports anything
TARGET = "lwd_serial_target"
TARGET_SOURCE = """
import pathlib
import torch

pathlib.Path(__file__).with_name("imported.txt").write_text("imported")


class TargetNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(2))
"""
ALIAS = "lwd_serial_alias"
ALIAS_SOURCE = "from tests.test_rule_serialization import ScaleNorm as AliasNorm\n"
LAZY = "lwd_serial_lazy"
LAZY_SOURCE = """
import pathlib


def __getattr__(name):
    pathlib.Path(__file__).with_name("getattr.txt").write_text(name)
    raise AttributeError(name)
"""


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``tmp_path`` on ``sys.path`` with three tiny modules, none imported; removed from sys.modules afterwards."""
    for name, source in ((TARGET, TARGET_SOURCE), (ALIAS, ALIAS_SOURCE), (LAZY, LAZY_SOURCE)):
        assert name not in sys.modules
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in (TARGET, ALIAS, LAZY):
        sys.modules.pop(name, None)


class WithTarget(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.norm = norm


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(
    "entry",
    [pytest.param(f"{TARGET}.TargetNorm", id="path"), pytest.param(("class", f"{TARGET}.TargetNorm"), id="class")],
)
def test_loading_and_matching_a_rule_never_import_its_modules(module_dir, load, entry):
    file_rule = crafted(state(name="target", modules=(entry,)))
    assert TARGET.encode() in pickle.dumps(file_rule)  # the file does name the module
    rule = load(file_rule)
    assert TARGET not in sys.modules and not (module_dir / "imported.txt").exists()
    assert rule.modules == (f"{TARGET}.TargetNorm",)  # a class whose module is not imported stays its path

    model = WithTarget(ScaleNorm(2))
    assert groups([rule, R("rest", 0.1)], model) == [("rest", 0.1, ["fc.weight", "fc.bias", "norm.gain"])]
    assert [rule.matches(n, p, m) for m in model.modules() for n, p in m.named_parameters(recurse=False)] == [
        False,
        False,
        False,
    ]
    assert TARGET not in sys.modules and not (module_dir / "imported.txt").exists()

    # Once the user imports the module, the same loaded rule matches its class.
    target = importlib.import_module(TARGET)
    assert (module_dir / "imported.txt").read_text() == "imported"
    model = WithTarget(target.TargetNorm())
    assert groups([rule, R("rest", 0.1)], model) == [
        ("target", 0.0, ["norm.gain"]),
        ("rest", 0.1, ["fc.weight", "fc.bias"]),
    ]


@pytest.mark.parametrize("load", LOADERS)
def test_a_class_tag_comes_back_as_the_class_when_its_module_is_imported(module_dir, load):
    target = importlib.import_module(TARGET)
    rule = load(crafted(state(modules=(("class", f"{TARGET}.TargetNorm"), f"{TARGET}.TargetNorm"))))
    assert rule.modules == (target.TargetNorm, f"{TARGET}.TargetNorm")  # a path string stays a string


@pytest.mark.parametrize("load", LOADERS)
def test_a_path_that_resolves_later_is_not_cached_as_a_miss(module_dir, load):
    """``lwd_serial_alias.AliasNorm`` re-exports ScaleNorm: before that module is imported, ScaleNorm does
    not match; after, it does, though the rule already answered for ScaleNorm."""
    rule = load(crafted(state(modules=(f"{ALIAS}.AliasNorm",))))
    norm = ScaleNorm(2)
    assert not rule.matches_module(norm)
    assert not rule.matches_module(nn.Linear(2, 2))
    importlib.import_module(ALIAS)
    assert rule.matches_module(norm)
    assert not rule.matches_module(nn.Linear(2, 2))


@pytest.mark.parametrize("load", LOADERS)
def test_loading_and_matching_never_call_a_module_getattr(module_dir, load):
    importlib.import_module(LAZY)
    entries = (("class", f"{LAZY}.LazyNorm"), f"{LAZY}.LazyNorm", ("class", f"{LAZY}.sub.LazyNorm"))
    rule = load(crafted(state(modules=entries)))
    assert rule.modules == (f"{LAZY}.LazyNorm", f"{LAZY}.LazyNorm", f"{LAZY}.sub.LazyNorm")
    assert groups([rule, R("rest", 0.1)], WithTarget(ScaleNorm(2)))[0][0] == "rest"
    assert not (module_dir / "getattr.txt").exists()


# ------------------------------------------------------------------- every documented form
REST = R("rest", 0.1, optional=True)
ALL = ["emb.weight", "fc.weight", "fc.bias", "ln.weight", "ln.bias", "norm.gain", "head.weight", "head.bias"]


def without(*names: str) -> list[str]:
    return [n for n in ALL if n not in names]


FORMS: list[Any] = [
    pytest.param(
        [R("ln", 0.0, modules=nn.LayerNorm)],
        [("ln", 0.0, ["ln.weight", "ln.bias"]), ("rest", 0.1, without("ln.weight", "ln.bias"))],
        id="class_object",
    ),
    pytest.param(
        [R("norm", 0.0, modules=ScaleNorm)],
        [("norm", 0.0, ["norm.gain"]), ("rest", 0.1, without("norm.gain"))],
        id="user_class_object",
    ),
    pytest.param(
        [R("norms", 0.0, modules="*Norm*")],
        [
            ("norms", 0.0, ["ln.weight", "ln.bias", "norm.gain"]),
            ("rest", 0.1, without("ln.weight", "ln.bias", "norm.gain")),
        ],
        id="class_name_glob",
    ),
    pytest.param(
        [R("emb", 0.0, modules="Embedding")],
        [("emb", 0.0, ["emb.weight"]), ("rest", 0.1, without("emb.weight"))],
        id="exact_class_name",
    ),
    pytest.param(
        [R("linear", 0.2, modules="torch.nn.Linear")],
        [
            ("linear", 0.2, ["fc.weight", "fc.bias", "head.weight", "head.bias"]),
            ("rest", 0.1, ["emb.weight", "ln.weight", "ln.bias", "norm.gain"]),
        ],
        id="dotted_path",
    ),
    pytest.param(
        [R("norm", 0.0, modules="tests.test_rule_serialization.ScaleNorm")],
        [("norm", 0.0, ["norm.gain"]), ("rest", 0.1, without("norm.gain"))],
        id="user_dotted_path",
    ),
    pytest.param(
        [R("mixed", 0.0, modules=[nn.LayerNorm, "Embedding", ScaleNorm, "torch.nn.modules.*"])],
        [("mixed", 0.0, ALL)],  # 'torch.nn.modules.*' is a glob on qualified paths: every torch module
        id="mixed_list",
    ),
    pytest.param(
        [R("bias", 0.0, params="*.bias")],
        [("bias", 0.0, ["fc.bias", "ln.bias", "head.bias"]), ("rest", 0.1, without("fc.bias", "ln.bias", "head.bias"))],
        id="param_glob",
    ),
    pytest.param(
        [R("weights", 0.2, params=re.compile(r"(FC|HEAD)\.WEIGHT", re.IGNORECASE))],
        [("weights", 0.2, ["fc.weight", "head.weight"]), ("rest", 0.1, without("fc.weight", "head.weight"))],
        id="regex_with_flags",
    ),
    pytest.param(
        [R("ln", 0.0, params=[re.compile(r"ln \. (weight | bias)", re.VERBOSE | re.ASCII), "norm.*"])],
        [
            ("ln", 0.0, ["ln.weight", "ln.bias", "norm.gain"]),
            ("rest", 0.1, without("ln.weight", "ln.bias", "norm.gain")),
        ],
        id="regex_and_glob",
    ),
    pytest.param(
        [R("matrix", 0.2, min_ndim=2), R("vector", 0.0, max_ndim=1)],
        [
            ("matrix", 0.2, ["emb.weight", "fc.weight", "head.weight"]),
            ("vector", 0.0, ["fc.bias", "ln.weight", "ln.bias", "norm.gain", "head.bias"]),
        ],
        id="min_max_ndim",
    ),
    pytest.param(
        [
            R("ln", 0.0, modules=nn.LayerNorm, group="no_decay"),
            R("bias", 0.0, params="*.bias", group="no_decay"),
            R("fast", 0.2, modules=nn.Linear, lr_scale=2.0),
        ],
        [
            ("no_decay", 0.0, ["fc.bias", "ln.weight", "ln.bias", "head.bias"]),
            ("fast", 0.2, ["fc.weight", "head.weight"], 0.2),  # lr: 2.0 x the base lr 0.1
            ("rest", 0.1, ["emb.weight", "norm.gain"]),
        ],
        id="group_and_lr_scale",
    ),
    pytest.param(
        [R("unused", 0.3, modules="NoSuchLayer", optional=True)],
        [("rest", 0.1, ALL)],
        id="optional",
    ),
    pytest.param(
        presets.standard(0.05),
        [
            ("no_decay", 0.0, ["emb.weight", "fc.bias", "ln.weight", "ln.bias", "norm.gain", "head.bias"]),
            ("decay", 0.05, ["fc.weight", "head.weight"]),
        ],
        id="preset_standard",
    ),
    pytest.param(
        presets.gpt(0.1),
        [
            ("decay", 0.1, ["emb.weight", "fc.weight", "head.weight"]),
            ("no_decay", 0.0, ["fc.bias", "ln.weight", "ln.bias", "norm.gain", "head.bias"]),
        ],
        id="preset_gpt",
    ),
]


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(("rules", "expected"), FORMS)
def test_every_documented_form_round_trips(rules, expected, load):
    rules = [*rules, REST]
    assert groups(rules) == expected
    groups(rules)  # the caches are filled before saving: they never travel
    loaded = load(rules)
    assert loaded == rules
    assert [type(r) for r in loaded] == [lwd.DecayRule] * len(rules)
    assert [(r.lr_scale, r.group_name, r.optional) for r in loaded] == [
        (r.lr_scale, r.group_name, r.optional) for r in rules
    ]
    assert groups(loaded) == expected
    assert load(loaded) == rules  # and again


def test_state_is_plain_data():
    rule = R(
        "r",
        0.1,
        modules=[nn.LayerNorm, ScaleNorm, "*Norm*", "torch.nn.Embedding"],
        params=[re.compile(r".*\.BIAS", re.IGNORECASE), "*.gamma"],
        max_ndim=1,
    )
    assert rule.__getstate__() == {
        "name": "r",
        "weight_decay": 0.1,
        "modules": (
            ("class", "torch.nn.modules.normalization.LayerNorm"),
            ("class", "tests.test_rule_serialization.ScaleNorm"),
            "*Norm*",
            "torch.nn.Embedding",
        ),
        "params": (("re", r".*\.BIAS", re.IGNORECASE | re.UNICODE), "*.gamma"),
        "min_ndim": None,
        "max_ndim": 1,
        "predicate": None,
        "lr_scale": 1.0,
        "group": None,
        "optional": False,
    }


def test_state_of_older_releases_with_class_and_pattern_objects_still_loads():
    """Pickles written before the plain state held the class and the compiled pattern themselves."""
    old = crafted(state(modules=(nn.LayerNorm,), params=(re.compile(r"ln\..*"),)))
    assert via_pickle(old) == R("crafted", 0.0, modules=nn.LayerNorm, params=re.compile(r"ln\..*"), optional=True)


# ------------------------------------------------------------------------------ predicates
def user_predicate(name: str, param: Tensor, module: nn.Module) -> bool:
    return name.startswith("head.")


@pytest.mark.skipif(OLD_WEIGHTS_ONLY, reason="torch.serialization.safe_globals is new in torch 2.5")
def test_user_predicate_needs_allowlisting_for_weights_only():
    rules = [R("head", 0.2, predicate=user_predicate), REST]
    buffer = io.BytesIO()
    torch.save(rules, buffer)
    buffer.seek(0)
    with pytest.raises(
        pickle.UnpicklingError, match=r"(?s)GLOBAL tests\.test_rule_serialization\.user_predicate.*add_safe_globals"
    ):
        torch.load(buffer, weights_only=True)
    buffer.seek(0)
    with torch.serialization.safe_globals([user_predicate]):
        loaded = torch.load(buffer, weights_only=True)
    assert loaded == rules and loaded[0].predicate is user_predicate
    assert groups(loaded) == [
        ("head", 0.2, ["head.weight", "head.bias"]),
        ("rest", 0.1, without("head.weight", "head.bias")),
    ]
    assert via_pickle(rules) == rules  # plain pickle loads it by reference


def test_a_file_cannot_make_a_predicate_of_a_string():
    with pytest.raises(TypeError, match="`predicate` must be callable"):
        via_torch(crafted(state(predicate="os.system")))


# ------------------------------------------------------------------- validation on loading
DROP = object()


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"extra": 1}, ValueError, r"unknown fields \['extra'\]; it was not written by DecayRule"),
        ({"name": DROP}, ValueError, r"lacks `name`"),
        ({"weight_decay": DROP}, ValueError, r"lacks `weight_decay`"),
        ({"weight_decay": -1.0}, ValueError, r"`weight_decay` must be >= 0, got -1.0"),
        ({"name": "two words"}, ValueError, r"`name` must be a non-empty string"),
        ({"modules": ()}, ValueError, r"`modules` is an empty list"),
        ({"modules": ("torch nn.Linear",)}, ValueError, r"'torch nn.Linear' is not an import path"),
        ({"modules": (("class", "os.system; x"),)}, ValueError, r"'os.system; x' is not an import path"),
        ({"modules": (("class", "m.f.<locals>.Norm"),)}, ValueError, r"is not an import path"),
        ({"modules": (("class", "Norm"),)}, ValueError, r"'Norm' is not an import path"),
        ({"modules": (("class", "m." + "N" * 300),)}, ValueError, r"longer than the limit of 256"),
        ({"modules": (("class", 3),)}, TypeError, r"must hold an import path string, got int 3"),
        ({"modules": (("other", "x"),)}, TypeError, r"`modules` entries must be classes or strings, got tuple"),
        ({"modules": ("x" * 300,)}, ValueError, r"`modules` pattern of length 300"),
        ({"params": (("re", "x" * 300, 0),)}, ValueError, r"`params` pattern of length 300"),
        ({"params": (("re", "(", 0),)}, ValueError, r"`params` regular expression '\(' does not compile"),
        ({"params": (("re", "a", 128),)}, ValueError, r"has flags 128 outside those a rule keeps"),
        ({"params": (("re", "a", True),)}, TypeError, r"must be saved as \('re', str pattern, int flags\)"),
        ({"params": (("re", b"a", 0),)}, TypeError, r"must be saved as"),
        ({"params": (("re", "a"),)}, TypeError, r"`params` entries must be glob strings or compiled"),
        ({"min_ndim": 3, "max_ndim": 1}, ValueError, r"`min_ndim` \(3\) is greater than `max_ndim` \(1\)"),
        ({"lr_scale": 0.0}, ValueError, r"`lr_scale` must be > 0"),
        ({"optional": 1}, TypeError, r"`optional` must be a bool"),
    ],
)
@pytest.mark.parametrize("load", LOADERS)
def test_loaded_state_is_validated_again(changes, error, match, load):
    if (
        load is via_torch
        and OLD_WEIGHTS_ONLY
        and any(isinstance(v, bytes) for e in changes.get("params", ()) for v in e)
    ):
        pytest.skip("torch < 2.5 refuses bytes under weights_only before the rule sees them")
    edited = {k: v for k, v in state(**changes).items() if v is not DROP}
    with pytest.raises(error, match=match):
        load(crafted(edited))


def test_a_state_that_is_not_a_dict_is_refused():
    with pytest.raises(TypeError, match="DecayRule state must be a dict, got list"):
        via_torch(crafted(["name", "x"]))


# -------------------------------------------------------------- classes pickle by import path
def make_local_norm() -> type[nn.Module]:
    class LocalNorm(nn.Module):
        pass

    return LocalNorm


Unnamed = type("Unnamed", (nn.Module,), {"__module__": "tests.no_such_module"})


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (
            make_local_norm(),
            r"`modules` entry .*LocalNorm'> is a local class .* match it by class name with 'LocalNorm'",
        ),
        (Unnamed, r"`modules` entry .*Unnamed'> cannot be pickled: 'tests.no_such_module.Unnamed' does not name"),
    ],
)
@pytest.mark.parametrize("dump", [pickle.dumps, partial(torch.save, f=io.BytesIO())])
def test_a_class_no_path_names_is_refused_when_pickled(cls, match, dump):
    rule = R("local", 0.0, modules=cls)
    with pytest.raises(pickle.PicklingError, match=match):
        dump(rule)
    # Copies need no import path: they keep the class.
    for clone in (copy.copy(rule), copy.deepcopy(rule)):
        assert clone == rule and clone.modules == (cls,)


# ------------------------------------------------------------------------ Lightning checkpoints
CKPT_RULES = [
    R("norms", 0.0, modules=[nn.LayerNorm, ScaleNorm], group="no_decay"),
    R("bias", 0.0, params=re.compile(r".*\.BIAS", re.IGNORECASE), group="no_decay"),
    R("decay", 0.1),
]


class CheckpointedNet(lwd.WDMixin, L.LightningModule):
    """Rules as an init argument saved with the hyper-parameters."""

    show_decay_plan = False

    def __init__(self, decay_rules: list[lwd.DecayRule] | None = None) -> None:
        super().__init__(decay_rules=decay_rules)
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = Net()
        self.scale = ScaleNorm(2)
        self.optimizer = partial(torch.optim.SGD, lr=0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.net(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


CKPT_GROUPS = [
    ("no_decay", 0.0, ["net.fc1.bias", "net.norm.weight", "net.norm.bias", "net.fc2.bias", "scale.gain"]),
    ("decay", 0.1, ["net.fc1.weight", "net.fc2.weight"]),
]


@pytest.mark.parametrize("weights_only", [None, True])
def test_lightning_checkpoint_with_class_and_regex_rules_loads(tmp_path, weights_only):
    model = CheckpointedNet(decay_rules=CKPT_RULES)
    t = trainer(tmp_path, [], max_steps=2)
    t.fit(model, loader())
    assert t.global_step == 2
    path = tmp_path / "rules.ckpt"
    t.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["decay_rules"] == CKPT_RULES
    restored = CheckpointedNet.load_from_checkpoint(path, weights_only=weights_only)
    assert restored.decay_rules == CKPT_RULES
    assert groups(restored.decay_rules, restored) == CKPT_GROUPS
    assert groups(CKPT_RULES, model) == CKPT_GROUPS
