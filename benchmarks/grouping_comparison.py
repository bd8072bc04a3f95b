"""Which tensors get weight decay? timm, Hugging Face Trainer, nanoGPT and lightning_wd on the same models.

Run from the repository root (a few seconds, CPU)::

    python benchmarks/grouping_comparison.py            # markdown table
    python benchmarks/grouping_comparison.py --details  # and the names behind every count

Each peer's grouping rule is re-implemented below from its documented logic, in a few lines
(nothing is imported from timm or transformers), and run on six small models that carry the
features real models have: a token embedding tied to the output head, custom normalization
classes, GPT-2's transposed ``Conv1D``, ViT's cls/position tokens and layer-scale gammas,
BatchNorm, stacked mixture-of-experts weights, and T5's relative-position bias table.

The reference is the definition in DESIGN.md ("the standard preset"): decay exactly the weight
matrices and kernels of linear maps; never biases, normalization parameters, embeddings
(a tied head counts as an embedding), position tables, tokens, gammas. For every model the
decayed tensors are written out by hand (``expected``) rather than derived from any tool.
A count ``a / b`` is ``a`` tensors wrongly decayed and ``b`` wrongly left undecayed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import lightning_wd as lwd

# ---------------------------------------------------------------------------- the peers' rules


def timm_decayed(model: nn.Module) -> set[int]:
    """timm ``optim.create_optimizer_v2`` -> ``param_groups_weight_decay(model, wd, model.no_weight_decay())``.

    ``if param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay_list: no decay``, over
    ``model.named_parameters()`` (tied tensors seen once, under their first name); the list comes
    from the top-level model's ``no_weight_decay()`` when it has one.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return {
        id(p)
        for name, p in model.named_parameters()
        if p.requires_grad and not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
    }


def _hf_get_parameter_names(model: nn.Module, forbidden_layer_types: tuple[type, ...]) -> list[str]:
    """transformers ``trainer_pt_utils.get_parameter_names``: names of parameters not inside a forbidden layer."""
    result = []
    for name, child in model.named_children():
        if not isinstance(child, forbidden_layer_types):
            result += [f"{name}.{n}" for n in _hf_get_parameter_names(child, forbidden_layer_types)]
    result += list(model._parameters.keys())
    return result


def hf_decayed(model: nn.Module) -> set[int]:
    """transformers ``Trainer.get_decay_parameter_names`` / ``create_optimizer``.

    ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` (``ALL_LAYERNORM_LAYERS = [nn.LayerNorm]``) minus
    names containing ``"bias"``; the optimizer then takes ``p for n, p in model.named_parameters() if n in
    decay_parameters``.
    """
    decay_names = {n for n in _hf_get_parameter_names(model, (nn.LayerNorm,)) if "bias" not in n}
    return {id(p) for n, p in model.named_parameters() if n in decay_names and p.requires_grad}


def nanogpt_decayed(model: nn.Module) -> set[int]:
    """nanoGPT ``GPT.configure_optimizers``: ``decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]``."""
    return {id(p) for _, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}


def lightning_wd_decayed(model: nn.Module) -> set[int]:
    """This package: ``lwd.build_param_groups(model, lwd.presets.standard())``, groups with weight_decay > 0."""
    groups = lwd.build_param_groups(model, lwd.presets.standard(0.05))
    return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}


TOOLS: dict[str, Callable[[nn.Module], set[int]]] = {
    "timm": timm_decayed,
    "HF Trainer": hf_decayed,
    "nanoGPT": nanogpt_decayed,
    "lightning_wd standard": lightning_wd_decayed,
}

# ---------------------------------------------------------------------------- the models


class RMSNorm(nn.Module):
    """A custom RMSNorm (Llama style), not a subclass of any torch normalization layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.mlp_norm = RMSNorm(dim)
        self.w1, self.w2, self.w3 = (
            nn.Linear(dim, 2 * dim, False),
            nn.Linear(2 * dim, dim, False),
            nn.Linear(dim, 2 * dim, False),
        )


class TiedLM(nn.Module):
    """Llama-like LM: token embedding tied to the head, custom RMSNorm, bias-free projections."""

    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    expected = [f"layers.{i}.{n}.weight" for i in range(2) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]


class Conv1D(nn.Module):
    """GPT-2's 'Conv1D': a linear layer with a transposed (in, out) weight; not an nn.Linear."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))


class GPT2Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim), Conv1D(dim, dim)


class GPT2MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * dim, dim), Conv1D(dim, 4 * dim)


class GPT2Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = (
            nn.LayerNorm(dim),
            GPT2Attention(dim),
            nn.LayerNorm(dim),
            GPT2MLP(dim),
        )


class GPT2(nn.Module):
    """A port of Hugging Face's GPT2LMHeadModel layout: wte/wpe embeddings, Conv1D layers, head tied to wte."""

    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 2, ctx: int = 32) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.h = nn.ModuleList(GPT2Block(dim) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    expected = [f"h.{i}.{n}.weight" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))


class ViTBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})


class ViT(nn.Module):
    """timm-style ViT: conv patch embedding, cls token, position table, layer scale, ``no_weight_decay()``."""

    def __init__(self, dim: int = 16, layers: int = 2, patches: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, dim, 4, 4)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    expected = [
        "patch_embed.proj.weight",
        *(f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
        "head.weight",
    ]


class ConvNet(nn.Module):
    """A ResNet-like convnet: bias-free convolutions followed by BatchNorm, linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    expected = ["stem.0.weight", "layer1.0.weight", "layer2.0.weight", "fc.weight"]


class Experts(nn.Module):
    """Experts stored as stacked 3-D tensors (Mixtral/DeepSeek style fused weights)."""

    def __init__(self, n: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, dim, hidden) * 0.02)
        self.w2 = nn.Parameter(torch.randn(n, hidden, dim) * 0.02)


class MoEBlock(nn.Module):
    def __init__(self, dim: int, n_experts: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = Experts(n_experts, dim, 2 * dim)


class MoELM(nn.Module):
    """A mixture-of-experts LM: untied embedding and head, custom RMSNorm, router, 3-D expert weights."""

    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(MoEBlock(dim, 4) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    expected = [
        *(
            f"blocks.{i}.{n}"
            for i in range(2)
            for n in ("qkv.weight", "out.weight", "router.weight", "experts.w1", "experts.w2")
        ),
        "head.weight",
    ]


class T5LayerNorm(nn.Module):
    """T5's scale-only layer norm (no bias, no mean subtraction); not a torch LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class T5Attention(nn.Module):
    def __init__(self, dim: int, heads: int, has_relative_bias: bool) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(32, heads)


class T5Block(nn.Module):
    def __init__(self, dim: int, first: bool) -> None:
        super().__init__()
        self.layer_norm = T5LayerNorm(dim)
        self.SelfAttention = T5Attention(dim, 4, has_relative_bias=first)
        self.ff_norm = T5LayerNorm(dim)
        self.DenseReluDense = nn.ModuleDict(
            {"wi": nn.Linear(dim, 4 * dim, bias=False), "wo": nn.Linear(4 * dim, dim, bias=False)}
        )


class T5Like(nn.Module):
    """T5-style encoder LM: shared embedding tied to the head, relative-position bias table, T5LayerNorm."""

    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.shared = nn.Embedding(vocab, dim)
        self.block = nn.ModuleList(T5Block(dim, first=i == 0) for i in range(layers))
        self.final_layer_norm = T5LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.shared.weight

    expected = [
        f"block.{i}.{n}.weight"
        for i in range(2)
        for n in (
            "SelfAttention.q",
            "SelfAttention.k",
            "SelfAttention.v",
            "SelfAttention.o",
            "DenseReluDense.wi",
            "DenseReluDense.wo",
        )
    ]


MODELS: dict[str, type[nn.Module]] = {
    "tied-embedding LM, custom RMSNorm": TiedLM,
    "GPT-2 port (Conv1D, tied head)": GPT2,
    "ViT (cls/pos tokens, layer scale)": ViT,
    "ConvNet with BatchNorm": ConvNet,
    "MoE LM (3-D experts, router)": MoELM,
    "T5-like (relative bias, T5LayerNorm)": T5Like,
}

# ---------------------------------------------------------------------------- comparison


def compare(model: nn.Module, decayed: set[int]) -> tuple[list[str], list[str]]:
    """Names wrongly decayed and wrongly left undecayed, against the model's hand-written ``expected`` list."""
    params = dict(model.named_parameters())  # one (first) name per tensor; tied tensors count once
    every = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in model.expected if n not in every]  # type: ignore[attr-defined]
    if unknown:
        raise KeyError(f"{type(model).__name__}.expected names no parameter: {unknown}")
    expected = {id(every[n]) for n in model.expected}  # type: ignore[attr-defined]
    wrong_decay = [n for n, p in params.items() if id(p) in decayed and id(p) not in expected]
    wrong_skip = [n for n, p in params.items() if id(p) in expected and id(p) not in decayed]
    return wrong_decay, wrong_skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--details", action="store_true", help="list the tensors behind every count")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    header = ["model", "tensors (should decay / all)", *TOOLS]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + [":---:"] * len(TOOLS)) + "|")
    totals = {tool: [0, 0] for tool in TOOLS}
    details: list[str] = []
    for label, cls in MODELS.items():
        model = cls()
        n_all = len(dict(model.named_parameters()))
        every = dict(model.named_parameters(remove_duplicate=False))
        n_expected = len({id(every[n]) for n in cls.expected})  # type: ignore[attr-defined]
        cells = [label, f"{n_expected} / {n_all}"]
        for tool, fn in TOOLS.items():
            wrong_decay, wrong_skip = compare(model, fn(model))
            totals[tool][0] += len(wrong_decay)
            totals[tool][1] += len(wrong_skip)
            cells.append(f"{len(wrong_decay)} / {len(wrong_skip)}")
            for kind, names in (("wrongly decayed", wrong_decay), ("wrongly undecayed", wrong_skip)):
                if names:
                    details.append(f"- {tool}, {label}: {kind}: {', '.join(names)}")
        print("| " + " | ".join(cells) + " |")
    print("| **total** | | " + " | ".join(f"**{a} / {b}**" for a, b in totals.values()) + " |")
    print()
    print("Cells: tensors wrongly decayed / wrongly left undecayed, against DESIGN.md's definition (hand-written")
    print("per model). Tied tensors count once. Rules re-implemented from timm param_groups_weight_decay,")
    print("transformers Trainer.get_decay_parameter_names, nanoGPT GPT.configure_optimizers.")
    if args.details:
        print()
        print("\n".join(details) if details else "(no mistakes)")


if __name__ == "__main__":
    main()
