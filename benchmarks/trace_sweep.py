"""Compare ``presets.standard`` decided from structure with the roles a traced forward pass shows.

Architectures of several libraries, built from small configs on the CPU, are planned twice with
the standard preset: once from structure (names, classes, shapes) and once with an example input
(``DecayPlan.from_module(..., example_inputs=...)``), where each parameter the forward uses takes
its role from that use. The script prints, per library, how many tensors the two plans put in the
same group, and lists every disagreement (tensor, owner class, the static decision, the traced
evidence) for review. Models that cannot be built or run from a small config are counted, with
their error.

Needs the ``sweep`` extra (``pip install -e .[sweep]``: transformers, diffusers, x-transformers,
peft, torch_geometric, vector-quantize-pytorch); libraries that are not installed are skipped::

    python benchmarks/trace_sweep.py                          # the default architectures
    python benchmarks/trace_sweep.py --library transformers   # one library
    python benchmarks/trace_sweep.py --all-transformers       # every transformers model type
    python benchmarks/trace_sweep.py --cost                   # plan time with and without a trace

``--cost`` times ``DecayPlan.from_module`` with and without ``example_inputs`` (median of
``--repeat`` runs after one warm-up) on a GPT-2 small config (124M parameters, on the CPU, one
sequence of 128 tokens) and on a Llama config of 1.1B parameters built on the meta device (no
memory), and for scale the GPT's own forward pass without grad.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import lightning_wd as lwd

Builder = Callable[[], tuple[nn.Module, Any]]

# ------------------------------------------------------------------------------ transformers
_TYPES = (
    "albert bart beit bert big_bird bloom convbert convnext convnextv2 ctrl deberta deberta-v2 deit dinov2"
    " distilbert electra falcon funnel gemma gemma2 gpt2 gpt_neo gpt_neox gptj levit llama mamba marian"
    " mbart mistral mixtral mobilebert mobilevit mpt opt pegasus phi phi3 qwen2 qwen2_moe qwen3 regnet resnet"
    " roberta rwkv segformer squeezebert swin t5 vit wav2vec2 xlm-roberta xlnet"
)
TRANSFORMERS_TYPES = _TYPES.split()
SMALL = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
    vocab_size=97, d_model=32, n_embd=32, n_layer=1, n_head=2, num_layers=1, encoder_layers=1, decoder_layers=1,
    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, d_ff=64,
    d_kv=16, num_heads=2, embed_dim=32, max_position_embeddings=64, n_positions=64, head_dim=16, num_experts=4,
    num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, image_size=32, patch_size=8,
    embedding_size=32, hidden_sizes=[16, 32], depths=[1, 1], num_channels=3,
)  # fmt: skip


#: Models larger than this from the small config are not built (they would take the machine's memory).
MAX_PARAMETERS = 30_000_000


def _transformers_builder(model_type: str) -> Builder:
    def build() -> tuple[nn.Module, Any]:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.for_model(model_type)
        for key, value in SMALL.items():
            if hasattr(config, key):
                with contextlib.suppress(Exception):  # some configs derive these and refuse a direct set
                    setattr(config, key, value)
        with torch.device("meta"):  # count first: a few configs stay large whatever the small values say
            size = sum(p.numel() for p in AutoModel.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"{size / 1e6:.0f}M parameters from the small config, over {MAX_PARAMETERS / 1e6:.0f}M")
        model = AutoModel.from_config(config).eval()
        return model, _transformers_inputs(model, config)

    return build


def _transformers_inputs(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        ids = torch.randint(0, min(getattr(config, "vocab_size", 97) or 97, 97), (1, 8))
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
        return inputs
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else 32
        return {"pixel_values": torch.randn(1, getattr(config, "num_channels", 3), size, size)}
    if name == "input_values":
        return {"input_values": torch.randn(1, 4000)}
    raise ValueError(f"no example input for main_input_name {name!r}")


# ------------------------------------------------------------------------------ diffusers
def _diffusers_builders() -> dict[str, Builder]:
    def unet2d() -> tuple[nn.Module, Any]:
        from diffusers import UNet2DModel

        model = UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
        )  # fmt: skip
        return model, (torch.randn(1, 3, 16, 16), torch.tensor([10]))

    def unet2d_condition() -> tuple[nn.Module, Any]:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )  # fmt: skip
        return model, (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8))

    def autoencoder_kl() -> tuple[nn.Module, Any]:
        from diffusers import AutoencoderKL

        model = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        )  # fmt: skip
        return model, torch.randn(1, 3, 16, 16)

    def vq_model() -> tuple[nn.Module, Any]:
        from diffusers import VQModel

        model = VQModel(
            in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            num_vq_embeddings=16, vq_embed_dim=4, sample_size=16,
        )  # fmt: skip
        return model, torch.randn(1, 3, 16, 16)

    def dit() -> tuple[nn.Module, Any]:
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8, patch_size=2,
            num_embeds_ada_norm=10, norm_num_groups=4,
        )  # fmt: skip
        return model, {
            "hidden_states": torch.randn(1, 4, 8, 8),
            "timestep": torch.tensor([3]),
            "class_labels": torch.tensor([1]),
        }

    def sd3() -> tuple[nn.Module, Any]:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16,
        )  # fmt: skip
        inputs = {
            "hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 3, 16),
            "pooled_projections": torch.randn(1, 8), "timestep": torch.tensor([3]),
        }  # fmt: skip
        return model, inputs

    return {
        "UNet2DModel": unet2d,
        "UNet2DConditionModel": unet2d_condition,
        "AutoencoderKL": autoencoder_kl,
        "VQModel": vq_model,
        "DiTTransformer2DModel": dit,
        "SD3Transformer2DModel": sd3,
    }


# ------------------------------------------------------------------------------ x-transformers
def _x_transformers_builders() -> dict[str, Builder]:
    def lm(**features: Any) -> Builder:
        def build() -> tuple[nn.Module, Any]:
            from x_transformers import Decoder, TransformerWrapper

            layers = Decoder(dim=16, depth=1, heads=2, **features)
            return TransformerWrapper(num_tokens=50, max_seq_len=16, attn_layers=layers), torch.randint(0, 50, (1, 8))

        return build

    def encoder(**features: Any) -> Builder:
        def build() -> tuple[nn.Module, Any]:
            from x_transformers import Encoder, TransformerWrapper

            layers = Encoder(dim=16, depth=1, heads=2, **features)
            model = TransformerWrapper(num_tokens=50, max_seq_len=16, attn_layers=layers, num_memory_tokens=2)
            return model, torch.randint(0, 50, (1, 8))

        return build

    def vit() -> tuple[nn.Module, Any]:
        from x_transformers import Encoder, ViTransformerWrapper

        model = ViTransformerWrapper(
            image_size=16, patch_size=4, num_classes=5, attn_layers=Encoder(dim=16, depth=1, heads=2)
        )
        return model, torch.randn(1, 3, 16, 16)

    def enc_dec() -> tuple[nn.Module, Any]:
        from x_transformers import XTransformer

        model = XTransformer(
            dim=16, enc_num_tokens=50, enc_depth=1, enc_heads=2, enc_max_seq_len=16, dec_num_tokens=50, dec_depth=1,
            dec_heads=2, dec_max_seq_len=16, tie_token_emb=True,
        )  # fmt: skip
        ids = torch.randint(0, 50, (1, 8))
        return model, (ids, ids)

    return {
        "decoder": lm(),
        "decoder rotary+glu+rmsnorm": lm(rotary_pos_emb=True, ff_glu=True, use_rmsnorm=True),
        "decoder alibi+mem_kv+layerscale": lm(alibi_pos_bias=True, attn_num_mem_kv=2, use_scalenorm=True),
        "decoder qk_norm+gate_values": lm(attn_qk_norm=True, attn_gate_values=True, ff_swish=True),
        "decoder sandwich+residual_attn": lm(sandwich_norm=True, residual_attn=True, rel_pos_bias=True),
        "encoder memory tokens": encoder(),
        "vit": vit,
        "encoder-decoder tied": enc_dec,
    }


# ------------------------------------------------------------------------------ peft
def _peft_builders() -> dict[str, Builder]:
    """Adapters of peft on a one-layer Llama: the base model is frozen, so only the adapters are planned."""

    def adapter(make_config: Callable[[Any], Any]) -> Builder:
        def build() -> tuple[nn.Module, Any]:
            import peft
            from transformers import LlamaConfig, LlamaForCausalLM

            base = LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=64,
                )
            )  # fmt: skip
            model = peft.get_peft_model(base, make_config(peft)).eval()
            return model, {"input_ids": torch.randint(0, 97, (1, 8))}

        return build

    qv = ["q_proj", "v_proj"]
    norms = ["input_layernorm", "post_attention_layernorm", "norm"]
    return {
        "LoRA": adapter(lambda p: p.LoraConfig(r=4, target_modules=qv)),
        "LoRA + modules_to_save": adapter(lambda p: p.LoraConfig(r=4, target_modules=qv, modules_to_save=["lm_head"])),
        "DoRA": adapter(lambda p: p.LoraConfig(r=4, target_modules=qv, use_dora=True)),
        "AdaLoRA": adapter(lambda p: p.AdaLoraConfig(r=4, target_modules=qv, total_step=10)),
        "LoHa": adapter(lambda p: p.LoHaConfig(r=4, target_modules=qv)),
        "LoKr": adapter(lambda p: p.LoKrConfig(r=4, target_modules=qv)),
        "IA3": adapter(
            lambda p: p.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        ),
        "VeRA": adapter(lambda p: p.VeraConfig(r=4, target_modules=qv)),
        "OFT": adapter(lambda p: p.OFTConfig(r=0, oft_block_size=4, target_modules=qv)),
        "BOFT": adapter(lambda p: p.BOFTConfig(boft_block_size=4, target_modules=qv)),
        "HRA": adapter(lambda p: p.HRAConfig(r=4, target_modules=qv)),
        "FourierFT": adapter(lambda p: p.FourierFTConfig(n_frequency=16, target_modules=qv)),
        "VB-LoRA": adapter(lambda p: p.VBLoRAConfig(r=4, num_vectors=8, vector_length=16, target_modules=qv)),
        "LN tuning": adapter(lambda p: p.LNTuningConfig(target_modules=norms)),
        "prefix tuning, projected": adapter(
            lambda p: p.PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
            )
        ),
        "prompt tuning": adapter(lambda p: p.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
        "P-tuning, LSTM": adapter(
            lambda p: p.PromptEncoderConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=4,
                encoder_hidden_size=16,
                encoder_reparameterization_type="LSTM",
            )
        ),
        "adaption prompt": adapter(
            lambda p: p.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM")
        ),
        "trainable tokens": adapter(lambda p: p.TrainableTokensConfig(token_indices=[1, 2, 3])),
    }


# ------------------------------------------------------------------------------ torch_geometric
def _geometric_builders() -> dict[str, Builder]:
    """Graph layers and models of PyG on a six-node graph (no compiled extensions needed)."""

    def graph(make: Callable[[Any], nn.Module], edge_features: bool = False) -> Builder:
        def build() -> tuple[nn.Module, Any]:
            from torch_geometric import nn as gnn

            edges = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 2], [1, 2, 3, 4, 5, 0, 3, 5]])
            inputs = (torch.randn(6, 8), edges) + ((torch.randn(8, 3),) if edge_features else ())
            return make(gnn).eval(), inputs

        return build

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    return {
        "GCNConv": graph(lambda g: g.GCNConv(8, 8)),
        "GATConv": graph(lambda g: g.GATConv(8, 4, heads=2)),
        "GATv2Conv, edge features": graph(lambda g: g.GATv2Conv(8, 4, heads=2, edge_dim=3), edge_features=True),
        "SAGEConv": graph(lambda g: g.SAGEConv(8, 8)),
        "GINConv": graph(lambda g: g.GINConv(mlp(), train_eps=True)),
        "GINEConv": graph(lambda g: g.GINEConv(nn.Linear(8, 8), train_eps=True, edge_dim=3), edge_features=True),
        "TransformerConv": graph(lambda g: g.TransformerConv(8, 4, heads=2, edge_dim=3), edge_features=True),
        "GraphConv": graph(lambda g: g.GraphConv(8, 8)),
        "ChebConv": graph(lambda g: g.ChebConv(8, 8, K=2)),
        "GENConv": graph(lambda g: g.GENConv(8, 8, learn_t=True, learn_p=True)),
        "PNAConv": graph(
            lambda g: g.PNAConv(8, 8, aggregators=["mean", "max"], scalers=["identity"], deg=torch.tensor([0, 3, 2, 1]))
        ),
        "GPSConv": graph(lambda g: g.GPSConv(8, g.GINConv(nn.Linear(8, 8)), heads=2)),
        "GCN, batch norm": graph(lambda g: g.models.GCN(8, 16, 2, out_channels=4, norm="batch_norm")),
        "GAT": graph(lambda g: g.models.GAT(8, 16, 2, out_channels=4, heads=2)),
        "GraphSAGE, layer norm": graph(lambda g: g.models.GraphSAGE(8, 16, 2, out_channels=4, norm="layer_norm")),
        "GIN": graph(lambda g: g.models.GIN(8, 16, 2, out_channels=4)),
        "EdgeCNN": graph(lambda g: g.models.EdgeCNN(8, 16, 2, out_channels=4)),
    }


# ------------------------------------------------------------------------------ vector-quantize-pytorch
def _vector_quantize_builders() -> dict[str, Builder]:
    """Quantizers of vector-quantize-pytorch (lucidrains); EMA codebooks are buffers, so the codebooks are learned."""

    def quantizer(make: Callable[[Any], nn.Module]) -> Builder:
        def build() -> tuple[nn.Module, Any]:
            import vector_quantize_pytorch as vq

            return make(vq).eval(), torch.randn(1, 16, 8)

        return build

    learned = dict(codebook_size=16, learnable_codebook=True, ema_update=False)
    return {
        "VectorQuantize": quantizer(lambda v: v.VectorQuantize(dim=8, **learned)),
        "VectorQuantize, heads": quantizer(
            lambda v: v.VectorQuantize(dim=8, codebook_dim=4, heads=2, separate_codebook_per_head=True, **learned)
        ),
        "ResidualVQ": quantizer(lambda v: v.ResidualVQ(dim=8, num_quantizers=2, **learned)),
        "ResidualVQ, shared codebook": quantizer(
            lambda v: v.ResidualVQ(dim=8, num_quantizers=2, shared_codebook=True, **learned)
        ),
        "GroupedResidualVQ": quantizer(lambda v: v.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, **learned)),
        "SimVQ": quantizer(lambda v: v.SimVQ(dim=8, codebook_size=16)),
        "ResidualSimVQ": quantizer(lambda v: v.ResidualSimVQ(dim=8, num_quantizers=2, codebook_size=16)),
        "FSQ": quantizer(lambda v: v.FSQ(levels=[8, 5, 5], dim=8)),
        "ResidualFSQ": quantizer(lambda v: v.ResidualFSQ(levels=[8, 5, 5], dim=8, num_quantizers=2)),
        "LFQ": quantizer(lambda v: v.LFQ(dim=8, codebook_size=16)),
        "ResidualLFQ": quantizer(lambda v: v.ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2)),
    }


# ------------------------------------------------------------------------------ torch.nn and Lightning
def _torch_builders() -> dict[str, Builder]:
    def transformer() -> tuple[nn.Module, Any]:
        model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
        return model, (torch.randn(5, 1, 16), torch.randn(4, 1, 16))

    def lstm_lm() -> tuple[nn.Module, Any]:
        class LSTMLM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(50, 16)
                self.rnn = nn.LSTM(16, 16, num_layers=2, proj_size=8, bidirectional=True)
                self.head = nn.Linear(16, 50)

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                return self.head(self.rnn(self.embed(ids))[0])

        return LSTMLM(), torch.randint(0, 50, (6, 1))

    def conv_net() -> tuple[nn.Module, Any]:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2), nn.GroupNorm(2, 8),
            nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 7 * 7, 5),
        )  # fmt: skip
        return model, torch.randn(1, 3, 8, 8)

    def lightning_demo() -> tuple[nn.Module, Any]:
        from lightning.pytorch.demos import Transformer

        model = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=32, nlayers=1)
        ids = torch.randint(0, 50, (1, 8))
        return model, (ids, ids)

    return {
        "nn.Transformer": transformer,
        "LSTM language model": lstm_lm,
        "conv net": conv_net,
        "lightning.pytorch.demos.Transformer": lightning_demo,
    }


# ------------------------------------------------------------------------------ user code
class _Free(nn.Module):
    """Free parameters used directly in ``forward``, named as users name them; ``uses`` picks the ops."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], forward: Callable[[Any, torch.Tensor], torch.Tensor]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5))
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self, x)


def _user_builders() -> dict[str, Builder]:
    d = 8
    F = nn.functional

    def case(shapes: dict[str, tuple[int, ...]], forward: Callable[[Any, torch.Tensor], torch.Tensor]) -> Builder:
        return lambda: (_Free(shapes, forward), torch.randn(2, 4, d))

    sq = (d, d)
    return {
        "matmul U, V": case({"U": sq, "V": sq}, lambda m, x: (x @ m.U) @ m.V.T),
        "F.linear head, fc, dense": case(
            {"fc": sq, "dense": sq, "head": (5, d)}, lambda m, x: F.linear(F.linear(F.linear(x, m.fc), m.dense), m.head)
        ),
        "einsum mix, M": case(
            {"mix": sq, "M": sq}, lambda m, x: torch.einsum("bnd,de->bne", torch.einsum("bnd,de->bne", x, m.mix), m.M)
        ),
        "low-rank A, B": case({"A": (d, 2), "B": (2, d)}, lambda m, x: x @ (m.A @ m.B)),
        "LoRA lora_A, lora_B, W": case(
            {"W": sq, "lora_A": (2, d), "lora_B": (d, 2)}, lambda m, x: x @ m.W.T + x @ m.lora_A.T @ m.lora_B.T
        ),
        "fused qkv, mat, proj": case(
            {"qkv": (3 * d, d), "mat": sq, "proj": sq},
            lambda m, x: F.linear(sum(F.linear(x, m.qkv).chunk(3, -1)), m.mat) @ m.proj,
        ),
        "w1, Wq, q_proj": case({"w1": sq, "Wq": sq, "q_proj": sq}, lambda m, x: x @ m.w1 @ m.Wq @ m.q_proj),
        "no decay: pos, cls, gamma, temperature, gate": case(
            {"pos": (1, 4, d), "cls": (1, 1, d), "gamma": (d,), "temperature": (1,), "gate": (1,), "W": sq},
            lambda m, x: (
                torch.cat([m.cls.expand(2, -1, -1), (x + m.pos) @ m.W], 1)
                * m.gamma
                / m.temperature
                * torch.sigmoid(m.gate)
            ),
        ),
    }


LIBRARIES: dict[str, tuple[str, Callable[[], dict[str, Builder]]]] = {
    "transformers": ("transformers", lambda: {t: _transformers_builder(t) for t in TRANSFORMERS_TYPES}),
    "diffusers": ("diffusers", _diffusers_builders),
    "x-transformers": ("x_transformers", _x_transformers_builders),
    "peft": ("peft", _peft_builders),
    "torch_geometric": ("torch_geometric", _geometric_builders),
    "vector-quantize-pytorch": ("vector_quantize_pytorch", _vector_quantize_builders),
    "torch.nn / lightning": ("torch", _torch_builders),
    "user code": ("torch", _user_builders),
}


# ------------------------------------------------------------------------------ the comparison
@dataclass
class Outcome:
    tensors: int = 0
    traced: int = 0
    agree: int = 0
    models: int = 0
    models_agreeing: int = 0
    seconds_static: float = 0.0
    seconds_traced: float = 0.0


def compare(model: nn.Module, inputs: Any) -> tuple[list[tuple[str, str, str, str]], int, int, float, float]:
    """Disagreements (name, owner, static group, traced group and evidence), tensors, traced tensors, seconds."""
    rules = lwd.presets.standard(0.1)
    start = time.perf_counter()
    static = lwd.DecayPlan.from_module(model, rules)
    mid = time.perf_counter()
    traced = lwd.DecayPlan.from_module(model, rules, example_inputs=inputs)
    end = time.perf_counter()
    owner = {e.name: e.owners[0] for e in static.entries}
    static_group = {e.name: e.group for e in static.entries}
    rows = []
    for e in traced.entries:
        if e.group != static_group[e.name]:
            evidence = e.traced.evidence if e.traced is not None else "(structure)"
            rows.append((e.name, owner[e.name], static_group[e.name], f"{e.group}: {evidence}"))
    n_traced = sum(1 for e in traced.entries if e.traced is not None)
    return rows, len(traced.entries), n_traced, mid - start, end - mid


def run(selected: list[str], all_transformers: bool) -> None:
    outcomes: dict[str, Outcome] = {}
    failures: list[str] = []
    disagreements: list[tuple[str, str, str, str, str, str]] = []
    for library in selected:
        package, builders_of = LIBRARIES[library]
        if importlib.util.find_spec(package) is None:
            failures.append(f"{library}: not installed")
            continue
        builders = builders_of()
        if library == "transformers":
            import transformers

            transformers.logging.set_verbosity_error()
            if all_transformers:
                builders = {t: _transformers_builder(t) for t in sorted(transformers.CONFIG_MAPPING.keys())}
        outcome = outcomes.setdefault(library, Outcome())
        for name, build in builders.items():
            print(f"{library}: {name}", file=sys.stderr, flush=True)
            try:
                torch.manual_seed(0)
                model, inputs = build()
                rows, tensors, traced, t_static, t_traced = compare(model, inputs)
            except Exception as err:  # a config that needs more than a small default, or a forward that fails
                failures.append(f"{library} {name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                continue
            outcome.models += 1
            outcome.models_agreeing += not rows
            outcome.tensors += tensors
            outcome.traced += traced
            outcome.agree += tensors - len(rows)
            outcome.seconds_static += t_static
            outcome.seconds_traced += t_traced
            disagreements.extend((library, name, *row) for row in rows)
    print(
        f"# presets.standard: structure against traced roles (torch {torch.__version__},"
        f" lightning_wd {lwd.__version__})"
    )
    print()
    print("| library | models | tensors | used by the forward | same group | agreement | models in full agreement |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for library, o in outcomes.items():
        share = f"{100 * o.agree / o.tensors:.2f}%" if o.tensors else "n/a"
        print(
            f"| {library} | {o.models} | {o.tensors:,} | {o.traced:,} | {o.agree:,} | {share} | {o.models_agreeing} |"
        )
    print()
    print("| library | model | tensor | owner | static | traced |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in disagreements:
        print("| " + " | ".join(row) + " |")
    if failures:
        print()
        for line in failures:
            print("not compared:", line)


def _median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(repeat: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    rules = lwd.presets.standard(0.1)
    gpt = GPT2LMHeadModel(GPT2Config()).eval()
    ids = torch.randint(0, 50257, (1, 128))
    with torch.device("meta"):
        llama = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
            )
        )  # fmt: skip
    print(f"plan time, median of {repeat} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print()
    print("| model | parameters | device | plan, structure (s) | plan, traced (s) | traced on | forward alone (s) |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: |")
    for label, model, device in (("GPT-2 small", gpt, "cpu"), ("Llama 1.1B", llama, "meta")):
        n = sum(p.numel() for p in model.parameters())
        static = _median_seconds(lambda m=model: lwd.DecayPlan.from_module(m, rules), repeat)
        traced = _median_seconds(lambda m=model: lwd.DecayPlan.from_module(m, rules, example_inputs=ids), repeat)
        where = lwd.DecayPlan.from_module(model, rules, example_inputs=ids).trace.device
        forward = "n/a"
        if device == "cpu":
            with torch.no_grad():
                forward = f"{_median_seconds(lambda m=model: m(ids), repeat):.3f}"
        print(f"| {label} | {n / 1e6:,.0f}M | {device} | {static:.3f} | {traced:.3f} | {where} | {forward} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--library", action="append", choices=list(LIBRARIES), help="default: all")
    parser.add_argument("--all-transformers", action="store_true", help="every transformers model type")
    parser.add_argument("--cost", action="store_true", help="time plans with and without a trace instead")
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing with --cost")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.cost:
        cost(args.repeat)
        return
    torch.set_num_threads(1)
    run(args.library or list(LIBRARIES), args.all_transformers)


if __name__ == "__main__":
    main()
