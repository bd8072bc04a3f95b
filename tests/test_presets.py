"""The ready rule lists against hand-written expectations on architectures nobody here wrote."""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import torch
from torch import nn

import lightning_wd as lwd
from lightning_wd import presets
from tests.models import (
    ARCHITECTURES,
    AttentionNet,
    GPT2LMHeadModel,
    MambaLM,
    TiedTransformerLM,
    VisionTransformer,
)


def decayed(model: nn.Module, rules: list[lwd.DecayRule]) -> tuple[str, ...]:
    """Names of the planned parameters that get a non-zero decay, in plan order."""
    plan = lwd.DecayPlan.from_module(model, rules)
    return tuple(n for g in plan.groups if g.weight_decay > 0 for n in g.param_names)


def all_names(model: nn.Module) -> set[str]:
    plan = lwd.DecayPlan.from_module(model, presets.none())
    return {n for g in plan.groups for n in g.param_names}


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_standard_decays_exactly_the_linear_weights(cls):
    got = decayed(cls(), presets.standard(0.05))
    assert set(got) == set(cls.DECAYED)
    assert len(got) == len(cls.DECAYED)


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_standard_keeps_registration_order(cls):
    # The hand-written lists are in registration order too.
    assert decayed(cls(), presets.standard(0.05)) == cls.DECAYED


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_gpt_decays_exactly_ndim_ge_2(cls):
    got = decayed(cls(), presets.gpt(0.1))
    assert set(got) == set(cls.NDIM2)
    assert len(got) == len(cls.NDIM2)


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_standard_groups_and_everything_planned(cls):
    model = cls()
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.05))
    by_group = {g.name: (g.weight_decay, set(g.param_names)) for g in plan.groups}
    assert by_group.get("decay", (0.05, set()))[0] == 0.05
    assert by_group.get("no_decay", (0.0, set()))[0] == 0.0
    assert set(by_group) <= {"decay", "no_decay"}
    expected_no_decay = all_names(model) - set(cls.DECAYED)
    assert by_group.get("no_decay", (0.0, set()))[1] == expected_no_decay
    # Every trainable tensor exactly once (by identity).
    planned = [id(p) for g in plan.groups for p in g.params]
    assert sorted(planned) == sorted({id(p) for p in model.parameters()})


class Net(nn.Module):
    """A neutral root class name: the preset must not depend on what the model is called."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_standard_derives_from_structure_not_model_names(cls):
    wrapped = decayed(Net(cls()), presets.standard(0.05))
    assert wrapped == tuple(f"body.{n}" for n in cls.DECAYED)
    # A renamed subclass of the root (a model called something else) plans the same.
    renamed = type("Xyz", (cls,), {})
    assert decayed(renamed(), presets.standard(0.05)) == cls.DECAYED


def test_standard_rule_that_claims_each_role():
    """Which named rule of `standard` claims each parameter (hand-written)."""
    plan = lwd.DecayPlan.from_module(TiedTransformerLM(), presets.standard(0.05))
    rule_of = {e.name: e.rule for e in plan.entries}
    assert rule_of["tok_embeddings.weight"] == "embedding"  # also reachable as output.weight
    assert rule_of["layers.0.attention_norm.weight"] == "normalization"
    assert rule_of["layers.0.ffn_norm.scale"] == "normalization"
    assert rule_of["norm.weight"] == "normalization"
    assert rule_of["layers.1.attention.wq.weight"] == "linear"

    plan = lwd.DecayPlan.from_module(VisionTransformer(), presets.standard(0.05))
    rule_of = {e.name: e.rule for e in plan.entries}
    for free in ("cls_token", "register_tokens", "pos_embed", "blocks.0.ls1.gamma"):
        assert rule_of[free] is None  # claimed by no rule: default no_decay group
    assert rule_of["head.bias"] == "bias"
    assert rule_of["patch_embed.proj.weight"] == "linear"
    assert rule_of["patch_embed.proj.bias"] == "bias"

    plan = lwd.DecayPlan.from_module(AttentionNet(), presets.standard(0.05))
    rule_of = {e.name: e.rule for e in plan.entries}
    assert rule_of["attn.bias_k"] == rule_of["attn.bias_v"] == rule_of["attn.in_proj_bias"] == "bias"

    plan = lwd.DecayPlan.from_module(MambaLM(), presets.standard(0.05))
    rule_of = {e.name: e.rule for e in plan.entries}
    assert rule_of["layers.0.mixer.A_log"] is None
    assert rule_of["layers.0.mixer.D"] is None
    assert rule_of["layers.0.mixer.dt_proj.bias"] == "bias"


def test_tied_weight_is_an_embedding_whichever_side_registers_first():
    model = GPT2LMHeadModel()
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.05))
    entry = plan.entry("lm_head.weight")
    assert entry.name == "transformer.wte.weight"
    assert entry.aliases == ("transformer.wte.weight", "lm_head.weight")
    assert entry.owners == ("Embedding", "Linear")
    assert entry.group == "no_decay" and entry.rule == "embedding"


@pytest.mark.parametrize(
    ("name", "shape", "owner", "expected"),
    [
        ("fc.weight", (4, 4), nn.Linear(4, 4), True),
        ("fc.bias", (4,), nn.Linear(4, 4), False),
        ("conv.weight", (4, 3, 3, 3), nn.Conv2d(3, 4, 3), True),
        ("emb.weight", (10, 4), nn.Embedding(10, 4), False),
        ("ln.weight", (4,), nn.LayerNorm(4), False),
        ("x.pos_embed", (1, 5, 4), nn.Module(), False),
        ("x.cls_token", (1, 1, 4), nn.Module(), False),
        ("x.relative_position_bias_table", (9, 2), nn.Module(), False),
        ("x.temperature", (), nn.Module(), False),
        ("x.logit_scale", (), nn.Module(), False),
        ("x.latents", (8, 4), nn.Module(), False),
        ("x.query_tokens", (1, 8, 4), nn.Module(), False),
        ("x.proj", (4, 4), nn.Module(), True),
        ("x.text_projection", (4, 4), nn.Module(), True),
        ("x.wq", (4, 4), nn.Module(), True),
        ("x.kernel", (3, 3, 4, 4), nn.Module(), True),
        ("x.weight", (4, 4), nn.Module(), True),
        ("x.experts", (4, 4, 8), nn.Module(), True),
        ("x.expert_bias", (4, 8), nn.Module(), False),
        ("x.mask_token", (1, 1, 4), nn.Module(), False),
        ("x.prompts_visual_projection", (4, 8), nn.Module(), True),  # the head word decides
        ("x.token_proj", (4, 8), nn.Module(), True),
        ("x.pos_embed_weight", (5, 4), nn.Module(), False),
        ("x.weight_scale", (4, 4), nn.Module(), False),
        ("x.static_weight", (4, 8), nn.Module(), True),
        ("x.grn.weight", (1, 1, 1, 8), nn.Module(), False),  # a broadcast vector, not a matrix
        ("x.w_out", (8, 1), nn.Module(), False),
        ("x.rel_pos_w", (7, 16), nn.Module(), False),  # a single letter is an axis here, not "weight"
        ("x.w2", (8, 4), nn.Module(), True),
        # In a ParameterDict or ParameterList the container's name says the role, not the key (peft).
        ("q_proj.lora_A.default", (2, 8), nn.ParameterDict(), True),
        ("q_proj.lokr_w1.default", (2, 2), nn.ParameterDict(), True),
        ("q_proj.hra_u.default", (8, 4), nn.ParameterDict(), False),
        ("x.pos_embeds.0", (5, 4), nn.ParameterList(), False),
        ("x.proj.1", (4, 4), nn.ParameterList(), True),
    ],
)
def test_is_linear_weight_table(name, shape, owner, expected):
    param = nn.Parameter(torch.zeros(shape))
    assert presets.is_linear_weight(name, param, owner) is expected


def test_deepspeed_empty_parameters_use_ds_shape():
    """ZeRO-3 leaves empty tensors with the real shape in ds_shape; presets must read it."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    for p in model.parameters():
        shape = p.shape
        p.data = torch.empty(0)
        p.ds_shape = shape
        p.ds_numel = shape.numel()
    assert decayed(model, presets.standard(0.05)) == ("0.weight",)
    assert decayed(model, presets.gpt(0.1)) == ("0.weight",)
    plan = lwd.DecayPlan.from_module(model, presets.gpt(0.1))
    assert plan.entry("0.weight").shape == (4, 4)
    assert plan.groups[0].numel == 16


def test_uniform_and_none():
    model = TiedTransformerLM()
    n_params = len({id(p) for p in model.parameters()})
    (group,) = lwd.build_param_groups(model, presets.uniform(0.01))
    assert (group["name"], group["weight_decay"], len(group["params"])) == ("all", 0.01, n_params)
    (group,) = lwd.build_param_groups(model, presets.none())
    assert (group["name"], group["weight_decay"], len(group["params"])) == ("no_decay", 0.0, n_params)


@pytest.mark.parametrize("preset", [presets.standard, presets.gpt, presets.uniform])
def test_presets_validate_weight_decay(preset):
    with pytest.raises(ValueError, match="`weight_decay` must be >= 0"):
        preset(-1.0)


def test_presets_code_names_no_model():
    """`standard` is derived from structure: the preset code (docstrings aside) names no architecture."""
    tree = ast.parse(inspect.getsource(presets))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            body.pop(0)  # the docstring
    code = ast.unparse(tree).lower()
    for model_name in ("gpt", "llama", "t5", "vit", "convnext", "mamba", "bert", "mixtral", "swin", "clip"):
        hits = {w for w in re.findall(r"[a-z0-9]+", code) if w.startswith(model_name)}
        assert hits <= {"gpt"}, hits  # the only one allowed: the `gpt` preset's own name


class Name(str):
    """A ``str`` subclass, as some configuration libraries hand names over."""


@pytest.mark.parametrize(
    "predicate", [presets.is_bias, presets.is_embedding, presets.is_linear_weight, presets.is_normalization]
)
def test_role_predicates_check_their_arguments_and_accept_what_the_plan_gives(predicate):
    lin, emb, norm = nn.Linear(2, 2), nn.Embedding(3, 2), nn.LayerNorm(2)
    expected = {
        presets.is_bias: (True, False, False),
        presets.is_embedding: (False, True, False),
        presets.is_linear_weight: (False, False, True),
        presets.is_normalization: (False, False, False),
    }[predicate]
    # (the bias of a Linear, an Embedding's table, a Linear's weight), with a str subclass and a plain tensor too
    got = (
        predicate(Name("fc.bias"), lin.bias, lin),
        predicate("wte.weight", emb.weight.detach(), emb),
        predicate("fc.weight", lin.weight, lin),
    )
    assert got == expected
    assert predicate("ln.weight", norm.weight, norm) is (predicate is presets.is_normalization)
    for args, argument in [
        ((lin.weight, "fc.weight", lin), "name"),  # name and param swapped
        (("fc.weight", lin.weight.shape, lin), "param"),
        (("fc.weight", lin.weight, "fc"), "module"),
    ]:
        with pytest.raises(TypeError, match=rf"^`{argument}` must be"):
            predicate(*args)


def groups_of(model: nn.Module, example_inputs: object = None) -> dict[str, str]:
    """The group of every planned parameter under `standard`, by canonical name."""
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.05), example_inputs=example_inputs)
    return {n: g.name for g in plan.groups for n in g.param_names}


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*:FutureWarning")
def test_deprecated_weight_norm_hook_magnitude_is_not_decayed():
    model = nn.Sequential(
        nn.utils.weight_norm(nn.Linear(4, 8)), nn.utils.weight_norm(nn.Conv1d(8, 8, 3, padding=1), dim=2)
    )
    assert groups_of(model) == {
        "0.bias": "no_decay",
        "0.weight_g": "no_decay",  # (8, 1): the magnitude, a scale
        "0.weight_v": "decay",  # (8, 4): the direction, decayed like the weight
        "1.bias": "no_decay",
        "1.weight_g": "no_decay",  # (1, 1, 3)
        "1.weight_v": "decay",
    }


class NormHead(nn.Module):
    """A linear head with normalized rows (as Baichuan-2's lm head): a linear map, not a normalization."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(20, 8))


class NormalizedLinear(NormHead):
    """A cosine classifier."""


class NormLinear(NormHead):
    pass


class GroupNorm32(nn.GroupNorm):
    pass


class FusedRMSNorm(nn.Module):
    """A normalization class that does not subclass torch's, with a 2-D (per-group) gain."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 4))


class BatchNormNd(FusedRMSNorm):
    pass


class LayerNorm2d(FusedRMSNorm):
    pass


class LayerNormalization(FusedRMSNorm):
    pass


def test_normalization_class_names_are_whole_words():
    model = nn.Sequential(
        NormHead(), NormalizedLinear(), NormLinear(), GroupNorm32(2, 4), FusedRMSNorm(), BatchNormNd(),
        LayerNorm2d(), LayerNormalization(),
    )  # fmt: skip
    assert groups_of(model) == {
        "0.weight": "decay",
        "1.weight": "decay",
        "2.weight": "decay",
        "3.weight": "no_decay",
        "3.bias": "no_decay",
        "4.weight": "no_decay",
        "5.weight": "no_decay",
        "6.weight": "no_decay",
        "7.weight": "no_decay",
    }


class FreeAttention(nn.Module):
    """Hand-written attention with free projection matrices, next to learned query tokens."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.W_query = nn.Parameter(torch.randn(d, d))
        self.W_key = nn.Parameter(torch.randn(d, d))
        self.W_value = nn.Parameter(torch.randn(d, d))
        self.W_out = nn.Parameter(torch.randn(d, d))
        self.query_weight = nn.Parameter(torch.randn(d, d))
        self.q_proj = nn.Parameter(torch.randn(d, d))
        self.query_tokens = nn.Parameter(torch.zeros(1, 32, d))
        self.queries = nn.Parameter(torch.zeros(4, d))
        self.latent_queries = nn.Parameter(torch.zeros(4, d))
        self.query_embed = nn.Parameter(torch.zeros(4, d))
        self.query = nn.Parameter(torch.zeros(1, 4, d))


def test_query_projection_matrices_are_decayed_and_query_tokens_are_not():
    assert groups_of(FreeAttention()) == {
        "W_query": "decay",
        "W_key": "decay",
        "W_value": "decay",
        "W_out": "decay",
        "query_weight": "decay",
        "q_proj": "decay",
        "query_tokens": "no_decay",
        "queries": "no_decay",
        "latent_queries": "no_decay",
        "query_embed": "no_decay",
        "query": "no_decay",
    }


class AxialPositionEmbeddings(nn.Module):
    """Reformer-style axial position embeddings: a ParameterList named only `weights`."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(2, 1, 16)), nn.Parameter(torch.zeros(1, 4, 16))])


class AxialNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.position_embeddings = AxialPositionEmbeddings()
        self.experts = nn.Module()
        self.experts.weights = nn.ParameterList([nn.Parameter(torch.zeros(4, 8))])
        self.fc = nn.Linear(16, 16)


def test_parameter_list_named_weights_is_named_by_its_parent():
    assert groups_of(AxialNet()) == {
        "position_embeddings.weights.0": "no_decay",
        "position_embeddings.weights.1": "no_decay",
        "experts.weights.0": "decay",
        "fc.weight": "decay",
        "fc.bias": "no_decay",
    }


class GumbelCodebook(nn.Module):
    """An embedding table read by `einsum` with a soft one-hot, and relative-position tables read by `matmul`."""

    def __init__(self, d: int = 8, n: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(d, n)
        self.embed = nn.Embedding(n, d)
        self.emb_rel_k = nn.Parameter(torch.randn(1, d, d))
        self.seg_embed = nn.Parameter(torch.randn(d, d))
        self.W = nn.Parameter(torch.randn(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = torch.softmax(self.proj(x), dim=-1)
        h = torch.einsum("bn,nd->bd", soft, self.embed.weight)
        h = torch.matmul(h[:, None, :], self.emb_rel_k)[:, 0] + torch.einsum("bd,de->be", h, self.seg_embed)
        return h @ self.W


def test_traced_matrix_use_does_not_turn_a_table_into_a_linear_weight():
    expected = {
        "proj.weight": "decay",
        "proj.bias": "no_decay",
        "embed.weight": "no_decay",
        "emb_rel_k": "no_decay",
        "seg_embed": "no_decay",
        "W": "decay",
    }
    model = GumbelCodebook()
    assert groups_of(model) == expected
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.05), example_inputs=torch.randn(2, 8))
    for name in ("embed.weight", "emb_rel_k", "seg_embed"):
        assert plan.entry(name).traced.role == "linear"  # the trace saw a matrix operand...
    assert groups_of(model, torch.randn(2, 8)) == expected  # ...and structure keeps the tables tables
    assert plan.entry("embed.weight").rule == "embedding"
    with lwd.trace.use_trace(plan.trace):
        assert presets.role_of("embed.weight", model.embed.weight, model.embed) == "embedding"
        assert presets.role_of("emb_rel_k", model.emb_rel_k, model) == "other"
        assert presets.role_of("W", model.W, model) == "linear"
