"""Traced roles: user-style modules with free parameters, each planned from one forward pass.

Every expectation is written by hand in the module's class (``DECAYED``: the weights of linear maps,
from reading the forward; ``EVIDENCE``: the uses, counted by hand), never derived from the code
under test. The traced plan must be exactly right on every module, on the meta device and on the
module's own; the static preset is shown to get the same modules wrong, so that the tests can fail.
"""

from __future__ import annotations

import copy
import math
import re
import sys

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

import lightning_wd as lwd
from lightning_wd import presets
from lightning_wd.trace import RoleTrace, trace_roles
from tests.helpers import RunIf


class FreeMatrices(nn.Module):
    """Linear maps from free parameters, used directly in ``forward`` in every way a user writes them."""

    DECAYED = (
        "U",
        "V",
        "A",
        "B",
        "M",
        "mat",
        "fc",
        "dense",
        "head",
        "qkv",
        "lora_A",
        "lora_B",
        "kernel",
        "stack",
        "bb",
    )
    NOT_DECAYED = ("pos", "cls", "gain", "temperature", "gate", "offset", "mix_bias", "scale", "bb_shift")

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        p = lambda *shape: nn.Parameter(torch.randn(*shape) / math.sqrt(shape[-1]))  # noqa: E731
        self.U, self.V = p(d, d), p(d, d)  # x @ U, V.T @ x.T (Tensor.__rmatmul__ and matmul)
        self.A, self.B = p(d, 2), p(2, d)  # a low-rank pair, merged before use
        self.M = p(d, d)  # einsum contracted against data
        self.mat = p(d, d)  # torch.mm
        self.fc = p(d, d)  # F.linear
        self.dense = p(d, d)  # addmm's matrix operand
        self.mix_bias = p(d)  # addmm's additive operand
        self.head = p(5, d)  # F.linear, the output head
        self.qkv = p(3 * d, d)  # a fused projection, chunked after the matmul
        self.lora_A, self.lora_B = p(2, d), p(d, 2)  # LoRA: x @ A.T @ B.T
        self.kernel = p(d, d, 3)  # F.conv1d
        self.stack = p(3, d, d)  # batched matmul against data
        self.pos = p(1, 4, d)  # position table, added
        self.cls = p(1, 1, d)  # a token, concatenated
        self.gain = p(d)  # multiplied
        self.temperature = nn.Parameter(torch.tensor(2.0))  # divided by
        self.gate = nn.Parameter(torch.zeros(1))  # sigmoid, multiplied
        self.offset = p(d)  # added
        self.scale = p(1, 1, d)  # einsum, not contracted: an elementwise scale
        self.bb, self.bb_shift = p(d, d), p(d)  # baddbmm's batch operand and its additive operand

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x @ self.U
        x = (self.V.T @ x.transpose(1, 2)).transpose(1, 2)
        x = x @ (self.A @ self.B)
        x = torch.einsum("bnd,de->bne", x, self.M)
        x = torch.einsum("bnd,cnd->bnd", x, self.scale.expand(1, x.shape[1], -1))
        b, n, d = x.shape
        x = torch.mm(x.reshape(b * n, d), self.mat)
        x = torch.addmm(self.mix_bias, x, self.dense).reshape(b, n, d)
        x = F.linear(x, self.fc)
        q, k, v = F.linear(x, self.qkv).chunk(3, dim=-1)
        x = q + k + v
        x = x + x @ self.lora_A.T @ self.lora_B.T
        x = F.conv1d(x.transpose(1, 2), self.kernel, padding=1).transpose(1, 2)
        x = torch.bmm(x.reshape(1, b * n, d).expand(3, -1, -1), self.stack).mean(0).reshape(b, n, d)
        x = torch.baddbmm(self.bb_shift, x, self.bb.expand(b, d, d))
        x = x * self.gain / self.temperature * torch.sigmoid(self.gate) + self.offset
        return F.linear(x, self.head)


class Lookups(nn.Module):
    """Tables looked up by data (embedding, indexing, a tied head) and experts selected by data."""

    DECAYED = ("experts", "router", "proj.weight")
    NOT_DECAYED = ("table", "rows", "rel_bias", "bag", "proj.bias", "norm_gain")
    EMBEDDINGS = ("table", "rows", "rel_bias", "bag")

    def __init__(self, vocab: int = 11, d: int = 8, n_experts: int = 3) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, d))  # F.embedding, and the tied output head
        self.rows = nn.Parameter(torch.randn(6, d))  # indexed by position ids
        self.rel_bias = nn.Parameter(torch.randn(7, 2))  # indexed by a buffer of relative positions
        self.register_buffer("rel_index", torch.arange(4)[:, None] - torch.arange(4)[None, :] + 3)
        self.router = nn.Parameter(torch.randn(n_experts, d))
        self.experts = nn.Parameter(torch.randn(n_experts, d, d))  # rows of a stack selected by data
        self.proj = nn.Linear(d, d)
        self.norm_gain = nn.Parameter(torch.ones(d))
        self.bag = nn.Parameter(torch.randn(vocab, d))  # F.embedding_bag

    def forward(self, ids: Tensor) -> Tensor:
        x = F.embedding(ids, self.table) + self.rows[torch.arange(ids.shape[1], device=ids.device)]
        x = x + F.embedding_bag(ids, self.bag, mode="mean")[:, None, :]
        bias = self.rel_bias[self.rel_index]  # (n, n, heads)
        x = x + bias.mean(-1).sum(-1)[None, :, None]
        choice = F.linear(x, self.router).argmax(-1)  # (b, n)
        x = torch.einsum("bnd,bnde->bne", x, self.experts[choice])
        x = self.proj(x) * self.norm_gain
        return F.linear(x, self.table)  # tied head


class Unit(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class Layers(nn.Module):
    """torch's layers, parametrizations and weight norm, fused kernels; one layer the forward never calls."""

    DECAYED = (
        "wn.weight.original1",
        "ortho.weight",
        "conv.weight",
        "deconv.weight",
        "bil.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "gru_cell.weight_ih",
        "gru_cell.weight_hh",
        "mha.in_proj_weight",
        "mha.out_proj.weight",
        "spare.weight",  # never called: structure decides, as without a trace
    )

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(d, d))
        self.ortho = nn.Linear(d, d, bias=False)
        parametrize.register_parametrization(self.ortho, "weight", Unit())
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.deconv = nn.ConvTranspose1d(d, d, 1)
        self.bn = nn.BatchNorm1d(d)
        self.bil = nn.Bilinear(d, d, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.gru_cell = nn.GRUCell(d, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.spare = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ortho(self.wn(x))
        x = self.bn(self.deconv(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        x = self.bil(x, x)
        x, _ = self.lstm(x)
        x = self.gru_cell(x[:, -1], x[:, 0]).unsqueeze(1) + x
        x, _ = self.mha(x, x, x, need_weights=False)
        return self.ln(x)


class NeedsValues(nn.Module):
    """A forward that reads a value (``.item()``), which the meta device cannot give."""

    DECAYED = ("W",)

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4))
        self.shift = nn.Parameter(torch.zeros(4))

    def forward(self, x: Tensor) -> Tensor:
        if x.abs().max().item() > 1e6:
            x = x / 1e6
        return x @ self.W + self.shift


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.W @ self.W[:3]  # a shape error on every device


MODULES = [
    (FreeMatrices, torch.randn(2, 4, 8)),
    (Lookups, torch.randint(0, 11, (2, 4))),
    (Layers, torch.randn(2, 4, 8)),
    (NeedsValues, torch.randn(2, 4)),
]


def decayed(plan: lwd.DecayPlan) -> set[str]:
    return {n for g in plan.groups if g.weight_decay > 0 for n in g.param_names}


@pytest.mark.parametrize("device", ["auto", "meta", "module"])
@pytest.mark.parametrize(("cls", "inputs"), MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_traced_plan_decays_exactly_the_weights_of_linear_maps(cls, inputs, device):
    model = cls()
    if device == "meta" and cls is NeedsValues:
        with pytest.raises(ValueError, match=r"on the meta device: .*item"):
            trace_roles(model, inputs, device=device)
        return
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), trace=trace_roles(model, inputs, device=device))
    assert decayed(plan) == set(cls.DECAYED)
    names = {n for g in plan.groups for n in g.param_names}
    assert set(getattr(cls, "NOT_DECAYED", ())) <= names - decayed(plan)


def test_static_preset_decays_matrices_named_as_layers_and_needs_the_trace_for_the_rest():
    static = decayed(lwd.DecayPlan.from_module(FreeMatrices(), presets.standard(0.1)))
    # Names that say "a layer's matrix" (found wrong by the trace sweep, fixed in the static preset) ...
    assert {"mat", "fc", "dense", "head", "qkv", "lora_A", "lora_B", "kernel"} <= static
    # ... and names that say nothing: only the trace can tell.
    assert static.isdisjoint({"U", "V", "A", "B", "M"})
    assert static <= set(FreeMatrices.DECAYED)


def test_the_sweep_lists_the_disagreements_of_user_code(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "trace_sweep.py"
    spec = importlib.util.spec_from_file_location("trace_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["trace_sweep"] = sweep  # its dataclass looks the module up by name
    spec.loader.exec_module(sweep)
    threads = torch.get_num_threads()
    try:
        sweep.main(["--library", "user code"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if "| _Free |" in line]
    # Counted by hand from the script's cases: six free matrices whose names say nothing.
    assert sorted(r[2] for r in rows) == ["A", "B", "M", "U", "V", "mix"]
    assert all(r[4] == "no_decay" and r[5].startswith("decay: weight of `") for r in rows)
    assert "| user code | 8 | 24 | 24 | 18 | 75.00% | 5 |" in out


def test_embeddings_tied_head_and_indexed_tables_are_embeddings():
    model = Lookups()
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), example_inputs=torch.randint(0, 11, (2, 4)))
    for name in Lookups.EMBEDDINGS:
        assert plan.entry(name).traced.role == "embedding", name
        assert plan.entry(name).rule == "embedding"
    # F.embedding once, then the head: the table is an embedding, and says where it was also a weight.
    assert (
        plan.entry("table").traced.evidence == "looked up by `embedding` in 1 call; also weight of `linear` in 1 call"
    )
    assert plan.entry("rows").traced.evidence == "indexed by data in 1 call"
    assert plan.entry("experts").traced.evidence == "weight of `einsum` in 1 call"


def test_evidence_counts_calls_and_names_the_op():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.fc(x) * self.gamma) * self.gamma * self.gamma

    plan = lwd.DecayPlan.from_module(Twice(), example_inputs=torch.randn(3, 4))
    assert plan.entry("fc.weight").traced.evidence == "weight of `linear` in 2 calls"
    assert plan.entry("fc.bias").traced.evidence == "operand of `linear` in 2 calls"
    assert plan.entry("gamma").traced.evidence == "operand of `mul` in 3 calls"
    assert plan.entry("fc.weight").decided_by == "trace"


def test_untouched_parameters_fall_back_to_structure_and_the_plan_says_so():
    model = Layers()
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), example_inputs=torch.randn(2, 4, 8))
    spare = plan.entry("spare.weight")
    assert (spare.decided_by, spare.traced, spare.group) == ("structure", None, "decay")
    assert plan.explain("spare.weight").endswith("role by structure: the traced forward pass did not use it")
    assert plan.explain("conv.weight").endswith("role linear by trace: weight of `conv1d` in 1 call")
    assert plan.entry("wn.weight.original0").traced.evidence == "operand of `_weight_norm` in 1 call"
    table = plan.table()
    assert "roles by trace (forward pass on meta): 26 of 28 tensors" in table
    assert "  decay     weight of `gru_cell` (2), weight of `linear` (2), weight of `lstm` (2), weight of" in table
    assert "and 3 other uses" in table
    assert "roles by structure (not used by the forward pass): 2 tensors (spare.weight, spare.bias)" in table


def test_without_example_inputs_the_plan_is_unchanged():
    model = Layers()
    before = lwd.DecayPlan.from_module(model, presets.standard(0.1))
    assert before.trace is None
    assert all(e.traced is None and e.decided_by == "structure" for e in before.entries)
    assert "roles by" not in before.table()
    assert "role" not in before.explain("conv.weight")


def _state(model: nn.Module) -> tuple:
    return (
        [(n, id(p), p.device, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        [(n, id(b), b.detach().clone()) for n, b in model.named_buffers()],
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        type(model.ortho).__name__,
    )


@pytest.mark.parametrize("device", ["meta", "module"])
def test_the_model_is_left_as_it_was(device):
    torch.manual_seed(0)
    model = Layers().train()  # training mode: batch norm would update its running statistics
    model.mha.eval()
    before = _state(model)
    inputs = torch.randn(2, 4, 8)
    rng = torch.get_rng_state()
    trace = trace_roles(model, inputs, device=device)
    assert trace.device == ("meta" if device == "meta" else "cpu")
    after = _state(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [x[:4] for x in after[0]] == [x[:4] for x in before[0]]
    assert all(torch.equal(a[4], b[4]) for a, b in zip(after[0], before[0], strict=True))
    assert [x[:2] for x in after[1]] == [x[:2] for x in before[1]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(after[1], before[1], strict=True))
    assert after[2:] == before[2:]


@pytest.mark.parametrize("device", ["meta", "module"])
def test_a_submodule_registered_twice_keeps_its_parameters_and_buffers(device):
    # torch.func.functional_call leaves the swapped-in tensors in a module reachable under two names.
    lin, norm = nn.Linear(4, 4), nn.BatchNorm1d(4)
    model = nn.Sequential(lin, norm, nn.ReLU(), lin, norm)
    kept = [lin.weight, lin.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var]
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), example_inputs=torch.randn(3, 4))
    trace = trace_roles(model, torch.randn(3, 4), device=device)
    now = [lin.weight, lin.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var]
    assert all(a is b for a, b in zip(now, kept, strict=True))
    assert not any(t.is_meta for t in model.state_dict().values())
    # Found by identity afterwards: the layer is used twice, the batch norm twice.
    assert trace.get(lin.weight).evidence == "weight of `linear` in 2 calls"
    assert plan.entry("0.weight").traced.evidence == "weight of `linear` in 2 calls"
    assert plan.entry("0.weight").group == "decay" and plan.entry("1.weight").group == "no_decay"


class CachesOnFirstUse(nn.Module):
    """Builds a table on first use and keeps it in a plain attribute, as Lightning's demo Transformer does."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4))
        self.table: Tensor | None = None
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.table is None:
            self.table = torch.ones(4, device=x.device)
        self.calls += 1
        if x.sum().item() > 1e9:  # fails on meta, after the cache was set there
            x = x / 2
        return x @ self.W + self.table


def test_attributes_set_by_the_forward_are_put_back():
    model = CachesOnFirstUse()
    trace = trace_roles(model, torch.randn(2, 4))
    assert (trace.device, trace.get(model.W).role) == ("cpu", "linear")
    assert model.table is None and model.calls == 0
    assert model(torch.randn(2, 4)).device.type == "cpu"


def test_meta_failure_falls_back_to_the_module_device():
    trace = trace_roles(NeedsValues(), torch.randn(2, 4))
    assert trace.device == "cpu"
    assert "on the meta device" in trace.fallback and "item" in trace.fallback


def test_a_forward_that_fails_everywhere_is_a_plan_error_naming_the_argument():
    with pytest.raises(lwd.PlanError, match=r"The forward pass of Broken on `example_inputs` raised on the meta"):
        lwd.DecayPlan.from_module(Broken(), example_inputs=torch.randn(2, 4))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: trace_roles(m, None), ValueError, r"`example_inputs` is None: pass what the model's forward"),
        (lambda m: trace_roles(m, torch.ones(1, 4), device="gpu"), ValueError, r"`device` must be one of 'auto'"),
        (lambda m: trace_roles(m.state_dict(), torch.ones(1, 4)), TypeError, r"`module` must be a torch.nn.Module"),
        (
            lambda m: lwd.DecayPlan.from_module(
                m, example_inputs=torch.ones(1, 4), trace=trace_roles(m, torch.ones(1, 4))
            ),
            ValueError,
            r"`example_inputs` and `trace` were both given",
        ),
        (lambda m: lwd.DecayPlan.from_module(m, trace={"W": "linear"}), TypeError, r"`trace` must be a RoleTrace"),
        (lambda m: lwd.DecayRule("r", 0.1, roles="weight"), ValueError, r"`roles` entry 'weight' is not a role"),
        (lambda m: lwd.DecayRule("r", 0.1, roles=[]), TypeError, r"`roles` must be a role or a non-empty list"),
    ],
)
def test_bad_input_is_refused_by_name(call, error, match):
    model = NeedsValues()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        call(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_roles_matcher_uses_the_trace_and_structure_without_one():
    rules = [
        lwd.DecayRule("maps", 0.1, roles="linear"),
        lwd.DecayRule("tables", 0.0, roles=["embedding"], optional=True),
        lwd.DecayRule("rest", 0.0, roles="other"),
    ]
    model = FreeMatrices()
    traced = lwd.DecayPlan.from_module(model, rules, example_inputs=torch.randn(2, 4, 8))
    assert set(next(g for g in traced.groups if g.name == "maps").param_names) == set(FreeMatrices.DECAYED)
    static = lwd.DecayPlan.from_module(model, rules)
    assert set(next(g for g in static.groups if g.name == "maps").param_names) == decayed(
        lwd.DecayPlan.from_module(model, presets.standard(0.1))
    )


def test_rule_with_roles_pickles_and_a_rule_without_keeps_its_old_state():
    rule = lwd.DecayRule("maps", 0.1, roles=("linear", "embedding"))
    assert copy.deepcopy(rule) == rule
    assert "roles" not in lwd.DecayRule("plain", 0.1).__getstate__()


def test_build_param_groups_with_example_inputs():
    model = FreeMatrices()
    groups = lwd.build_param_groups(model, presets.standard(0.1), example_inputs=torch.randn(2, 4, 8))
    assert {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]} == set(FreeMatrices.DECAYED)


def test_trace_looks_through_wrappers_and_keeps_ids():
    model = FreeMatrices()

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    trace = trace_roles(Wrapper(model), torch.randn(2, 4, 8))
    assert isinstance(trace, RoleTrace)
    assert trace.get(model.U).role == "linear" and model.U in trace


def test_transformers_gpt2_traced_agrees_with_the_static_preset():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (1, 8))
    static = lwd.DecayPlan.from_module(model, presets.standard(0.1))
    traced = lwd.DecayPlan.from_module(model, presets.standard(0.1), example_inputs=ids)
    assert decayed(traced) == decayed(static)
    assert traced.entry("transformer.wte.weight").traced.role == "embedding"  # tied with lm_head
    assert traced.entry("transformer.h.0.attn.c_attn.weight").traced.evidence == "weight of `addmm` in 1 call"


# ------------------------------------------------------------------------------ WDMixin, through Trainer.fit
class LitFree(lwd.WDMixin, L.LightningModule):
    decay_rules = presets.standard(weight_decay=0.1)
    show_decay_plan = False

    def __init__(self) -> None:
        super().__init__()
        self.net = FreeMatrices()
        self.example_input_array = torch.randn(2, 4, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self(batch).pow(2).mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(4, 4, 8), batch_size=2)


class LitFreeStatic(LitFree):
    trace_roles = False


@pytest.mark.parametrize("cls", [LitFree, LitFreeStatic])
def test_mixin_traces_example_input_array_through_fit(cls, tmp_path):
    model = cls()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    decayed_names = {n for g in trainer.optimizers[0].param_groups if g["weight_decay"] > 0 for n in g["param_names"]}
    expected = {f"net.{n}" for n in FreeMatrices.DECAYED}
    if cls is LitFree:
        assert decayed_names == expected
        assert model.decay_plan.trace is not None
        assert "weight of `matmul`" in model.decay_plan.table()
    else:
        assert model.decay_plan.trace is None
        assert decayed_names != expected and "net.U" not in decayed_names


def test_mixin_refuses_a_trace_roles_that_is_not_a_bool():
    model = LitFree()
    model.trace_roles = "yes"
    with pytest.raises(TypeError, match=r"`trace_roles` must be True or False, got str 'yes'"):
        model.configure_optimizers()


# ------------------------------------------------------------------------------ lightning-wd explain
def lookup_ids() -> Tensor:
    """An example input for ``--example-input tests/test_trace.py:lookup_ids``."""
    return torch.randint(0, 11, (2, 4))


class FreeWithExample(FreeMatrices):
    """Carries Lightning's ``example_input_array``, which ``explain`` traces by default."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.randn(2, 4, 8)


def _explain(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    from lightning_wd._cli import main

    main(["explain", *argv])
    return capsys.readouterr().out


def _decayed_in_listing(out: str) -> set[str]:
    rows = [line.split() for line in out.splitlines() if not line.startswith("Weight decay plan")]
    return {row[0] for row in rows if len(row) > 2 and row[1] == "decay"}


def test_explain_traces_an_example_input_and_lists_the_evidence(capsys):
    out = _explain(capsys, "tests/test_trace.py:FreeMatrices", "--example-input", "2x4x8", "--params")
    assert "roles by trace (forward pass on meta): 24 of 24 tensors" in out
    assert _decayed_in_listing(out) == set(FreeMatrices.DECAYED)
    listing = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] == ["U"]}
    assert listing["U"].endswith("weight of `matmul` in 1 call")


def test_explain_takes_an_input_by_dtype_or_by_name(capsys):
    by_dtype = _explain(capsys, "tests/test_trace.py:Lookups", "--example-input", "int64:2x4", "--params")
    by_name = _explain(
        capsys, "tests/test_trace.py:Lookups", "--example-input", "tests/test_trace.py:lookup_ids", "--params"
    )
    assert _decayed_in_listing(by_dtype) == _decayed_in_listing(by_name) == set(Lookups.DECAYED)


def test_explain_uses_example_input_array_unless_told_not_to(capsys):
    traced = _explain(capsys, "tests/test_trace.py:FreeWithExample", "--params")
    static = _explain(capsys, "tests/test_trace.py:FreeWithExample", "--params", "--no-trace")
    assert _decayed_in_listing(traced) == set(FreeMatrices.DECAYED)
    assert "roles by trace" not in static and "U" not in _decayed_in_listing(static)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--example-input", "2x"], r"`--example-input` must be a shape such as '2x16'.*got '2x'"),
        (["--example-input", "int65:2x4"], r"`--example-input` must be a shape.*got 'int65:2x4'"),
        (["--example-input", "2x4x8", "--no-trace"], r"`--no-trace` and `--example-input` were both given"),
        (["--example-input", "3x5"], r"cannot plan FreeMatrices.*The forward pass of FreeMatrices on `example_inputs`"),
    ],
)
def test_explain_refuses_a_bad_example_input(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        _explain(capsys, "tests/test_trace.py:FreeMatrices", *argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@RunIf(cuda=True)
def test_fallback_on_a_cuda_module_moves_the_inputs_and_keeps_its_generator():
    model = NeedsValues().cuda()
    state = torch.cuda.get_rng_state()
    trace = trace_roles(model, torch.randn(2, 4))  # a CPU input: moved to the module's device
    assert trace.device == "cuda:0" and trace.get(model.W).role == "linear"
    assert torch.equal(torch.cuda.get_rng_state(), state)
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), trace=trace)
    assert decayed(plan) == set(NeedsValues.DECAYED)


def test_a_group_added_during_training_is_split_by_the_traced_roles():
    model = LitFree()
    for p in (model.net.U, model.net.gain):
        p.requires_grad_(False)  # frozen at first, as BaseFinetuning does
    optimizer = model.configure_optimizers()
    for p in (model.net.U, model.net.gain):
        p.requires_grad_(True)
    optimizer.add_param_group({"params": [model.net.U, model.net.gain]})
    added = {g["name"]: g for g in optimizer.param_groups[-2:]}
    assert added["pg3/decay"]["params"] == [model.net.U] and added["pg3/decay"]["weight_decay"] == 0.1
    assert added["pg3/no_decay"]["params"] == [model.net.gain]


# ------------------------------------------------------------------------------ property: any recipe of uses
_MATRIX_OPS = ("matmul", "linear", "einsum", "transposed", "lowrank", "lookup")
_VECTOR_OPS = ("add", "mul")
_SCALAR_OPS = ("div_exp", "gate")


class Recipe(nn.Module):
    """Free parameters used in ``forward`` as ``steps`` say: (op, index of the parameter [, second index])."""

    def __init__(self, steps: list[tuple[str, int, int]], d: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.m = nn.ParameterList([nn.Parameter(torch.randn(d, d) / 2) for _ in range(3)])
        self.v = nn.ParameterList([nn.Parameter(torch.randn(d)) for _ in range(2)])
        self.s = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        for op, i, j in self.steps:
            if op == "matmul":
                x = x @ self.m[i]
            elif op == "linear":
                x = F.linear(x, self.m[i])
            elif op == "einsum":
                x = torch.einsum("bd,de->be", x, self.m[i])
            elif op == "transposed":
                x = x @ self.m[i].T.reshape(self.m[i].shape)
            elif op == "lowrank":
                x = x @ (self.m[i] @ self.m[j])
            elif op == "lookup":
                x = x + self.m[i][x.argmax(-1)]
            elif op == "add":
                x = x + self.v[i]
            elif op == "mul":
                x = x * self.v[i]
            elif op == "div_exp":
                x = x / self.s[i].exp()
            else:
                x = x * torch.sigmoid(self.s[i])
        return x


def _expected_roles(steps: list[tuple[str, int, int]]) -> dict[str, str]:
    """The documented rule, applied to the recipe: embedding if any use looks it up, else linear if any use is
    the weight of a linear map, else other."""
    uses: dict[str, set[str]] = {}
    for op, i, j in steps:
        if op in _MATRIX_OPS:
            role = "embedding" if op == "lookup" else "linear"
            for k in (i, j) if op == "lowrank" else (i,):
                uses.setdefault(f"m.{k}", set()).add(role)
        else:
            uses.setdefault(f"{'v' if op in _VECTOR_OPS else 's'}.{i}", set()).add("other")
    return {name: next(r for r in ("embedding", "linear", "other") if r in roles) for name, roles in uses.items()}


_STEP = st.one_of(
    st.tuples(st.sampled_from(_MATRIX_OPS), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.sampled_from(_VECTOR_OPS + _SCALAR_OPS), st.integers(0, 1), st.just(0)),
)


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(_STEP, min_size=1, max_size=8), device=st.sampled_from(["meta", "module"]))
def test_any_recipe_of_uses_gets_the_documented_roles(steps, device):
    model = Recipe(steps)
    trace = trace_roles(model, torch.randn(3, 4), device=device)
    got = {name: trace.get(p).role for name, p in model.named_parameters() if p in trace}
    assert got == _expected_roles(steps)


class RowsIntoLayer(nn.Module):
    """Matrices of a stack selected by data and fed to a layer as its input: looked-up rows, not weights."""

    def __init__(self) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.randn(5, 3, 4))
        self.W = nn.Parameter(torch.randn(4, 4))

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(self.codes[ids], self.W)


def test_rows_of_a_stack_fed_to_a_layer_are_looked_up():
    model = RowsIntoLayer()
    trace = trace_roles(model, torch.tensor([0, 3]))
    assert trace.get(model.codes).evidence == "indexed by data in 1 call"
    assert trace.get(model.W).role == "linear"


class ScaledMerge(nn.Module):
    """peft's LoHa: a weight merged from four factors and scaled by a 0-dim tensor, then a layer's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w1a, self.w1b = nn.Parameter(torch.randn(8, 2)), nn.Parameter(torch.randn(2, 8))
        self.w2a, self.w2b = nn.Parameter(torch.randn(8, 2)), nn.Parameter(torch.randn(2, 8))
        self.gain = nn.Parameter(torch.ones(8))

    def forward(self, x: Tensor) -> Tensor:
        delta = (self.w1a @ self.w1b) * (self.w2a @ self.w2b) * torch.tensor(0.5)
        return F.linear(x, delta) * (self.gain * torch.tensor(2.0))


@pytest.mark.parametrize("device", ["meta", "module"])
def test_a_zero_dim_constant_keeps_a_merged_weight_a_weight(device):
    model = ScaledMerge()
    trace = trace_roles(model, torch.randn(2, 8), device=device)
    for name in ("w1a", "w1b", "w2a", "w2b"):
        assert trace.get(getattr(model, name)).evidence == "weight of `linear` in 1 call", name
    # The scaled gain is still used against data: a multiplier, not a weight.
    assert trace.get(model.gain).evidence == "operand of `mul` in 1 call"
    # An input of one element (not 0-dim) is data, not a constant: the gain is used against it.
    gate = _Gate()
    assert trace_roles(gate, torch.randn(1), device=device).get(gate.g).evidence == "operand of `mul` in 1 call"


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(8))

    def forward(self, x: Tensor) -> Tensor:
        return self.g * x


def test_a_model_built_on_meta_is_traced_without_storage():
    with torch.device("meta"):
        model = FreeMatrices()
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), example_inputs=torch.randn(2, 4, 8))
    assert plan.trace.device == "meta" and plan.trace.fallback is None
    assert decayed(plan) == set(FreeMatrices.DECAYED)
    assert all(p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------------ weights combined with buffers
class MaskedLinear(nn.Linear):
    """MADE's masked layer: the weight times a registered mask buffer is the weight of the layer."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.register_buffer("mask", torch.tril(torch.ones(o, i)))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class NoisyLinear(nn.Module):
    """NoisyNet: ``mu + sigma * epsilon`` with ``epsilon`` a buffer is the weight of the layer."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight_mu = nn.Parameter(torch.randn(o, i) / math.sqrt(i))
        self.weight_sigma = nn.Parameter(torch.full((o, i), 0.017))
        self.register_buffer("weight_epsilon", torch.randn(o, i))
        self.bias_mu = nn.Parameter(torch.zeros(o))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_mu + self.weight_sigma * self.weight_epsilon, self.bias_mu)


class ScaledByData(nn.Module):
    """A weight multiplied by an input before the layer: combined with data, so not a weight by the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return F.linear(x, self.w * s)


class BufferPositions(nn.Module):
    """A position table looked up by a registered index buffer (Hugging Face's ``position_ids``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(6, 8)
        self.fc = nn.Linear(8, 8)
        self.register_buffer("position_ids", torch.arange(6))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x + self.pos(self.position_ids[: x.shape[1]]))


def _pruned() -> nn.Module:
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


def _qat() -> nn.Module:
    import torch.ao.quantization as tq

    model = nn.Sequential(tq.QuantStub(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), tq.DeQuantStub()).train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with pytest.warns((DeprecationWarning, UserWarning)):
        return tq.prepare_qat(model)


#: (model, the decayed names, written from the definitions): a weight combined with a buffer is still a weight.
WITH_BUFFERS = {
    "prune": (_pruned, {"0.weight_orig", "2.weight"}),
    "masked": (lambda: nn.Sequential(MaskedLinear(8, 8), nn.ReLU(), MaskedLinear(8, 4)), {"0.weight", "2.weight"}),
    "noisy": (lambda: NoisyLinear(8, 4), {"weight_mu", "weight_sigma"}),
    "qat": (_qat, {"1.weight", "3.weight"}),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("device", ["meta", "module"])
@pytest.mark.parametrize("case", list(WITH_BUFFERS))
def test_a_weight_combined_with_a_buffer_is_a_linear_weight(case, device):
    build, expected = WITH_BUFFERS[case]
    model = build()
    trace = trace_roles(model, torch.randn(2, 8), device=device)
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), trace=trace)
    assert decayed(plan) == expected
    for name in expected:
        assert trace.get(model.get_parameter(name)).evidence == "weight of `linear` in 1 call", name


def test_a_weight_combined_with_an_input_is_not_a_weight_and_a_buffer_index_is_a_lookup():
    model = ScaledByData()
    assert trace_roles(model, (torch.randn(2, 8), torch.randn(4, 8))).get(model.w).evidence == (
        "operand of `mul` in 1 call"
    )
    positions = BufferPositions()
    trace = trace_roles(positions, torch.randn(2, 3, 8))
    assert trace.get(positions.pos.weight).evidence == "looked up by `embedding` in 1 call"
    assert trace.get(positions.fc.weight).role == "linear"


# ------------------------------------------------------------------------------ sharded modules
@pytest.fixture
def gloo_group():
    """A process group of this one process over gloo on the CPU (what FSDP1 and FSDP2 need)."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _three_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_tracing_an_fsdp1_module_is_refused_before_its_forward_and_a_trace_made_before_applies(gloo_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = _three_layers()
    trace = trace_roles(model, torch.randn(4, 6))
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    assert lwd.trace.is_sharded(wrapped) and lwd.trace.is_sharded(wrapped.module)
    with pytest.raises(lwd.PlanError) as err:
        lwd.DecayPlan.from_module(wrapped, presets.standard(0.1), example_inputs=torch.randn(4, 6))
    message = str(err.value)
    assert "`example_inputs`" in message and "tracing a sharded module is not supported" in message
    assert "FSDP1: a FullyShardedDataParallel unit at '<root>'" in message
    assert "`trace=" in message and "leave `example_inputs` out" in message and "`trace_roles = False`" in message
    plan = lwd.DecayPlan.from_module(wrapped, presets.standard(0.1), trace=trace)
    assert decayed(plan) == {"0.weight", "2.weight"}
    assert decayed(lwd.DecayPlan.from_module(wrapped, presets.standard(0.1))) == {"0.weight", "2.weight"}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_mixin_does_not_trace_a_sharded_module_and_says_so(gloo_group):
    """Under Lightning's FSDP strategies configure_optimizers runs after wrapping: WDMixin's implicit trace of
    `example_input_array` would see the sharding's bookkeeping, so it takes the roles from structure and warns."""
    import lightning as L
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Lit(lwd.WDMixin, L.LightningModule):
        decay_rules = presets.standard(0.1)
        show_decay_plan = False

        def __init__(self) -> None:
            super().__init__()
            self.net = FullyShardedDataParallel(_three_layers(), use_orig_params=True, device_id=torch.device("cpu"))
            self.example_input_array = torch.randn(4, 6)

    module = Lit()
    with pytest.warns(UserWarning, match=r"`example_input_array` is not traced: the module is sharded"):
        optimizer = module.configure_optimizers()
    groups = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    decayed_ids = {id(p) for g in groups.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n.replace("_fsdp_wrapped_module.", "") for n, p in module.named_parameters() if id(p) in decayed_ids}
    assert names == {"net.0.weight", "net.2.weight"}


def test_tracing_an_fsdp2_module_is_refused_naming_the_sharding_not_the_inputs(gloo_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _three_layers()
    mesh = init_device_mesh("cpu", (1,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert lwd.trace.is_sharded(model) and lwd.trace.is_sharded(model[0]) and not lwd.trace.is_sharded(_three_layers())
    with pytest.raises(lwd.PlanError) as err:
        lwd.build_param_groups(model, presets.standard(0.1), example_inputs=torch.randn(4, 6))
    message = str(err.value)
    assert "`example_inputs`" in message and "tracing a sharded module is not supported" in message
    assert "FSDP2: `fully_shard` applied to '<root>'" in message and "Pass inputs the forward accepts" not in message
    assert "leave `example_inputs` out" in message and "`trace_roles = False`" in message
    groups = lwd.build_param_groups(model, presets.standard(0.1))
    assert {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]} == {"0.weight", "2.weight"}


def test_a_table_read_as_a_matrix_is_decided_by_structure_and_the_plan_says_so():
    """A position table that the forward multiplies by: traced as linear, kept a no-decay table by structure."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.position_table = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) @ self.position_table

    model = Positions()
    plan = lwd.DecayPlan.from_module(model, presets.standard(0.1), example_inputs=torch.randn(2, 4))
    table, fc = plan.entry("position_table"), plan.entry("fc.weight")
    assert table.traced is not None and table.traced.role == "linear"  # what the forward pass did with it
    assert (table.trace_set_aside, table.decided_by, table.group) == (True, "structure", "no_decay")
    assert plan.explain("position_table").endswith(
        "role by structure, a table, though traced as linear: " + table.traced.evidence
    )
    assert (fc.trace_set_aside, fc.decided_by, fc.group) == (False, "trace", "decay")
    table_text = plan.table()
    assert "roles by trace (forward pass on meta): 2 of 3 tensors" in table_text
    assert "roles by structure (tables the forward pass read as matrices): 1 tensor (position_table)" in table_text
    assert plan.explain("fc.weight").endswith("role linear by trace: weight of `linear` in 1 call")
    # without a trace, nothing is set aside
    untraced = lwd.DecayPlan.from_module(model, presets.standard(0.1)).entry("position_table")
    assert (untraced.trace_set_aside, untraced.decided_by, untraced.group) == (False, "structure", "no_decay")
