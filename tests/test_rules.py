"""DecayRule: validation, matching semantics, pickling, construction from strings."""

from __future__ import annotations

import copy
import math
import pickle
import re
from collections import OrderedDict

import pytest
import torch
import yaml
from torch import Tensor, nn

import lightning_wd as lwd
from lightning_wd import presets
from lightning_wd.rules import param_ndim
from tests.models import Conv1D, LayerNorm2d, RMSNorm


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight_decay": -0.1}, ValueError, r"`weight_decay` must be >= 0, got -0.1"),
        ({"weight_decay": math.nan}, ValueError, r"`weight_decay` must be finite, got nan"),
        ({"weight_decay": math.inf}, ValueError, r"`weight_decay` must be finite, got inf"),
        ({"weight_decay": -math.inf}, ValueError, r"`weight_decay` must be finite"),
        ({"weight_decay": "0.1"}, TypeError, r"`weight_decay` must be a number, got str '0.1'"),
        ({"weight_decay": True}, TypeError, r"`weight_decay` must be a number, got bool"),
        ({"weight_decay": None}, TypeError, r"`weight_decay` must be a number"),
        ({"name": ""}, ValueError, r"`name` must be a non-empty string"),
        ({"name": "two words"}, ValueError, r"`name` must be a non-empty string .* got 'two words'"),
        ({"name": 3}, TypeError, r"`name` must be a string, got int 3"),
        ({"params": [1]}, TypeError, r"`params` entries must be glob strings or compiled regular expressions"),
        ({"params": ["*.bias", None]}, TypeError, r"`params` entries must be glob strings"),
        ({"params": 1.5}, TypeError, r"`params`: expected a string, a class or a list"),
        ({"modules": [3]}, TypeError, r"`modules` entries must be classes or strings, got int 3"),
        ({"modules": {"*Norm*"}}, TypeError, r"`modules`: patterns were given as a set .* Pass a list"),
        ({"params": {"*.bias", "*.gamma"}}, TypeError, r"`params`: patterns were given as a set"),
        ({"params": frozenset({"*.bias"})}, TypeError, r"given as a frozenset"),
        ({"modules": "torch.nn.NoSuchLayer"}, ValueError, r"'torch.nn.NoSuchLayer' does not resolve: 'torch.nn' has"),
        ({"modules": "no_such_pkg_lwd.Layer"}, ValueError, r"no prefix of it can be imported"),
        ({"modules": "torch..nn.Linear"}, ValueError, r"'torch..nn.Linear' is not an import path: write a dotted"),
        ({"modules": "torch.nn.Linear()"}, ValueError, r"is not an import path"),
        ({"modules": "torch.nn.functional.relu"}, TypeError, r"resolves to function .* not a class"),
        ({"modules": "collections.OrderedDict"}, TypeError, r"not a torch.nn.Module subclass"),
        ({"modules": int}, TypeError, r"is not a subclass of torch.nn.Module"),
        ({"modules": nn.Linear(2, 2)}, TypeError, r"`modules`: expected a string, a class or a list"),
        ({"modules": []}, ValueError, r"`modules` is an empty list"),
        ({"params": ()}, ValueError, r"`params` is an empty list"),
        ({"params": ""}, ValueError, r"`params` contains an empty pattern"),
        ({"modules": ["*Norm*", ""]}, ValueError, r"`modules` contains an empty pattern"),
        ({"params": "x" * 300}, ValueError, r"pattern of length 300 is longer than the limit of 256"),
        ({"params": re.compile("")}, ValueError, r"`params` contains an empty pattern"),
        ({"params": re.compile(b"x")}, TypeError, r"`params` regular expressions must be compiled from str"),
        ({"min_ndim": 3, "max_ndim": 2}, ValueError, r"`min_ndim` \(3\) is greater than `max_ndim` \(2\)"),
        ({"min_ndim": -1}, ValueError, r"`min_ndim` must be >= 0, got -1"),
        ({"max_ndim": 1.5}, TypeError, r"`max_ndim` must be an int or None, got float 1.5"),
        ({"min_ndim": True}, TypeError, r"`min_ndim` must be an int or None, got bool"),
        ({"predicate": 42}, TypeError, r"`predicate` must be callable as predicate\(name, param, module\)"),
        ({"predicate": "lightning_wd.presets.is_bias"}, TypeError, r"`predicate` must be callable"),
        ({"lr_scale": 0}, ValueError, r"`lr_scale` must be > 0, got 0.0"),
        ({"lr_scale": -2.0}, ValueError, r"`lr_scale` must be > 0"),
        ({"lr_scale": math.nan}, ValueError, r"`lr_scale` must be finite"),
        ({"lr_scale": "2"}, TypeError, r"`lr_scale` must be a number"),
        ({"group": ""}, ValueError, r"`group` must be None or a non-empty string"),
        ({"group": "a b"}, ValueError, r"`group` must be None or a non-empty string"),
        ({"group": 7}, TypeError, r"`group` must be None or a string, got int 7"),
        ({"optional": "yes"}, TypeError, r"`optional` must be a bool"),
    ],
)
def test_rule_validation(kwargs, error, match):
    args = {"name": "rule", "weight_decay": 0.1, **kwargs}
    name, wd = args.pop("name"), args.pop("weight_decay")
    with pytest.raises(error, match=match):
        lwd.DecayRule(name, wd, **args)


def test_rule_normalises_its_fields():
    rule = lwd.DecayRule("r", 1, modules=["*Norm*", nn.Linear], params="*.bias", lr_scale=2)
    assert rule.weight_decay == 1.0 and isinstance(rule.weight_decay, float)
    assert rule.lr_scale == 2.0 and isinstance(rule.lr_scale, float)
    assert rule.modules == ("*Norm*", nn.Linear)
    assert rule.params == ("*.bias",)
    assert rule.group_name == "r"
    assert lwd.DecayRule("r", 0.0, group="g").group_name == "g"
    with pytest.raises(AttributeError):
        rule.weight_decay = 0.5  # frozen


# --------------------------------------------------------------------------------- matching
class MyLinear(nn.Linear):
    pass


class BaseBlock(nn.Module):
    pass


class ChildBlock(BaseBlock):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 2))


# A class defined in a module whose path contains "norm", though it is no norm.
GatedMLP = type("GatedMLP", (nn.Module,), {"__module__": "mylib.normalization_utils"})
GatedMLP.__qualname__ = "GatedMLP"


def match_modules(spec, module: nn.Module) -> bool:
    return lwd.DecayRule("r", 0.0, modules=spec).matches_module(module)


@pytest.mark.parametrize(
    ("spec", "module", "expected"),
    [
        (nn.Linear, nn.Linear(2, 2), True),
        (nn.Linear, MyLinear(2, 2), True),  # subclasses
        (nn.Linear, nn.MultiheadAttention(4, 1).out_proj, True),  # NonDynamicallyQuantizableLinear
        (nn.Linear, nn.Conv1d(2, 2, 1), False),
        (nn.Linear, Conv1D(2, 2), False),
        ("*Norm*", nn.LayerNorm(2), True),
        ("*Norm*", nn.BatchNorm2d(2), True),
        ("*Norm*", RMSNorm(2), True),
        ("*Norm*", LayerNorm2d(2), True),
        ("*Norm*", nn.Linear(2, 2), False),
        ("*Norm", nn.GroupNorm(1, 2), True),
        ("*Norm", LayerNorm2d(2), False),  # glob on the whole name: 'LayerNorm2d' does not end in Norm
        ("RMSNorm", RMSNorm(2), True),  # exact class name
        ("RMSNorm", nn.RMSNorm(2), True),
        ("RMSNorm", nn.LayerNorm(2), False),
        ("Linear", MyLinear(2, 2), True),  # base-class name
        ("MyLinear", nn.Linear(2, 2), False),
        ("BaseBlock", ChildBlock(), True),
        ("Base*", ChildBlock(), True),
        ("ChildBlock", BaseBlock(), False),
        ("_ConvNd", nn.Conv2d(1, 1, 1), True),
        ("_ConvNd", nn.ConvTranspose3d(1, 1, 1), True),
        ("Module", nn.Linear(2, 2), True),
        ("*norm*", GatedMLP(), False),  # a bare glob never matches the module path
        ("*norm*", nn.LayerNorm(2), False),  # case-sensitive
        ("mylib.normalization_utils.*", GatedMLP(), True),  # a dotted glob matches qualified paths
        ("torch.nn.modules.normalization.*", nn.LayerNorm(2), True),
        ("torch.nn.modules.normalization.*", nn.Linear(2, 2), False),
        ("torch.nn.LayerNorm", nn.LayerNorm(2), True),  # import path
        ("torch.nn.LayerNorm", nn.RMSNorm(2), False),
        ("torch.nn.modules.linear.Linear", MyLinear(2, 2), True),
        ("tests.models.RMSNorm", RMSNorm(2), True),
        ("tests.models.RMSNorm", nn.RMSNorm(2), False),
        (["torch.nn.Embedding", "*Norm*"], nn.Embedding(3, 2), True),
        (["torch.nn.Embedding", "*Norm*"], nn.LayerNorm(2), True),
        (["torch.nn.Embedding", "*Norm*"], nn.Linear(2, 2), False),
    ],
)
def test_module_matching(spec, module, expected):
    assert match_modules(spec, module) is expected


@pytest.mark.parametrize(
    ("spec", "name", "expected"),
    [
        ("*.bias", "fc.bias", True),
        ("*.bias", "blocks.0.attn.bias", True),
        ("*.bias", "attn.bias_k", False),
        ("*.bias", "bias", False),  # '*.bias' needs a dot: write ['bias', '*.bias'] for both
        (["bias", "*.bias"], "bias", True),
        ("head.*", "head.weight", True),
        ("head.*", "decode_head.weight", False),  # no substring over-match
        ("head.*", "head", False),
        ("*head.*", "decode_head.weight", True),
        ("*pos_embed*", "pos_embed", True),
        ("*pos_embed*", "encoder.pos_embed.weight", True),
        ("*pos_embed*", "encoder.pos_emb", False),
        ("blocks.?.attn.*", "blocks.3.attn.qkv.weight", True),
        ("blocks.?.attn.*", "blocks.12.attn.qkv.weight", False),
        ("blocks.[02].*", "blocks.2.fc.weight", True),
        ("blocks.[02].*", "blocks.1.fc.weight", False),
        (re.compile(r".*\.(q|k|v)\.weight"), "enc.attn.q.weight", True),
        (re.compile(r".*\.(q|k|v)\.weight"), "enc.attn.q.weight.extra", False),  # whole-name match
        (re.compile(r"layers\.\d+\.norm"), "layers.10.norm", True),
        (re.compile(r"norm"), "layers.10.norm", False),  # regexes match the whole name too
    ],
)
def test_param_name_matching(spec, name, expected):
    assert lwd.DecayRule("r", 0.0, params=spec).matches_name(name) is expected


def test_ndim_bounds_and_ds_shape():
    owner = nn.Module()
    p0, p1, p2, p4 = (nn.Parameter(torch.zeros(s)) for s in [(), (3,), (3, 3), (2, 2, 2, 2)])
    at_least_2 = lwd.DecayRule("r", 0.1, min_ndim=2)
    at_most_1 = lwd.DecayRule("r", 0.1, max_ndim=1)
    exactly_2 = lwd.DecayRule("r", 0.1, min_ndim=2, max_ndim=2)
    assert [at_least_2.matches("x", p, owner) for p in (p0, p1, p2, p4)] == [False, False, True, True]
    assert [at_most_1.matches("x", p, owner) for p in (p0, p1, p2, p4)] == [True, True, False, False]
    assert [exactly_2.matches("x", p, owner) for p in (p0, p1, p2, p4)] == [False, False, True, False]
    # DeepSpeed ZeRO-3: an empty tensor whose real shape is in ds_shape.
    empty = nn.Parameter(torch.empty(0))
    empty.ds_shape = torch.Size([4, 4])
    assert param_ndim(empty) == 2
    assert at_least_2.matches("x", empty, owner) and not at_most_1.matches("x", empty, owner)


calls: list[tuple[str, tuple[int, ...], str]] = []


def recording_predicate(name: str, param: Tensor, module: nn.Module) -> bool:
    calls.append((name, tuple(param.shape), type(module).__name__))
    return name.endswith("weight")


def test_predicate_receives_name_param_owner():
    calls.clear()
    lin = nn.Linear(3, 2)
    rule = lwd.DecayRule("r", 0.1, predicate=recording_predicate)
    assert rule.matches("fc.weight", lin.weight, lin)
    assert not rule.matches("fc.bias", lin.bias, lin)
    assert calls == [("fc.weight", (2, 3), "Linear"), ("fc.bias", (2,), "Linear")]


def test_matchers_combine_with_and_entries_with_or():
    lin, ln = nn.Linear(2, 2), nn.LayerNorm(2)
    rule = lwd.DecayRule("r", 0.1, modules=[nn.Linear, "*Norm*"], params=["*.weight"], min_ndim=2)
    assert rule.matches("a.weight", lin.weight, lin)
    assert not rule.matches("a.bias", lin.bias, lin)  # params fails
    assert not rule.matches("n.weight", ln.weight, ln)  # ndim fails
    assert not rule.matches("e.weight", lin.weight, nn.Embedding(2, 2))  # modules fails
    # predicate is ANDed too, and never called when a cheaper matcher already failed
    calls.clear()
    with_pred = lwd.DecayRule("r", 0.1, modules=nn.Linear, predicate=recording_predicate)
    assert not with_pred.matches("n.weight", ln.weight, ln)
    assert calls == []


def test_rule_without_matchers_matches_everything():
    rule = lwd.DecayRule("all", 0.1)
    emb = nn.Embedding(2, 2)
    assert rule.matches("anything", emb.weight, emb)
    assert rule.matches_module(nn.Identity()) and rule.matches_name("x")


# --------------------------------------------------------------------------------- pickling
def module_level_predicate(name: str, param: Tensor, module: nn.Module) -> bool:
    return param.dim() == 3


@pytest.mark.parametrize(
    "rule",
    [
        lwd.DecayRule("a", 0.1),
        lwd.DecayRule("b", 0.0, modules=[nn.LayerNorm, "*Norm*", "torch.nn.Embedding"], group="no_decay"),
        lwd.DecayRule("c", 0.2, params=["*.bias", re.compile(r".*gamma")], min_ndim=1, max_ndim=3, lr_scale=0.5),
        lwd.DecayRule("d", 0.3, predicate=module_level_predicate, optional=True),
        *presets.standard(0.05),
        *presets.gpt(0.1),
    ],
    ids=lambda r: r.name,
)
def test_rules_pickle_and_copy(rule):
    lin = nn.Linear(2, 2)
    before = [rule.matches("fc.weight", lin.weight, lin), rule.matches("fc.bias", lin.bias, lin)]
    for clone in (pickle.loads(pickle.dumps(rule)), copy.deepcopy(rule), copy.copy(rule)):
        assert clone == rule and hash(clone) == hash(rule)
        assert [clone.matches("fc.weight", lin.weight, lin), clone.matches("fc.bias", lin.bias, lin)] == before
    # Derived caches never travel in the pickle.
    state = rule.__getstate__()
    assert set(state) == {
        "name",
        "weight_decay",
        "modules",
        "params",
        "min_ndim",
        "max_ndim",
        "predicate",
        "lr_scale",
        "group",
        "optional",
    }


def test_rule_list_pickles_after_use():
    rules = presets.standard(0.05)
    lwd.DecayPlan.from_module(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), rules)  # fills the caches
    assert pickle.loads(pickle.dumps(rules)) == rules


# ------------------------------------------------------------------ construction from strings
def test_rule_from_plain_strings_as_a_config_file_gives_them():
    config = yaml.safe_load(
        """
        - name: no_decay_norms
          weight_decay: 0.0
          modules: [torch.nn.LayerNorm, "*Norm*"]
        - name: no_decay_bias
          weight_decay: 0
          params: "*.bias"
          group: no_decay_norms
        - name: decay
          weight_decay: 0.05
          modules: torch.nn.Linear
          min_ndim: 2
        """
    )
    rules = [lwd.DecayRule(**entry) for entry in config]
    assert rules[0].modules == ("torch.nn.LayerNorm", "*Norm*")
    assert rules[1].group_name == "no_decay_norms" and rules[1].weight_decay == 0.0
    model = nn.Sequential(OrderedDict(fc=nn.Linear(2, 2), norm=RMSNorm(2), ln=nn.LayerNorm(2)))
    groups = lwd.build_param_groups(model, rules)
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in groups] == [
        ("no_decay_norms", 0.0, ["fc.bias", "norm.weight", "ln.weight", "ln.bias"]),
        ("decay", 0.05, ["fc.weight"]),
    ]


def test_rules_through_jsonargparse_class_path_and_plain_dicts():
    """LightningCLI parses `list[DecayRule]` with jsonargparse: class_path/init_args or plain dicts."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--rules", type=list[lwd.DecayRule] | None, default=None)
    value = [
        {
            "class_path": "lightning_wd.DecayRule",
            "init_args": {"name": "norms", "weight_decay": 0.0, "modules": ["torch.nn.LayerNorm", "*Norm*"]},
        },
        {"name": "bias", "weight_decay": 0.0, "predicate": "lightning_wd.presets.is_bias", "group": "norms"},
        {"name": "linear", "weight_decay": 0.1, "modules": "torch.nn.Linear", "lr_scale": 0.5},
    ]
    cfg = parser.parse_args(["--rules", yaml.safe_dump(value)])
    rules = parser.instantiate(cfg).rules
    assert rules == [
        lwd.DecayRule("norms", 0.0, modules=("torch.nn.LayerNorm", "*Norm*")),
        lwd.DecayRule("bias", 0.0, predicate=presets.is_bias, group="norms"),
        lwd.DecayRule("linear", 0.1, modules="torch.nn.Linear", lr_scale=0.5),
    ]
