"""Small hand-written look-alikes of architectures nobody here wrote.

Each model class carries two hand-written expectations, spelled out name by name (never
derived from the code under test):

* ``DECAYED``: the canonical names that :func:`lightning_wd.presets.standard` must decay
  (weight matrices and kernels of linear maps, nothing else);
* ``NDIM2``: the canonical names with two or more dimensions, which
  :func:`lightning_wd.presets.gpt` must decay.

Every class is module level so that models pickle for spawned processes. Tied parameters are
named by their first registration (``tok_embeddings.weight``, not ``output.weight``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

D = 8  # model width everywhere: keeps the models tiny


# --------------------------------------------------------------------------------------------
# A Llama-like transformer LM: tied input/output embeddings and a custom RMSNorm
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm written from scratch (does not subclass torch's); its gain is named ``weight`` or ``scale``."""

    def __init__(self, dim: int, eps: float = 1e-6, param: str = "weight") -> None:
        super().__init__()
        self.eps = eps
        self.param = param
        setattr(self, param, nn.Parameter(torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        gain = getattr(self, self.param)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * gain


class LlamaAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)


class LlamaFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)


class LlamaBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = LlamaAttention(dim)
        self.ffn_norm = RMSNorm(dim, param="scale")
        self.feed_forward = LlamaFeedForward(dim, 2 * dim)


class TiedTransformerLM(nn.Module):
    """Token embedding tied to the output head; two blocks; final RMSNorm."""

    DECAYED = (
        "layers.0.attention.wq.weight",
        "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight",
        "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.1.attention.wq.weight",
        "layers.1.attention.wk.weight",
        "layers.1.attention.wv.weight",
        "layers.1.attention.wo.weight",
        "layers.1.feed_forward.w1.weight",
        "layers.1.feed_forward.w2.weight",
        "layers.1.feed_forward.w3.weight",
    )
    NDIM2 = ("tok_embeddings.weight", *DECAYED)

    def __init__(self, vocab: int = 16, dim: int = D) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([LlamaBlock(dim), LlamaBlock(dim)])
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight


class HeadFirstTiedLM(nn.Module):
    """The tie registered head first: the shared weight is reachable first as ``lm_head.weight``."""

    DECAYED = ("proj.weight",)
    NDIM2 = ("lm_head.weight", "proj.weight")

    def __init__(self, vocab: int = 16, dim: int = D) -> None:
        super().__init__()
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.embed.weight = self.lm_head.weight


# --------------------------------------------------------------------------------------------
# A GPT-2 port: Conv1D linear layers with a transposed weight, wte/wpe, ln_1/ln_f
# --------------------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """GPT-2's "1-D convolution": a linear layer whose weight is stored transposed, (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class GPT2Attention(nn.Module):
    def __init__(self, dim: int, n_positions: int) -> None:
        super().__init__()
        self.c_attn = Conv1D(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(n_positions, n_positions)), persistent=False)


class GPT2MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_proj = Conv1D(dim, 4 * dim)


class GPT2Block(nn.Module):
    def __init__(self, dim: int, n_positions: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = GPT2Attention(dim, n_positions)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = GPT2MLP(dim)


class GPT2Model(nn.Module):
    def __init__(self, vocab: int, n_positions: int, dim: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(n_positions, dim)
        self.h = nn.ModuleList([GPT2Block(dim, n_positions), GPT2Block(dim, n_positions)])
        self.ln_f = nn.LayerNorm(dim)


class GPT2LMHeadModel(nn.Module):
    DECAYED = (
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.attn.c_proj.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
    )
    NDIM2 = ("transformer.wte.weight", "transformer.wpe.weight", *DECAYED)

    def __init__(self, vocab: int = 16, n_positions: int = 8, dim: int = D) -> None:
        super().__init__()
        self.transformer = GPT2Model(vocab, n_positions, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


# --------------------------------------------------------------------------------------------
# A T5-like encoder-decoder: relative-position-bias embedding, T5LayerNorm, shared embeddings
# --------------------------------------------------------------------------------------------
class T5LayerNorm(nn.Module):
    """T5's scale-only RMS norm (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps


class T5Attention(nn.Module):
    def __init__(self, dim: int, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(8, 2)  # (num_buckets, n_heads)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, dim: int, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(dim, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(dim)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(dim)
        self.layer_norm = T5LayerNorm(dim)


class T5DenseActDense(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.wi = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(2 * dim, dim, bias=False)


class T5LayerFF(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(dim)
        self.layer_norm = T5LayerNorm(dim)


class T5Block(nn.Module):
    def __init__(self, dim: int, is_decoder: bool, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(dim, has_relative_attention_bias)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(dim))
        self.layer.append(T5LayerFF(dim))


class T5Stack(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, dim: int, n_blocks: int, is_decoder: bool) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(dim, is_decoder, i == 0) for i in range(n_blocks)])
        self.final_layer_norm = T5LayerNorm(dim)


class T5ForConditionalGeneration(nn.Module):
    """Encoder (2 blocks) and decoder (1 block) sharing one embedding module; untied lm_head (T5 v1.1)."""

    DECAYED = (
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.0.SelfAttention.k.weight",
        "encoder.block.0.layer.0.SelfAttention.v.weight",
        "encoder.block.0.layer.0.SelfAttention.o.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi.weight",
        "encoder.block.0.layer.1.DenseReluDense.wo.weight",
        "encoder.block.1.layer.0.SelfAttention.q.weight",
        "encoder.block.1.layer.0.SelfAttention.k.weight",
        "encoder.block.1.layer.0.SelfAttention.v.weight",
        "encoder.block.1.layer.0.SelfAttention.o.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi.weight",
        "encoder.block.1.layer.1.DenseReluDense.wo.weight",
        "decoder.block.0.layer.0.SelfAttention.q.weight",
        "decoder.block.0.layer.0.SelfAttention.k.weight",
        "decoder.block.0.layer.0.SelfAttention.v.weight",
        "decoder.block.0.layer.0.SelfAttention.o.weight",
        "decoder.block.0.layer.1.EncDecAttention.q.weight",
        "decoder.block.0.layer.1.EncDecAttention.k.weight",
        "decoder.block.0.layer.1.EncDecAttention.v.weight",
        "decoder.block.0.layer.1.EncDecAttention.o.weight",
        "decoder.block.0.layer.2.DenseReluDense.wi.weight",
        "decoder.block.0.layer.2.DenseReluDense.wo.weight",
        "lm_head.weight",
    )
    NDIM2 = (
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        *DECAYED,
    )

    def __init__(self, vocab: int = 16, dim: int = D) -> None:
        super().__init__()
        self.shared = nn.Embedding(vocab, dim)
        self.encoder = T5Stack(self.shared, dim, n_blocks=2, is_decoder=False)
        self.decoder = T5Stack(self.shared, dim, n_blocks=1, is_decoder=True)
        self.lm_head = nn.Linear(dim, vocab, bias=False)


# --------------------------------------------------------------------------------------------
# A ViT: free cls/register tokens and position table, LayerScale gammas, Conv2d patch embed
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))


class ViTAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class ViTBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)
        self.ls2 = LayerScale(dim)


class VisionTransformer(nn.Module):
    DECAYED = (
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.weight",
        "head.weight",
    )
    NDIM2 = ("cls_token", "register_tokens", "pos_embed", *DECAYED)

    def __init__(self, img: int = 8, patch: int = 4, dim: int = D, n_classes: int = 3, n_registers: int = 2) -> None:
        super().__init__()
        n_patches = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, n_registers, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.patch_embed = PatchEmbed(patch, 3, dim)
        self.blocks = nn.Sequential(ViTBlock(dim), ViTBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)


# --------------------------------------------------------------------------------------------
# A ConvNeXt-ish convnet: depthwise conv, custom LayerNorm2d, free layer-scale gamma
# --------------------------------------------------------------------------------------------
class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm written from scratch (not a subclass of nn.LayerNorm)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))


class ConvNeXt(nn.Module):
    DECAYED = (
        "stem.0.weight",
        "stages.0.0.dwconv.weight",
        "stages.0.0.pwconv1.weight",
        "stages.0.0.pwconv2.weight",
        "stages.1.0.dwconv.weight",
        "stages.1.0.pwconv1.weight",
        "stages.1.0.pwconv2.weight",
        "downsample.0.1.weight",
        "head.weight",
    )
    NDIM2 = DECAYED

    def __init__(self, dims: tuple[int, int] = (4, 8), n_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        self.stages = nn.ModuleList([nn.Sequential(ConvNeXtBlock(dims[0])), nn.Sequential(ConvNeXtBlock(dims[1]))])
        self.downsample = nn.ModuleList(
            [nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], kernel_size=2, stride=2))]
        )
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], n_classes)


# --------------------------------------------------------------------------------------------
# Mixture of experts: fused 3-D expert weights and a router
# --------------------------------------------------------------------------------------------
class FusedExperts(nn.Module):
    """All experts' MLPs as two stacked tensors: w1 (E, d, h) and w2 (E, h, d)."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, dim, hidden) * 0.02)
        self.w2 = nn.Parameter(torch.randn(n_experts, hidden, dim) * 0.02)


class GateUpExperts(nn.Module):
    """The same, laid out as newer ports do: gate_up_proj (E, d, 2h) and down_proj (E, h, d)."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, dim, 2 * hidden) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(n_experts, hidden, dim) * 0.02)


class MoELayer(nn.Module):
    DECAYED = (
        "router.weight",
        "experts.w1",
        "experts.w2",
        "gate.weight",
        "experts2.gate_up_proj",
        "experts2.down_proj",
    )
    NDIM2 = DECAYED

    def __init__(self, n_experts: int = 4, dim: int = D, hidden: int = 16) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = FusedExperts(n_experts, dim, hidden)
        self.expert_bias = nn.Parameter(torch.zeros(n_experts))  # load-balancing bias
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts2 = GateUpExperts(n_experts, dim, hidden)


# --------------------------------------------------------------------------------------------
# A Mamba-like selective state-space block
# --------------------------------------------------------------------------------------------
class MambaMixer(nn.Module):
    def __init__(self, dim: int, d_state: int = 4, d_conv: int = 4, expand: int = 2, dt_rank: int = 2) -> None:
        super().__init__()
        d_inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)


class MambaResidual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mixer = MambaMixer(dim)
        self.norm = RMSNorm(dim)


class MambaLM(nn.Module):
    DECAYED = (
        "layers.0.mixer.in_proj.weight",
        "layers.0.mixer.conv1d.weight",
        "layers.0.mixer.x_proj.weight",
        "layers.0.mixer.dt_proj.weight",
        "layers.0.mixer.out_proj.weight",
        "layers.1.mixer.in_proj.weight",
        "layers.1.mixer.conv1d.weight",
        "layers.1.mixer.x_proj.weight",
        "layers.1.mixer.dt_proj.weight",
        "layers.1.mixer.out_proj.weight",
    )
    NDIM2 = ("embedding.weight", "layers.0.mixer.A_log", "layers.1.mixer.A_log", *DECAYED)

    def __init__(self, vocab: int = 16, dim: int = D) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([MambaResidual(dim), MambaResidual(dim)])
        self.norm_f = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embedding.weight


# --------------------------------------------------------------------------------------------
# torch layers with several weight tensors: RNNs, attention, bilinear, transposed convs
# --------------------------------------------------------------------------------------------
class RecurrentNet(nn.Module):
    DECAYED = (
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_hr_l0",
        "lstm.weight_ih_l0_reverse",
        "lstm.weight_hh_l0_reverse",
        "lstm.weight_hr_l0_reverse",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "lstm.weight_hr_l1",
        "lstm.weight_ih_l1_reverse",
        "lstm.weight_hh_l1_reverse",
        "lstm.weight_hr_l1_reverse",
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "gru.weight_ih_l0_reverse",
        "gru.weight_hh_l0_reverse",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "cell.weight_ih",
        "cell.weight_hh",
        "gru_cell.weight_ih",
        "gru_cell.weight_hh",
    )
    NDIM2 = DECAYED

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
        self.gru = nn.GRU(4, 5, bidirectional=True)
        self.rnn = nn.RNN(4, 5)
        self.cell = nn.LSTMCell(4, 5)
        self.gru_cell = nn.GRUCell(4, 5)


class AttentionNet(nn.Module):
    """Self-attention with bias_k/bias_v, and cross-attention with kdim/vdim != embed_dim."""

    DECAYED = (
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "xattn.q_proj_weight",
        "xattn.k_proj_weight",
        "xattn.v_proj_weight",
        "xattn.out_proj.weight",
    )
    NDIM2 = ("attn.in_proj_weight", "attn.bias_k", "attn.bias_v", "attn.out_proj.weight", *DECAYED[2:])

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, add_bias_kv=True)
        self.xattn = nn.MultiheadAttention(dim, 2, kdim=4, vdim=6)


class MiscLinearNet(nn.Module):
    """Bilinear, spectral-norm and weight-norm parametrizations, transposed convs, conv3d."""

    DECAYED = (
        "bil.weight",
        "sn.weight",
        "wn.weight.original1",
        "deconv2d.weight",
        "deconv3d.weight",
        "conv3d.weight",
    )
    NDIM2 = ("bil.weight", "sn.weight", "wn.weight.original0", "wn.weight.original1", *DECAYED[3:])

    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(3, 4, 5)
        self.sn = parametrizations.spectral_norm(nn.Linear(4, 4))
        self.wn = parametrizations.weight_norm(nn.Linear(4, 3))
        self.deconv2d = nn.ConvTranspose2d(3, 4, 3)
        self.deconv3d = nn.ConvTranspose3d(2, 3, 3)
        self.conv3d = nn.Conv3d(2, 3, 3, bias=False)


class NormZoo(nn.Module):
    """Every affine torch norm: nothing is a linear map, nothing has two dimensions."""

    DECAYED = ()
    NDIM2 = ()

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.prelu = nn.PReLU(4)


# --------------------------------------------------------------------------------------------
# Hugging Face-style dual encoder: the model class inherits a non-module mixin whose name says
# "Embedding" (as transformers' PreTrainedModel does), and holds a free projection matrix and a
# temperature; a ConvNeXt-V2 block whose Global Response Normalization keeps its gain and offset
# as (1, 1, 1, C) tensors named weight/bias.
# --------------------------------------------------------------------------------------------
class EmbeddingAccessMixin:
    """Not a module: a mixin of accessors, as libraries put in their model base classes."""

    def get_input_embeddings(self) -> nn.Module:
        return self.token_embedding  # type: ignore[attr-defined,no-any-return]


class PreTrainedModelLike(nn.Module, EmbeddingAccessMixin):
    pass


class DualEncoderModel(PreTrainedModelLike):
    DECAYED = ("prompts_visual_projection", "text_encoder.weight", "vision_encoder.weight")
    NDIM2 = ("prompts_visual_projection", "token_embedding.weight", "text_encoder.weight", "vision_encoder.weight")

    def __init__(self, dim: int = D, vocab: int = 11) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.text_encoder = nn.Linear(dim, dim)
        self.prompts_visual_projection = nn.Parameter(torch.randn(dim, 2 * dim))
        self.vision_encoder = nn.Linear(2 * dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))


class ConvNextV2GRN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))


class ConvNextV2Block(nn.Module):
    DECAYED = ("dwconv.weight", "pwconv1.weight", "pwconv2.weight")
    NDIM2 = ("dwconv.weight", "pwconv1.weight", "grn.weight", "grn.bias", "pwconv2.weight")

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 2 * dim)
        self.grn = ConvNextV2GRN(2 * dim)
        self.pwconv2 = nn.Linear(2 * dim, dim)


ARCHITECTURES = (
    TiedTransformerLM,
    HeadFirstTiedLM,
    GPT2LMHeadModel,
    T5ForConditionalGeneration,
    VisionTransformer,
    ConvNeXt,
    MoELayer,
    MambaLM,
    RecurrentNet,
    AttentionNet,
    MiscLinearNet,
    NormZoo,
    DualEncoderModel,
    ConvNextV2Block,
)


# --------------------------------------------------------------------------------------------
# Small shared models for plan and mixin tests
# --------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Linear -> LayerNorm -> Linear: standard decays fc1.weight and fc2.weight."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class Wrapped(nn.Module):
    """Holds the real model behind an attribute (as wrappers and adapters do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner


class DistributedDataParallel(nn.Module):
    """Stand-in for torch's DDP: same class name, holds the model as ``module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class CheckpointWrapper(nn.Module):
    """Stand-in for torch's activation-checkpoint wrapper (``_checkpoint_wrapped_module``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._checkpoint_wrapped_module = module
