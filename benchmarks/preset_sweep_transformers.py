"""Run ``presets.standard`` over every model class of Hugging Face transformers and report it.

Architectures nobody here wrote, built from their default configs on the ``meta`` device (no
weights are downloaded or allocated), planned with the standard preset. The report counts the
tensors per decision and lists, for human review, every call the preset makes from names and
shapes rather than from torch's own layer classes: tensors it decays whose owner is not a torch
linear, convolution, recurrent or attention layer, and tensors of two or more dimensions it
leaves undecayed. A plan that fails is listed with its error.

Needs ``pip install transformers`` (not a dependency of lightning_wd)::

    python benchmarks/preset_sweep_transformers.py                  # every model type
    python benchmarks/preset_sweep_transformers.py llama t5 vit     # a few
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import warnings

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

import lightning_wd as lwd

TORCH_LAYERS = (nn.Linear, nn.Bilinear, _ConvNd, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)
SMALL = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
    vocab_size=97, d_model=32, n_embd=32, n_layer=1, n_head=2, num_layers=1, encoder_layers=1, decoder_layers=1,
    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, d_ff=64,
    d_kv=16, num_heads=2, embed_dim=32, max_position_embeddings=64, n_positions=64, head_dim=16, num_experts=4,
    num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, image_size=32, patch_size=8,
)  # fmt: skip


def build(model_type: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type)
    for key, value in SMALL.items():
        if hasattr(config, key):
            with contextlib.suppress(Exception):  # some configs derive these and refuse a direct set
                setattr(config, key, value)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="transformers model types (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers
    from transformers import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    types = args.model_types or sorted(CONFIG_MAPPING.keys())
    planned, not_built, failed = 0, 0, []
    counts: collections.Counter[str] = collections.Counter()
    by_name: dict[tuple[str, str, str], list[str]] = collections.defaultdict(list)
    for model_type in types:
        try:
            model = build(model_type)
        except Exception:  # a config that needs more than defaults (a sub-model, a backbone download)
            not_built += 1
            continue
        try:
            plan = lwd.DecayPlan.from_module(model, lwd.presets.standard(0.1))
        except Exception as err:
            failed.append(f"{model_type}: {type(err).__name__}: {err}")
            continue
        planned += 1
        owner_of = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        for group in plan.groups:
            for name, param in zip(group.param_names, group.params, strict=True):
                decayed = group.weight_decay > 0
                counts["decayed" if decayed else "not decayed"] += 1
                owner = owner_of.get(id(param))
                leaf = name.rsplit(".", 1)[-1]
                if decayed and not isinstance(owner, TORCH_LAYERS):
                    by_name[("decayed, owner not a torch layer", type(owner).__name__, leaf)].append(model_type)
                elif not decayed and param.dim() >= 2:
                    rule = plan.entry(name).rule or "(default group)"
                    by_name[(f"not decayed, ndim >= 2, rule {rule}", type(owner).__name__, leaf)].append(model_type)
    print(f"# standard preset over transformers {transformers.__version__}: {len(types)} model types")
    print(f"planned {planned}, not buildable from defaults {not_built}, plan errors {len(failed)}")
    print(f"tensors: {counts['decayed']:,} decayed, {counts['not decayed']:,} not decayed\n")
    for line in failed:
        print("plan error:", line)
    print("| decision | owner class | tensor | model types |")
    print("| --- | --- | --- | --- |")
    for (decision, owner, leaf), models in sorted(by_name.items()):
        shown = ", ".join(sorted(set(models))[:3]) + (", ..." if len(set(models)) > 3 else "")
        print(f"| {decision} | {owner} | {leaf} | {shown} |")


if __name__ == "__main__":
    main()
