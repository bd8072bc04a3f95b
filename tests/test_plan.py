"""DecayPlan: properties over random module trees, and one test per failure the peers' users hit.

The property tests compare the plan with an independent reference written here
(``reference_plan``): it walks ``named_modules(remove_duplicate=False)`` itself and applies the
documented resolution (marks first, then the first rule, in list order, matching any alias;
the default group last). Whether one rule matches one name is ``DecayRule.matches``, which
``test_rules.py`` checks against hand-written tables.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lightning_wd as lwd
from lightning_wd import presets
from lightning_wd.plan import PlanError
from tests.helpers import RunIf
from tests.models import (
    CheckpointWrapper,
    DistributedDataParallel,
    RMSNorm,
    TiedTransformerLM,
    TinyNet,
    Wrapped,
)


# ===================================================================== random module trees
class Holder(nn.Module):
    """A plain container with attribute children and optional free parameters."""


class FreeParams(nn.Module):
    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        for i, shape in enumerate(shapes):
            setattr(self, f"p{i}", nn.Parameter(torch.zeros(shape)))


class HookedLinear(nn.Linear):
    """timm-style hook: names relative to this module."""

    def no_weight_decay(self) -> list[str]:
        return ["bias"]


class HookedBlock(nn.Module):
    """Marks a whole submodule by name, and keywords under itself."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 4)

    def no_weight_decay(self) -> set[str]:
        return {"proj"}

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        return ("scale",)


LEAVES = {
    "linear": lambda: nn.Linear(4, 4),
    "linear_nobias": lambda: nn.Linear(4, 4, bias=False),
    "layernorm": lambda: nn.LayerNorm(4),
    "rmsnorm": lambda: RMSNorm(4),
    "embedding": lambda: nn.Embedding(4, 4),
    "conv": lambda: nn.Conv1d(4, 4, 1),
    "hooked_linear": lambda: HookedLinear(4, 4),
    "hooked_block": lambda: HookedBlock(),
    "identity": lambda: nn.Identity(),
}
FREE_SHAPES = st.sampled_from([(), (4,), (4, 4), (1, 2, 4), (3, 4, 4)])


@st.composite
def module_trees(draw: st.DrawFn) -> nn.Module:
    pool: list[nn.Module] = []

    def build(depth: int) -> nn.Module:
        kinds = ["leaf", "leaf", "free", "shared", "sequential", "modulelist", "moduledict", "holder"]
        kind = draw(st.sampled_from(kinds if depth < 3 else kinds[:4]))
        if kind == "shared" and pool:
            return draw(st.sampled_from(pool))  # the same submodule reachable by a second path
        if kind in ("leaf", "shared"):
            module = LEAVES[draw(st.sampled_from(sorted(LEAVES)))]()
        elif kind == "free":
            module = FreeParams(draw(st.lists(FREE_SHAPES, min_size=1, max_size=3)))
        else:
            children = [build(depth + 1) for _ in range(draw(st.integers(0, 3)))]
            if kind == "sequential":
                module = nn.Sequential(*children)
            elif kind == "modulelist":
                module = nn.ModuleList(children)
            elif kind == "moduledict":
                module = nn.ModuleDict({f"k{i}": c for i, c in enumerate(children)})
            else:
                module = Holder()
                for i, c in enumerate(children):
                    setattr(module, f"c{i}", c)
                for i, shape in enumerate(draw(st.lists(FREE_SHAPES, max_size=2))):
                    setattr(module, f"free{i}", nn.Parameter(torch.zeros(shape)))
        pool.append(module)
        return module

    root = Holder()
    for i in range(draw(st.integers(1, 4))):
        setattr(root, f"m{i}", build(1))
    if draw(st.booleans()):
        # A tie across module kinds (an embedding and an output head, in either order) ...
        kinds = st.sampled_from(["linear", "linear_nobias", "embedding", "hooked_linear"])
        root.tie_a, root.tie_b = LEAVES[draw(kinds)](), LEAVES[draw(kinds)]()
        root.tie_b.weight = root.tie_a.weight
    if pool and draw(st.booleans()):
        root.again = draw(st.sampled_from(pool))  # ... and a submodule reachable a second time

    # Tie some (4, 4) weights: the second module now holds the first one's parameter.
    holders = [m for m in root.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    square = [m for m in dict.fromkeys(holders) if m.weight.shape == (4, 4)]
    if len(square) >= 2:
        for a, b in draw(st.lists(st.tuples(st.sampled_from(square), st.sampled_from(square)), max_size=2)):
            if a is not b:
                b.weight = a.weight

    params = list(root.parameters())
    if params:
        for p in draw(st.lists(st.sampled_from(params), max_size=3)):
            p.requires_grad_(False)
        for p in draw(st.lists(st.sampled_from(params), max_size=2)):
            p._no_weight_decay = True
    return root


MODULE_SPECS = [nn.Linear, "*Norm*", "torch.nn.Embedding", "Holder", "FreeParams", "_ConvNd", "HookedLinear"]
PARAM_SPECS = ["*.bias", "*.weight", "*p0", "*.0.*", "m1.*", "tie_b.*", "again.*", re.compile(r".*\d.*")]
PREDICATES = [presets.is_bias, presets.is_linear_weight, presets.is_normalization]


@st.composite
def rule_lists(draw: st.DrawFn) -> list[lwd.DecayRule]:
    rules = []
    for i in range(draw(st.integers(0, 5))):
        wd = draw(st.sampled_from([0.0, 0.01, 0.1]))
        lr_scale = draw(st.sampled_from([1.0, 0.5]))
        lo = draw(st.none() | st.integers(0, 3))
        hi = draw(st.none() | st.integers(lo or 0, 3))
        rules.append(
            lwd.DecayRule(
                f"r{i}",
                wd,
                modules=draw(st.none() | st.sampled_from(MODULE_SPECS)),
                params=draw(st.none() | st.sampled_from(PARAM_SPECS)),
                min_ndim=lo,
                max_ndim=hi,
                predicate=draw(st.none() | st.sampled_from(PREDICATES)),
                lr_scale=lr_scale,
                # Shared groups agree on their settings by construction.
                group=draw(st.sampled_from([None, f"g{wd}x{lr_scale}"])),
                optional=draw(st.booleans()),
            )
        )
    return rules


plan_options = st.fixed_dictionaries(
    {
        "include_frozen": st.booleans(),
        "respect_no_weight_decay": st.booleans(),
        "default_weight_decay": st.sampled_from([0.0, 0.05]),
        "merge": st.booleans(),
    }
)


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters by identity in registration order (torch's own dedup)."""
    return list(model.parameters())


def reference_plan(model: nn.Module, rules: list[lwd.DecayRule], options: dict) -> dict:
    """The documented resolution, written independently of lightning_wd.plan."""
    aliases: dict[int, list[tuple[str, nn.Module]]] = {}
    hook_exact: list[str] = []
    hook_keywords: list[tuple[str, str]] = []
    for path, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        if hasattr(type(mod), "no_weight_decay"):
            hook_exact += [prefix + n for n in mod.no_weight_decay()]
        if hasattr(type(mod), "no_weight_decay_keywords"):
            hook_keywords += [(prefix, k) for k in mod.no_weight_decay_keywords()]
        for pname, p in mod._parameters.items():
            if p is not None:
                names = aliases.setdefault(id(p), [])
                if all(n != prefix + pname for n, _ in names):
                    names.append((prefix + pname, mod))

    def marked(p: nn.Parameter) -> bool:
        if not options["respect_no_weight_decay"]:
            return False
        if getattr(p, "_no_weight_decay", False) is True:
            return True
        for n, _ in aliases[id(p)]:
            if any(n == h or n.startswith(h + ".") for h in hook_exact):
                return True
            if any(n.startswith(pre) and kw in n[len(pre) :] for pre, kw in hook_keywords):
                return True
        return False

    default = "no_decay" if options["default_weight_decay"] == 0 else "default"
    settings = {r.group_name: (r.weight_decay, r.lr_scale) for r in rules}
    settings.setdefault("no_decay", (0.0, 1.0))
    settings.setdefault(default, (options["default_weight_decay"], 1.0))
    planned = [p for p in unique_params(model) if p.requires_grad or options["include_frozen"]]
    group_of: dict[int, str] = {}
    hits = dict.fromkeys((r.name for r in rules), 0)
    any_marked = False
    for p in planned:
        if marked(p):
            group_of[id(p)] = "no_decay"
            any_marked = True
            continue
        group_of[id(p)] = default
        for rule in rules:
            if any(rule.matches(n, p, o) for n, o in aliases[id(p)]):
                group_of[id(p)] = rule.group_name
                hits[rule.name] += 1
                break
    order = list(dict.fromkeys([r.group_name for r in rules] + (["no_decay"] if any_marked else []) + [default]))
    groups = [(g, [p for p in planned if group_of[id(p)] == g]) for g in order]
    groups = [(g, ps) for g, ps in groups if ps]
    if options["merge"]:
        merged: dict[tuple[float, float], tuple[list[str], list[nn.Parameter]]] = {}
        for g, ps in groups:
            names, members = merged.setdefault(settings[g], ([], []))
            names.append(g)
            members.extend(ps)
        groups = [("+".join(names), ps) for names, ps in merged.values()]
    return {
        "groups": [(g, [id(p) for p in ps]) for g, ps in groups],
        "group_of": group_of,
        "unclaimed": tuple(r.name for r in rules if hits[r.name] == 0 and not r.optional),
        "frozen": sum(1 for p in unique_params(model) if not (p.requires_grad or options["include_frozen"])),
        "first_name": {k: v[0][0] for k, v in aliases.items()},
    }


def build_quietly(model: nn.Module, rules: list[lwd.DecayRule], options: dict) -> lwd.DecayPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lwd.DecayPlan.from_module(model, rules, **options)


def signature(plan: lwd.DecayPlan) -> list[tuple[str, float, float, tuple[str, ...]]]:
    return [(g.name, g.weight_decay, g.lr_scale, g.param_names) for g in plan.groups]


@given(model=module_trees(), rules=rule_lists(), options=plan_options)
def test_plan_matches_reference_and_partitions_parameters(model, rules, options):
    expected = reference_plan(model, rules, options)
    if not expected["group_of"]:
        with pytest.raises(PlanError, match="has no trainable parameter"):
            build_quietly(model, rules, options)
        return
    plan = build_quietly(model, rules, options)

    # Every planned parameter in exactly one group, by identity; nothing frozen unless asked.
    ids = [id(p) for g in plan.groups for p in g.params]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(expected["group_of"])
    if not options["include_frozen"]:
        assert all(p.requires_grad for g in plan.groups for p in g.params)
    assert len(plan.frozen) == expected["frozen"]

    # The documented resolution: groups, their order, and the order inside each group.
    assert [(g.name, [id(p) for p in g.params]) for g in plan.groups] == expected["groups"]
    assert {id(e_p): e.group for e, e_p in zip(plan.entries, _entry_params(plan), strict=True)} == expected["group_of"]
    assert plan.unclaimed_rules == expected["unclaimed"]

    # Names: unique groups, unique parameter names, primary name = first registration path.
    names = [g.name for g in plan.groups]
    assert len(names) == len(set(names))
    param_names = [n for g in plan.groups for n in g.param_names]
    assert len(param_names) == len(set(param_names))
    assert [n for g in plan.groups for n in g.param_names] == [
        expected["first_name"][id(p)] for g in plan.groups for p in g.params
    ]


def _entry_params(plan: lwd.DecayPlan) -> list[nn.Parameter]:
    by_name = {n: p for g in plan.groups for n, p in zip(g.param_names, g.params, strict=True)}
    return [by_name[e.name] for e in plan.entries]


@given(model=module_trees(), rules=rule_lists(), options=plan_options)
def test_plan_is_deterministic_across_rebuilds_and_copies(model, rules, options):
    if not any(p.requires_grad or options["include_frozen"] for p in model.parameters()):
        return
    first = build_quietly(model, rules, options)
    again = build_quietly(model, rules, options)
    assert signature(again) == signature(first)
    assert [[id(p) for p in g.params] for g in again.groups] == [[id(p) for p in g.params] for g in first.groups]
    assert [g.param_names for g in again.groups] == [tuple(n for n in g.param_names) for g in first.groups]

    clone = copy.deepcopy(model)
    # torch's Parameter.__deepcopy__ drops Python attributes such as the `_no_weight_decay` flag:
    # carry it over (the plan of a copy is only comparable with the same marks).
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        if getattr(p, "_no_weight_decay", False):
            q._no_weight_decay = True
    copied = build_quietly(clone, rules, options)
    assert signature(copied) == signature(first)
    # ... and the copy's groups hold the copy's tensors, tied ones still tied.
    clone_ids = {id(p) for p in clone.parameters()}
    assert all(id(p) in clone_ids for g in copied.groups for p in g.params)

    groups = first.param_groups(lr=0.1)
    assert [g["name"] for g in groups] == [g.name for g in first.groups]
    for g, planned in zip(groups, first.groups, strict=True):
        assert g["params"] == list(planned.params) and g["param_names"] == list(planned.param_names)
        assert g["weight_decay"] == planned.weight_decay
        assert "lr_scale" not in g
        assert ("lr" in g) is (planned.lr_scale != 1.0)
        if "lr" in g:
            assert g["lr"] == pytest.approx(0.1 * planned.lr_scale)


@given(model=module_trees())
def test_optimizer_accepts_every_plan(model):
    """torch refuses duplicate parameters across groups: the plan never gives it any."""
    if not any(p.requires_grad for p in model.parameters()):
        return
    groups = lwd.build_param_groups(model)
    opt = torch.optim.SGD(groups, lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len([p for p in model.parameters() if p.requires_grad])


# ============================================================== the peers' failure stories
class TiedHeadLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.tok.weight


def test_tied_embedding_in_exactly_one_group_and_not_decayed():
    model = TiedHeadLM()
    groups = lwd.build_param_groups(model, presets.standard(0.1))
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in groups] == [
        ("no_decay", 0.0, ["tok.weight", "proj.bias"]),
        ("decay", 0.1, ["proj.weight"]),
    ]
    occurrences = [p for g in groups for p in g["params"] if p is model.head.weight]
    assert len(occurrences) == 1
    torch.optim.AdamW(groups)  # torch raises on a parameter in two groups


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.proj = nn.Linear(4, 4)
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "blocks.1"}  # relative to this module; a submodule marks all below it


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(3, 4))  # same leaf name, not named by the hook
        self.backbone = Backbone()


def test_no_weight_decay_hook_on_a_nested_submodule_names_relative_to_it():
    plan = lwd.DecayPlan.from_module(Outer(), presets.gpt(0.1))
    groups = {g.name: g.param_names for g in plan.groups}
    assert groups == {
        "decay": ("pos_embed", "backbone.encoder.proj.weight", "backbone.encoder.blocks.0.weight"),
        "no_decay": (
            "backbone.encoder.pos_embed",  # registration order: Encoder registers pos_embed first
            "backbone.encoder.proj.bias",
            "backbone.encoder.blocks.0.bias",
            "backbone.encoder.blocks.1.weight",
            "backbone.encoder.blocks.1.bias",
        ),
    }
    marked = {e.name for e in plan.entries if e.marked}
    assert marked == {
        "backbone.encoder.pos_embed",
        "backbone.encoder.blocks.1.weight",
        "backbone.encoder.blocks.1.bias",
    }
    # Switched off, gpt's ndim rule decides alone.
    plain = lwd.DecayPlan.from_module(Outer(), presets.gpt(0.1), respect_no_weight_decay=False)
    assert "backbone.encoder.pos_embed" in plain.groups[0].param_names


def test_no_weight_decay_hook_behind_wrappers():
    model = Wrapped(DistributedDataParallel(Backbone()))
    plan = lwd.DecayPlan.from_module(model, presets.gpt(0.1))
    decay = next(g for g in plan.groups if g.name == "decay")
    assert decay.param_names == ("model.encoder.proj.weight", "model.encoder.blocks.0.weight")
    assert plan.entry("model.encoder.pos_embed").marked
    assert plan.entry("model.module.encoder.pos_embed").name == "model.encoder.pos_embed"  # raw name works too


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Holder(), Holder()])
        for layer in self.layers:
            layer.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
            layer.fc = nn.Linear(4, 4)

    def no_weight_decay_keywords(self) -> list[str]:
        return ["relative_position"]


def test_no_weight_decay_keywords_hook():
    plan = lwd.DecayPlan.from_module(KeywordModel(), presets.uniform(0.1))
    assert {e.name for e in plan.entries if e.marked} == {
        "layers.0.relative_position_bias_table",
        "layers.1.relative_position_bias_table",
    }


def test_no_weight_decay_flag_on_a_parameter():
    model = TinyNet()
    model.fc1.weight._no_weight_decay = True
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1))
    assert plan.groups[1].name == "decay" and plan.groups[1].param_names == ("fc2.weight",)
    entry = plan.entry("fc1.weight")
    assert (entry.group, entry.rule, entry.marked) == ("no_decay", "no_weight_decay", True)
    assert plan.explain("fc1.weight") == (
        "fc1.weight: group 'no_decay' (weight decay 0.0), marked no-decay by a `_no_weight_decay` flag or a"
        " `no_weight_decay()` hook; also matched by ['linear']; shape (4, 4), owner Linear"
    )
    model.fc1.weight._no_weight_decay = False
    assert not lwd.DecayPlan.from_module(model, presets.standard(0.1)).entry("fc1.weight").marked


def test_a_rule_called_no_weight_decay_is_an_ordinary_rule():
    """The marked-parameter label must not capture a user rule of the same name."""
    model = TinyNet()
    rules = [lwd.DecayRule("no_weight_decay", 0.0, params="*.bias", group="biases"), *presets.standard(0.1)]
    groups = lwd.build_param_groups(model, rules)
    assert [(g["name"], g["param_names"]) for g in groups] == [
        ("biases", ["fc1.bias", "norm.bias", "fc2.bias"]),
        ("no_decay", ["norm.weight"]),
        ("decay", ["fc1.weight", "fc2.weight"]),
    ]


def test_custom_norm_not_subclassing_torch():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4, bias=False), norm=RMSNorm(4), gain=RMSNorm(4, param="scale")))
    rules = [lwd.DecayRule("norms", 0.0, modules="*Norm*"), lwd.DecayRule("rest", 0.1)]
    groups = lwd.build_param_groups(model, rules)
    assert [(g["name"], g["param_names"]) for g in groups] == [
        ("norms", ["norm.weight", "gain.scale"]),
        ("rest", ["fc.weight"]),
    ]


class SegModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.decode_head = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def test_glob_does_not_over_match_like_a_substring():
    rules = [lwd.DecayRule("head", 0.0, params="head.*"), lwd.DecayRule("rest", 0.1)]
    groups = lwd.build_param_groups(SegModel(), rules)
    assert [(g["name"], g["param_names"]) for g in groups] == [
        ("head", ["head.weight", "head.bias"]),
        ("rest", ["backbone.weight", "backbone.bias", "decode_head.weight", "decode_head.bias"]),
    ]


class FlatParameter(nn.Parameter):
    """Same class name as FSDP1's flat parameter."""


def test_fsdp_flat_parameters_are_refused():
    fsdp = Holder()
    fsdp._fsdp_wrapped_module = Holder()
    fsdp._fsdp_wrapped_module._flat_param = nn.Parameter(torch.zeros(20))
    with pytest.raises(PlanError, match=r"Parameter '_flat_param' is an FSDP flat parameter.*use_orig_params=True"):
        lwd.DecayPlan.from_module(fsdp, presets.standard())
    model = Holder()
    model.flat = FlatParameter(torch.zeros(20))
    with pytest.raises(PlanError, match="'flat' is an FSDP flat parameter"):
        lwd.build_param_groups(model)


def test_deepspeed_empty_parameters_use_ds_shape_for_ndim_rules():
    model = TinyNet()
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    plan = lwd.DecayPlan.from_module(model, presets.gpt(0.1))
    assert [(g.name, g.param_names, g.numel) for g in plan.groups] == [
        ("decay", ("fc1.weight", "fc2.weight"), 24),
        ("no_decay", ("fc1.bias", "norm.weight", "norm.bias", "fc2.bias"), 14),
    ]
    assert plan.entry("fc2.weight").shape == (2, 4)


TINY_NAMES = ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]


def planned_names(model: nn.Module) -> list[str]:
    return [n for g in lwd.DecayPlan.from_module(model, presets.none()).groups for n in g.param_names]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports on first use of torch.compile
def test_torch_compile_prefix_is_stripped():
    compiled = torch.compile(TinyNet())  # only wrapped: nothing is compiled until a forward
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    assert planned_names(compiled) == TINY_NAMES
    plan = lwd.DecayPlan.from_module(compiled, presets.standard(0.1))
    assert plan.groups[1].param_names == ("fc1.weight", "fc2.weight")
    assert plan.entry("_orig_mod.fc1.weight").name == "fc1.weight"


def test_ddp_and_checkpoint_wrapper_prefixes_are_stripped():
    assert planned_names(DistributedDataParallel(TinyNet())) == TINY_NAMES
    assert planned_names(CheckpointWrapper(TinyNet())) == TINY_NAMES
    nested = Wrapped(DistributedDataParallel(CheckpointWrapper(TinyNet())))
    assert planned_names(nested) == [f"model.{n}" for n in TINY_NAMES]
    # A submodule merely *called* `module` inside an ordinary class keeps its name.
    plain = Holder()
    plain.module = TinyNet()
    assert planned_names(plain) == [f"module.{n}" for n in TINY_NAMES]


def test_real_checkpoint_wrapper_is_stripped():
    cw = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    model = Holder()
    model.block = cw.checkpoint_wrapper(TinyNet())
    assert planned_names(model) == [f"block.{n}" for n in TINY_NAMES]


def test_lazy_modules_are_refused_before_their_first_forward():
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(2))
    with pytest.raises(PlanError, match=r"uninitialized lazy parameter '1.weight'.*Run one forward pass"):
        lwd.DecayPlan.from_module(model, presets.standard())
    model(torch.zeros(1, 4))
    assert planned_names(model) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_frozen_parameters_are_left_out_and_listed():
    model = TinyNet()
    model.fc1.requires_grad_(False)
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1))
    assert plan.frozen == ("fc1.weight", "fc1.bias")
    assert [n for g in plan.groups for n in g.param_names] == ["norm.weight", "norm.bias", "fc2.bias", "fc2.weight"]
    with pytest.raises(KeyError, match=r"'fc1.weight'; .* It is frozen .*plan it with include_frozen=True"):
        plan.entry("fc1.weight")
    assert plan.table().endswith("frozen, not planned: 2 tensors")
    everything = lwd.DecayPlan.from_module(model, presets.standard(0.1), include_frozen=True)
    assert everything.frozen == ()
    assert everything.groups[1].param_names == ("fc1.weight", "fc2.weight")
    model.requires_grad_(False)
    with pytest.raises(PlanError, match=r"no trainable parameter \(all 6 are frozen; pass include_frozen=True"):
        lwd.DecayPlan.from_module(model, presets.standard(0.1))


@pytest.mark.parametrize(
    ("rules", "error", "match"),
    [
        ({lwd.DecayRule("a", 0.1)}, TypeError, r"`rules` was given as a set.*Pass a list"),
        (frozenset({lwd.DecayRule("a", 0.1)}), TypeError, r"`rules` was given as a set"),
        ("standard", TypeError, r"`rules` must be a list of DecayRule, got str"),
        ([lwd.DecayRule("a", 0.1), "b"], TypeError, r"`rules\[1\]` must be a DecayRule, got str"),
        ([lwd.DecayRule("a", 0.1), lwd.DecayRule("a", 0.0)], PlanError, r"duplicate rule names \['a'\]"),
        (
            [lwd.DecayRule("a", 0.1, group="g"), lwd.DecayRule("b", 0.0, group="g")],
            PlanError,
            r"[Gg]roup 'g' is given weight_decay=0.1, lr_scale=1.0 by rule 'a' but weight_decay=0.0, lr_scale=1.0 by"
            r" rule 'b'",
        ),
        (
            [lwd.DecayRule("a", 0.1, group="g"), lwd.DecayRule("b", 0.1, group="g", lr_scale=2)],
            PlanError,
            r"[Gg]roup 'g' .* lr_scale=2.0 by rule 'b'",
        ),
    ],
)
def test_bad_rule_lists(rules, error, match):
    with pytest.raises(error, match=match):
        lwd.DecayPlan.from_module(TinyNet(), rules)


def test_plan_errors_are_value_errors_and_bad_arguments():
    assert issubclass(PlanError, ValueError)
    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.Module, got list"):
        lwd.DecayPlan.from_module([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="`default_weight_decay` must be >= 0"):
        lwd.DecayPlan.from_module(TinyNet(), default_weight_decay=-1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) `lr_scale`; use any of the following"):
        lwd.build_param_groups(TinyNet(), lr_scale=2)


def test_marked_group_conflicting_with_a_rule_group():
    model = TinyNet()
    model.fc1.weight._no_weight_decay = True
    with pytest.raises(PlanError, match=r"Group 'no_decay' .* by the no_weight_decay convention"):
        lwd.DecayPlan.from_module(model, [lwd.DecayRule("x", 0.1, params="*.bias", group="no_decay")])


def test_default_group_collects_unclaimed_parameters():
    rules = [lwd.DecayRule("decay", 0.1, modules=nn.Linear, params="*.weight")]
    plan = lwd.DecayPlan.from_module(TinyNet(), rules, default_weight_decay=0.01)
    assert [(g.name, g.weight_decay, g.rules, g.param_names) for g in plan.groups] == [
        ("decay", 0.1, ("decay",), ("fc1.weight", "fc2.weight")),
        ("default", 0.01, ("<default>",), ("fc1.bias", "norm.weight", "norm.bias", "fc2.bias")),
    ]
    plan = lwd.DecayPlan.from_module(TinyNet(), rules, default_group="rest")
    assert [(g.name, g.weight_decay) for g in plan.groups] == [("decay", 0.1), ("rest", 0.0)]
    assert plan.explain("norm.bias") == (
        "norm.bias: group 'rest' (weight decay 0.0), claimed by no rule (default group); shape (4,), owner LayerNorm"
    )


def test_default_group_conflicting_with_a_rule_group():
    rules = [lwd.DecayRule("decay", 0.1, params="*.weight", group="no_decay")]
    with pytest.raises(PlanError, match=r"Group 'no_decay' is given weight_decay=0.1.* by the default group"):
        lwd.DecayPlan.from_module(TinyNet(), rules)


def test_unclaimed_rule_warns_and_strict_raises():
    rules = [lwd.DecayRule("convs", 0.1, modules=nn.Conv2d), lwd.DecayRule("all", 0.0)]
    with pytest.warns(UserWarning, match=r"Decay rule\(s\) \['convs'\] claimed no parameter of TinyNet"):
        plan = lwd.DecayPlan.from_module(TinyNet(), rules)
    assert plan.unclaimed_rules == ("convs",)
    assert plan.table().endswith("rules that claimed nothing: convs")
    with pytest.raises(PlanError, match=r"\['convs'\] claimed no parameter"):
        lwd.DecayPlan.from_module(TinyNet(), rules, strict=True)
    # A rule shadowed by an earlier one claims nothing either.
    shadowed = [lwd.DecayRule("all", 0.0), lwd.DecayRule("bias", 0.0, params="*.bias")]
    with pytest.raises(PlanError, match=r"\['bias'\]"):
        lwd.DecayPlan.from_module(TinyNet(), shadowed, strict=True)
    # optional rules never warn
    optional = [lwd.DecayRule("convs", 0.1, modules=nn.Conv2d, optional=True), lwd.DecayRule("all", 0.0)]
    assert lwd.DecayPlan.from_module(TinyNet(), optional, strict=True).unclaimed_rules == ()


def test_merge_joins_groups_with_identical_settings():
    rules = [
        lwd.DecayRule("norms", 0.0, modules="*Norm*"),
        lwd.DecayRule("linear", 0.1, params="*.weight"),
        lwd.DecayRule("biases", 0.0, params="*.bias"),
    ]
    plan = lwd.DecayPlan.from_module(TinyNet(), rules, merge=True)
    assert [(g.name, g.weight_decay, g.rules, g.param_names) for g in plan.groups] == [
        ("norms+biases", 0.0, ("norms", "biases"), ("norm.weight", "norm.bias", "fc1.bias", "fc2.bias")),
        ("linear", 0.1, ("linear",), ("fc1.weight", "fc2.weight")),
    ]
    assert plan.entry("fc1.bias").group == "biases"
    assert plan.explain("fc1.bias").startswith("fc1.bias: group 'norms+biases' (weight decay 0.0), claimed by rule")
    unmerged = lwd.DecayPlan.from_module(TinyNet(), rules)
    assert [g.name for g in unmerged.groups] == ["norms", "linear", "biases"]


def test_explain_texts():
    plan = lwd.DecayPlan.from_module(TiedHeadLM(), presets.standard(0.1))
    assert plan.explain("head.weight") == (
        "tok.weight: group 'no_decay' (weight decay 0.0), claimed by rule 'embedding'; also matched by ['linear'];"
        " aliases ['tok.weight', 'head.weight']; shape (10, 4), owner Embedding/Linear"
    )
    assert plan.explain("proj.weight") == (
        "proj.weight: group 'decay' (weight decay 0.1), claimed by rule 'linear'; shape (4, 4), owner Linear"
    )
    assert plan.explain("proj.bias") == (
        "proj.bias: group 'no_decay' (weight decay 0.0), claimed by rule 'bias'; shape (4,), owner Linear"
    )
    with pytest.raises(KeyError, match=r"No planned parameter is named 'nope.weight'"):
        plan.explain("nope.weight")


def test_table_text():
    plan = lwd.DecayPlan.from_module(TinyNet(), presets.standard(0.05))
    assert plan.table() == "\n".join(
        [
            "group     rules               tensors  elements  weight_decay  lr_scale",
            "--------  ------------------  -------  --------  ------------  --------",
            "no_decay  bias,normalization        4        14             0         1",
            "decay     linear                    2        24          0.05         1",
            "--------  ------------------  -------  --------  ------------  --------",
            "total                               6        38",
        ]
    )
    assert str(plan) == plan.table()
    assert repr(plan) == "DecayPlan(no_decay=4, decay=2)"


def _timm_style_update(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """What timm's ``Scheduler.update_groups`` does: each group's ``initial_lr`` times the schedule's factor,
    times the group's ``lr_scale`` where it has that key."""
    for g in optimizer.param_groups:
        value = g["initial_lr"] * factor
        g["lr"] = value * g["lr_scale"] if "lr_scale" in g else value


def test_scaled_rules_reach_the_optimizer_lr_exactly_once():
    rules = [
        lwd.DecayRule("norms", 0.0, modules="*Norm*", lr_scale=0.5),
        lwd.DecayRule("rest", 0.1),
    ]
    groups = lwd.build_param_groups(TinyNet(), rules, lr=0.02)
    # 0.02 * 0.5 = 0.01 written as the absolute lr; the unscaled group sets none (the optimizer's applies)
    assert [(g["name"], g.get("lr")) for g in groups] == [("norms", 0.01), ("rest", None)]
    assert not any("lr_scale" in g for g in groups)
    opt = torch.optim.SGD(groups, lr=0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.02]
    # a timm-style scheduler keeps the scale once: at factor 1 the lrs stay 0.01 and 0.02 (not 0.005),
    # at factor 0.5 they become 0.005 and 0.01
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    _timm_style_update(opt, 1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.02]
    _timm_style_update(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.005, 0.01]


def test_scaled_rules_without_lr_are_refused_unless_the_scale_has_a_key():
    rules = [
        lwd.DecayRule("norms", 0.0, modules="*Norm*", lr_scale=0.5),
        lwd.DecayRule("rest", 0.1),
    ]
    message = (
        r"`lr` is None, but rule 'norms' scales the learning rate of group 'norms' by 0.5; pass the optimizer's"
        r" base lr, for example lr=3e-4, so that the group gets its absolute lr"
    )
    with pytest.raises(ValueError, match=message):
        lwd.build_param_groups(TinyNet(), rules)
    plan = lwd.DecayPlan.from_module(TinyNet(), rules)
    with pytest.raises(ValueError, match=message):
        plan.param_groups()
    # Without a scaled rule no lr is needed, and no group sets one.
    plain = lwd.build_param_groups(TinyNet(), [lwd.DecayRule("rest", 0.1)])
    assert [sorted(g) for g in plain] == [["lwd_planned", "name", "param_names", "params", "weight_decay"]]
    # With `lr_scale_key` the scale goes under that key, in every group, and no lr is written.
    keyed = plan.param_groups(lr_scale_key="lwd_lr_scale")
    assert [(g["name"], g["lwd_lr_scale"]) for g in keyed] == [("norms", 0.5), ("rest", 1.0)]
    assert not any("lr" in g or "lr_scale" in g for g in keyed)
    assert [g["param_names"] for g in keyed] == [
        ["norm.weight", "norm.bias"],
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
    ]


def test_default_rules_are_standard():
    assert signature(lwd.DecayPlan.from_module(TiedTransformerLM())) == signature(
        lwd.DecayPlan.from_module(TiedTransformerLM(), presets.standard())
    )


class FabricModuleLike(nn.Module):
    """Fabric's wrapper holds the model twice: `_forward_module` (maybe DDP-wrapped) and `_original_module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._forward_module = DistributedDataParallel(module)
        self._original_module = module


def test_fabric_style_wrapper_holding_the_model_twice():
    model = FabricModuleLike(TinyNet())
    assert planned_names(model) == TINY_NAMES
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1))
    assert plan.entry("fc1.weight").aliases == ("fc1.weight",)


def test_parametrized_root_module():
    model = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1))
    assert [(g.name, g.param_names) for g in plan.groups] == [("no_decay", ("bias",)), ("decay", ("weight",))]
    assert plan.entry("parametrizations.weight.original").name == "weight"  # raw name works too
    assert plan.entry("weight").owners == ("ParametrizedLinear",)  # torch swaps in a subclass


class BrokenHook(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def no_weight_decay(self) -> list[str]:
        raise RuntimeError("boom")


def test_a_failing_no_weight_decay_hook_is_named():
    model = Holder()
    model.inner = BrokenHook()
    with pytest.raises(PlanError, match=r"`BrokenHook.no_weight_decay\(\)` \(module 'inner'\) raised RuntimeError"):
        lwd.DecayPlan.from_module(model)


def test_hooks_can_be_switched_off():
    model = Holder()
    model.inner = BrokenHook()
    plan = lwd.DecayPlan.from_module(model, presets.none(), respect_no_weight_decay=False)
    assert plan.groups[0].param_names == ("inner.fc.weight", "inner.fc.bias")


def test_two_tensors_with_one_canonical_name_are_refused():
    ddp = DistributedDataParallel(TinyNet())
    ddp.fc1 = nn.Linear(4, 4)  # 'module.fc1.weight' and 'fc1.weight' both canonicalise to 'fc1.weight'
    with pytest.raises(PlanError, match=r"Two different parameters have the canonical name 'fc1.weight'"):
        lwd.DecayPlan.from_module(ddp)


@RunIf(cuda=True)
def test_plan_of_a_cuda_model_holds_the_cuda_tensors():
    model = TinyNet().cuda()
    groups = lwd.build_param_groups(model, presets.standard(0.1))
    assert [(g["name"], g["param_names"]) for g in groups] == [
        ("no_decay", ["fc1.bias", "norm.weight", "norm.bias", "fc2.bias"]),
        ("decay", ["fc1.weight", "fc2.weight"]),
    ]
    assert all(p.is_cuda for g in groups for p in g["params"])
    torch.optim.AdamW(groups, lr=1e-3, fused=True)


def test_unknown_names_suggest_close_aliases_and_say_how_to_list_names():
    plan = lwd.DecayPlan.from_module(TinyNet(), presets.standard(0.1))
    # difflib ratios against 'fc1.wieght': fc1.weight 0.9, fc2.weight 0.8 (over the 0.6 cutoff), norm.weight 0.57
    with pytest.raises(KeyError) as info:
        plan.entry("fc1.wieght")
    message = info.value.args[0]
    assert message == (
        "No planned parameter is named 'fc1.wieght'; `name` must be a canonical name or alias of a trainable"
        " parameter. Did you mean 'fc1.weight' or 'fc2.weight'? List the planned names with"
        " `[e.name for e in plan.entries]` (aliases in `e.aliases`), or print `plan.table()` for the groups."
    )
    with pytest.raises(KeyError) as again:
        plan.explain("fc1.wieght")
    assert again.value.args == info.value.args  # explain raises the same KeyError
    with pytest.raises(KeyError, match=r"'zzz'; `name` must be .*trainable parameter\. List the planned"):
        plan.entry("zzz")  # nothing close: no suggestion
    # a raw name (wrapper prefixes) still resolves, and a name that is not a string is a TypeError
    assert plan.entry("_orig_mod.fc1.weight").name == "fc1.weight"
    for method in (plan.entry, plan.explain):
        with pytest.raises(TypeError, match=r"`name` must be a parameter's name as a string, got int 0"):
            method(0)


def test_duplicate_rule_names_are_all_listed_once_sorted():
    rules = [lwd.DecayRule(n, 0.1, params=f"*{i}*") for i, n in enumerate(["b", "a", "c", "b", "a", "b"])]
    with pytest.raises(PlanError, match=r"duplicate rule names \['a', 'b'\]\. Give every rule a unique `name`"):
        lwd.DecayPlan.from_module(TinyNet(), rules)


def test_plan_building_is_linear_in_the_number_of_tensors():
    """The Python work of ``from_module`` (calls and returns, C functions included) per tensor does not grow.

    The machine-independent side of the benchmark target "100k / 10k tensors <= 11x" (whose timings
    also follow the machine's caches): ten times the tensors, ten times the events, within 2 %.
    """

    def events(n_blocks: int) -> int:
        model = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(n_blocks))
        rules = lwd.presets.standard(0.05)
        lwd.DecayPlan.from_module(model, rules)  # warm: regex and class caches
        count = 0

        def profile(frame, event, arg):
            nonlocal count
            count += 1

        sys.setprofile(profile)
        try:
            lwd.DecayPlan.from_module(model, rules)
        finally:
            sys.setprofile(None)
        return count

    small, large = events(100), events(1_000)
    assert 9.0 <= large / small <= 10.2, (small, large)
