"""Property-based fuzzing of rules and plans over random module trees.

* Random rule lists (valid and invalid ``DecayRule`` arguments) and random plan options over
  random module trees raise nothing but the documented errors (``TypeError``, ``ValueError``
  and its subclass ``PlanError``) and warn only with ``UserWarning``; whenever a plan is built
  it agrees with an independent first-match reference written here from DESIGN.md.
* Plans do not depend on string hashing or memory addresses: the same specs planned in fresh
  interpreters with different ``PYTHONHASHSEED`` print identical groups, names and tables.

A spec is plain JSON (a module-tree recipe, rule keyword lists, plan options), so that a
subprocess can rebuild exactly the same model and rules. Examples per property: 300 by
default, ``LWD_HYPOTHESIS_EXAMPLES`` to change it.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import math
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_wd as lwd
from lightning_wd import presets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("LWD_HYPOTHESIS_EXAMPLES", "300"))


# ---------------------------------------------------------------- module trees from a recipe
class MyRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Block(nn.Module):
    """A container whose children are named ``c0``, ``c1``, ..."""


class Holder(nn.Module):
    """Holds one free-standing parameter named by the recipe."""


def build_model(recipe: list[Any]) -> nn.Module:
    """Build the tree for ``recipe`` (a list of ``[node, frozen]``); deterministic given the recipe."""
    torch.manual_seed(0)
    root = Block()
    shared: dict[str, nn.Parameter] = {}
    for i, (node, frozen) in enumerate(recipe):
        child = _build_node(node, shared)
        if frozen:
            for p in child.parameters():
                if not isinstance(p, nn.parameter.UninitializedParameter):  # (lazy ones cannot be frozen)
                    p.requires_grad_(False)
        root.add_module(f"c{i}", child)
    return root


def _build_node(node: list[Any], shared: dict[str, nn.Parameter]) -> nn.Module:
    kind, *args = node
    if kind == "linear":
        return nn.Linear(args[0], args[1], bias=args[2])
    if kind == "conv":
        return nn.Conv1d(args[0], args[1], args[2])
    if kind == "layernorm":
        return nn.LayerNorm(args[0])
    if kind == "rmsnorm":
        return MyRMSNorm(args[0])
    if kind == "embedding":
        emb = nn.Embedding(args[0], args[1])
        shared.setdefault("embedding", emb.weight)
        return emb
    if kind == "tied_head":  # an output head sharing the first embedding's weight, when there is one
        head = nn.Linear(3, 5, bias=False)
        if "embedding" in shared:
            head.weight = shared["embedding"]
        return head
    if kind == "param":
        holder = Holder()
        holder.register_parameter(args[0], nn.Parameter(torch.randn(tuple(args[1]))))
        if args[2]:
            holder.get_parameter(args[0])._no_weight_decay = True  # type: ignore[attr-defined]
        return holder
    if kind == "lazy":
        return nn.LazyLinear(3)
    if kind == "block":
        block = Block()
        for j, sub in enumerate(args[0]):
            block.add_module(f"c{j}", _build_node(sub, shared))
        return block
    raise AssertionError(kind)


# ---------------------------------------------------------------- rules from keyword lists
PREDICATES = {"is_bias": presets.is_bias, "is_linear_weight": presets.is_linear_weight}
CLASSES = {"nn.Linear": nn.Linear, "nn.LayerNorm": nn.LayerNorm, "MyRMSNorm": MyRMSNorm, "int": int}


def _decode(value: Any) -> Any:
    """JSON stand-ins -> objects: {"re": p} a compiled regex, {"cls": k} a class, {"pred": k} a predicate."""
    if isinstance(value, dict) and len(value) == 1:
        ((key, inner),) = value.items()
        if key == "re":
            return re.compile(inner)
        if key == "cls":
            return CLASSES[inner]
        if key == "pred":
            return PREDICATES.get(inner, inner)
        if key == "set":
            return frozenset(_decode(v) for v in inner)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def build_rules(spec: list[dict[str, Any]]) -> tuple[list[lwd.DecayRule], list[str]]:
    """The rules that construct, and the error types of those that do not (documented ones only)."""
    rules, errors = [], []
    for kwargs in spec:
        try:
            rules.append(lwd.DecayRule(**{k: _decode(v) for k, v in kwargs.items()}))
        except (TypeError, ValueError) as err:
            errors.append(type(err).__name__)
    return rules, errors


def plan_summary(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything a plan shows, as JSON: groups with names, λ, lr scale and parameter names, and the table."""
    model = build_model(spec["model"])
    rules, errors = build_rules(spec["rules"])
    out: dict[str, Any] = {"rule_errors": errors}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = lwd.DecayPlan.from_module(model, rules, **spec["options"])
    except (TypeError, ValueError) as err:
        out["error"] = type(err).__name__
        return out
    out["warnings"] = [str(w.message) for w in caught]
    out["groups"] = [[g.name, g.weight_decay, g.lr_scale, list(g.rules), list(g.param_names)] for g in plan.groups]
    out["entries"] = [[e.name, list(e.aliases), e.rule, e.group] for e in plan.entries]
    out["table"] = plan.table()
    out["explain"] = [plan.explain(e.name) for e in plan.entries]
    return out


# ---------------------------------------------------------------- spec generator (hypothesis or a seeded rng)
class _Pick:
    """The two choices a spec generator makes, backed by hypothesis's ``draw`` or a ``random.Random``."""

    def __init__(self, draw: Any = None, rng: random.Random | None = None) -> None:
        self.draw, self.rng = draw, rng

    def choice(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options)) if self.draw else self.rng.choice(options)  # type: ignore[union-attr]

    def int(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high)) if self.draw else self.rng.randint(low, high)  # type: ignore[union-attr]


def gen_node(pick: _Pick, depth: int, lazy: bool) -> list[Any]:
    kinds = ["linear", "conv", "layernorm", "rmsnorm", "embedding", "tied_head", "param"]
    if depth < 2:
        kinds += ["block", "block"]
    if lazy:
        kinds.append("lazy")
    kind = pick.choice(kinds)

    def dim() -> int:
        return pick.int(1, 4)

    if kind == "linear":
        return [kind, dim(), dim(), pick.choice([True, False])]
    if kind == "conv":
        return [kind, dim(), dim(), pick.choice([1, 2])]
    if kind in ("layernorm", "rmsnorm"):
        return [kind, dim()]
    if kind == "embedding":
        return [kind, 5, 3]  # the shape a tied head (Linear(3, 5)) can share
    if kind == "param":
        shape = [dim() for _ in range(pick.int(0, 3))]
        return [kind, pick.choice(["pos_embed", "cls_token", "gamma", "w", "proj"]), shape, pick.choice([False, True])]
    if kind == "block":
        return [kind, [gen_node(pick, depth + 1, lazy) for _ in range(pick.int(1, 3))]]
    return [kind]


VALID = {
    "name": ["a", "b", "c", "decay", "no_decay", "x.y", "r-1"],
    "weight_decay": [0.0, 0.0, 0.01, 0.1, 0.5],
    "modules": [
        None,
        "*Norm*",
        "Linear",
        "Conv?d",
        "torch.nn.Linear",
        "torch.nn.modules.sparse.Embedding",
        "tests.test_fuzz.MyRMSNorm",
        "torch.nn.*",
        {"cls": "nn.LayerNorm"},
        ["*Norm*", {"cls": "nn.Linear"}],
    ],
    "params": [None, "*.bias", "*weight", "c0.*", "*pos*", "c1.c0.*", {"re": r".*\.(weight|bias)"}, ["*.w", "*proj"]],
    "min_ndim": [None, 0, 1, 2, 3],
    "max_ndim": [None, 1, 2, 4],
    "predicate": [None, {"pred": "is_bias"}, {"pred": "is_linear_weight"}],
    "lr_scale": [1.0, 0.5, 2.0],
    "group": [None, "decay", "no_decay", "g"],
    "optional": [False, True],
}
INVALID = {
    "name": ["", "bad name", 3, None],
    "weight_decay": [-0.1, math.nan, math.inf, "0.1", None, True],
    "modules": [
        3,
        "",
        "x" * 300,
        "os.system",
        "math.pi",
        "lwd_no_such_pkg.X",
        "torch.nn.Linearr",
        [],
        {"cls": "int"},
        {"set": ["*Norm*"]},
    ],
    "params": [3, [1], "", "*" * 300, {"re": "a" * 300}, [], {"set": ["*.bias"]}],
    "min_ndim": [-1, 1.5, "2", True],
    "max_ndim": [-2, 2.5],
    "predicate": [3, {"pred": "not callable"}],
    "lr_scale": [0.0, -1.0, math.nan, "1"],
    "group": [3, "", "bad group"],
    "optional": ["yes", 1],
}
OPTIONS_VALID = {
    "include_frozen": [False, True],
    "strict": [False, True],
    "merge": [False, True],
    "respect_no_weight_decay": [True, False],
    "default_weight_decay": [0.0, 0.05],
    "default_group": [None, "default", "rest"],
}
OPTIONS_INVALID = {
    "include_frozen": ["yes"],
    "strict": [1],
    "merge": [None],
    "respect_no_weight_decay": ["no"],
    "default_weight_decay": [-1.0, math.nan, "0"],
    "default_group": [3, "", "a b"],
}


def gen_spec(pick: _Pick, *, invalid: bool) -> dict[str, Any]:
    lazy = invalid and pick.int(0, 9) == 0
    model = [[gen_node(pick, 0, lazy), pick.int(0, 4) == 0] for _ in range(pick.int(1, 4))]
    rules = []
    for i in range(pick.int(0, 5)):
        kwargs: dict[str, Any] = {"name": f"r{i}" if pick.int(0, 3) else pick.choice(VALID["name"])}
        kwargs["weight_decay"] = pick.choice(VALID["weight_decay"])
        for key in ("modules", "params", "min_ndim", "max_ndim", "predicate", "lr_scale", "group", "optional"):
            if pick.int(0, 2) == 0:
                kwargs[key] = pick.choice(VALID[key])
        if invalid and pick.int(0, 3) == 0:
            key = pick.choice(sorted(INVALID))
            kwargs[key] = pick.choice(INVALID[key])
        rules.append(kwargs)
    options: dict[str, Any] = {}
    for key, values in OPTIONS_VALID.items():
        if pick.int(0, 2) == 0:
            options[key] = pick.choice(values)
    if invalid and pick.int(0, 5) == 0:
        key = pick.choice(sorted(OPTIONS_INVALID))
        options[key] = pick.choice(OPTIONS_INVALID[key])
    return {"model": model, "rules": rules, "options": options}


@st.composite
def specs(draw: Any, invalid: bool = True) -> dict[str, Any]:
    return gen_spec(_Pick(draw=draw), invalid=invalid)


# ---------------------------------------------------------------- an independent reference
def _class_matches(entry: Any, owner: nn.Module) -> bool:
    mro = [k for k in type(owner).__mro__ if k is not object]
    if isinstance(entry, type):
        return isinstance(owner, entry)
    if "." in entry and not any(c in entry for c in "*?["):
        module_name, _, attr = entry.rpartition(".")
        return isinstance(owner, getattr(importlib.import_module(module_name), attr))
    if "." in entry:
        return any(fnmatch.fnmatchcase(f"{k.__module__}.{k.__qualname__}", entry) for k in mro)
    return any(fnmatch.fnmatchcase(k.__name__, entry) for k in mro)


def _rule_matches(rule: lwd.DecayRule, name: str, param: torch.Tensor, owner: nn.Module) -> bool:
    if rule.min_ndim is not None and param.dim() < rule.min_ndim:
        return False
    if rule.max_ndim is not None and param.dim() > rule.max_ndim:
        return False
    if rule.params is not None and not any(
        p.fullmatch(name) if isinstance(p, re.Pattern) else fnmatch.fnmatchcase(name, p) for p in rule.params
    ):
        return False
    if rule.modules is not None and not any(_class_matches(m, owner) for m in rule.modules):
        return False
    return rule.predicate is None or bool(rule.predicate(name, param, owner))


def reference_groups(model: nn.Module, rules: list[lwd.DecayRule], options: dict[str, Any]) -> dict[str, Any]:
    """First matching rule in list order over every alias; groups ordered by rule, marked, default."""
    include_frozen = options.get("include_frozen", False)
    respect = options.get("respect_no_weight_decay", True)
    default_wd = float(options.get("default_weight_decay", 0.0))
    default = options.get("default_group") or ("no_decay" if default_wd == 0.0 else "default")
    aliases: dict[int, list[tuple[str, nn.Module]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in aliases:
                aliases[id(p)] = []
            aliases[id(p)].append((f"{prefix}.{pname}" if prefix else pname, module))
    order = list(dict.fromkeys(p for _, p in model.named_parameters()))  # registration order, first occurrence
    planned = [p for p in order if p.requires_grad or include_frozen]
    settings_of = {r.group_name: (r.weight_decay, r.lr_scale) for r in reversed(rules)}
    members: dict[str, list[str]] = {}
    claimed = {r.name: 0 for r in rules}
    marked_any = False
    for p in planned:
        names = aliases[id(p)]
        if respect and getattr(p, "_no_weight_decay", False) is True:
            group = "no_decay"
            marked_any = True
        else:
            hit = next((r for r in rules if any(_rule_matches(r, n, p, o) for n, o in names)), None)
            if hit is None:
                group = default
            else:
                group = hit.group_name
                claimed[hit.name] += 1
        members.setdefault(group, []).append(names[0][0])
    if marked_any:
        settings_of.setdefault("no_decay", (0.0, 1.0))
    settings_of.setdefault(default, (default_wd, 1.0))
    order_names = [r.group_name for r in rules] + (["no_decay"] if marked_any else []) + [default]
    groups = [(g, *settings_of[g], members[g]) for g in dict.fromkeys(order_names) if g in members]
    if options.get("merge", False):
        merged: dict[tuple[float, float], list[Any]] = {}
        for g in groups:
            merged.setdefault((g[1], g[2]), []).append(g)
        groups = [
            ("+".join(g[0] for g in gs), wd, lr, [n for g in gs for n in g[3]]) for (wd, lr), gs in merged.items()
        ]
    unclaimed = [r.name for r in rules if claimed[r.name] == 0 and not r.optional]
    return {"groups": [[g[0], g[1], g[2], g[3]] for g in groups], "unclaimed": unclaimed, "params": planned}


# ---------------------------------------------------------------- properties
@settings(max_examples=EXAMPLES)
@given(spec=specs())
def test_random_rules_raise_only_documented_errors_and_match_the_reference(spec):
    model = build_model(spec["model"])
    before = {
        k: v.clone() for k, v in model.state_dict().items() if not isinstance(v, nn.parameter.UninitializedTensorMixin)
    }
    rules, _ = build_rules(spec["rules"])
    options = spec["options"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            groups = lwd.build_param_groups(model, rules, lr=1.0, **options)  # lr 1.0: a group's lr is its scale
        except (TypeError, ValueError) as err:
            assert str(err), "an error without a message"
            groups = None
    for w in caught:
        assert issubclass(w.category, UserWarning), w
    for k, v in model.state_dict().items():  # planning never touches the model
        if k in before:
            assert torch.equal(v, before[k])
    if groups is None:
        return
    expected = reference_groups(model, rules, options)
    assert not any("lr_scale" in g for g in groups)  # the scale reaches the optimizer once, as the lr
    got = [[g["name"], g["weight_decay"], g.get("lr", 1.0), g["param_names"]] for g in groups]
    assert got == expected["groups"]
    # every planned parameter exactly once, by identity
    planned = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in planned}) == len(planned)
    assert {id(p) for p in planned} == {id(p) for p in expected["params"]}
    # a rule that claimed nothing was reported (strict would have raised)
    reported = any("claimed no parameter" in str(w.message) for w in caught)
    assert reported == bool(expected["unclaimed"])
    assert not (options.get("strict") and expected["unclaimed"])


@settings(max_examples=max(EXAMPLES // 3, 20))
@given(spec=specs(invalid=True))
def test_strict_refuses_exactly_what_the_reference_calls_unclaimed(spec):
    model = build_model(spec["model"])
    rules, _ = build_rules(spec["rules"])
    options = {**spec["options"], "strict": True}
    try:
        lwd.DecayPlan.from_module(model, rules, **options)
    except (TypeError, ValueError) as err:
        if "claimed no parameter" in str(err):
            assert reference_groups(model, rules, options)["unclaimed"]
        return
    assert not reference_groups(model, rules, options)["unclaimed"]


def test_plans_do_not_depend_on_hashing_or_addresses():
    """The same 40 specs planned here and in two fresh interpreters with other hash seeds print the same."""
    rng = random.Random(20240611)
    batch = [gen_spec(_Pick(rng=rng), invalid=False) for _ in range(40)]
    here = [plan_summary(s) for s in batch]
    assert sum("groups" in s for s in here) >= 20  # most specs plan (the rest fail the same way everywhere)
    code = (
        "import json, sys\n"
        "junk = [object() for _ in range(int(sys.argv[1]))]  # shift memory addresses\n"
        "from tests.test_fuzz import plan_summary\n"
        "print(json.dumps([plan_summary(s) for s in json.load(sys.stdin)]))\n"
    )
    procs = []
    for seed, junk in (("0", "10"), ("4242", "100000")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, junk],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(json.dumps(batch), timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out))
    expected = json.loads(json.dumps(here))  # through JSON like the others
    assert outputs[0] == outputs[1]
    assert outputs[0] == expected
