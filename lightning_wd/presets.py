"""Ready rule lists.

* ``standard`` decays exactly the weight matrices and kernels of linear maps and
  nothing else, derived from structure (owner classes, parameter roles, shapes), so it
  works on architectures it has never seen.
* ``gpt`` is nanoGPT's heuristic: decay every parameter with two or more dimensions.
* ``uniform`` decays everything alike; ``none`` decays nothing.

The role predicates (``is_embedding``, ``is_normalization``, ``is_bias``,
``is_linear_weight``) are public so that custom rule lists can reuse them. They take a rule
predicate's arguments, ``(name, param, module)``: the canonical name (a string), the tensor and
the module holding it; anything else is refused with a TypeError naming the argument.

When the plan is built with an example input (``DecayPlan.from_module(..., example_inputs=...)``),
a parameter that the traced forward pass used takes its role from that use
(``lightning_wd.trace``): ``is_linear_weight`` is true exactly for the weights of linear maps,
``is_embedding`` for tables looked up by data, and ``is_normalization``/``is_bias`` never claim
either. A table that the forward read as a matrix operand stays a table: the weight of an embedding
module (a codebook read by ``einsum``), or a free-standing tensor named as an embedding or position table
(a relative-position table read by ``matmul``). Parameters the forward did not touch, and every parameter
without a trace, are decided from structure as described here. ``role_of`` gives the role the predicates act on.

Examples:
    >>> import torch, lightning_wd as lwd
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> [(g["name"], g["param_names"]) for g in lwd.build_param_groups(model, lwd.presets.standard(0.05))]
    [('no_decay', ['0.weight', '1.bias', '2.weight', '2.bias']), ('decay', ['1.weight'])]
    >>> [(g["name"], g["param_names"]) for g in lwd.build_param_groups(model, lwd.presets.gpt(0.1))]
    [('decay', ['0.weight', '1.weight']), ('no_decay', ['1.bias', '2.weight', '2.bias'])]
"""

from __future__ import annotations

import functools
import re

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.weight_norm import WeightNorm

from lightning_wd.rules import DecayRule, param_ndim
from lightning_wd.trace import TracedRole, active_trace, note_structure_decides

__all__ = [
    "Preset",
    "gpt",
    "is_bias",
    "is_embedding",
    "is_linear_weight",
    "is_normalization",
    "none",
    "role_of",
    "standard",
    "uniform",
]

_TORCH_NORMS: tuple[type, ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
_TORCH_EMBEDDINGS: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)
_TORCH_LINEAR: tuple[type, ...] = (nn.Linear, nn.Bilinear, _ConvNd, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)

# "Norm" or "Normalization" as a whole word of the class name, optionally with its dimensions (``BatchNorm2d``,
# ``BatchNormNd``, ``GroupNorm32``), and not the first word of a linear map's name (``NormHead``,
# ``NormLinear``); "Normalized..."/"Normed..." classes are maps with normalized rows.
_NORM_CLASS = re.compile(
    r"Norm(?:ali[sz]ation)?(?:\d+d?|Nd)?(?![a-z])(?!Head|Linear|Proj|Classifier|Dense|Conv)|^DyT$|DynamicTanh"
)
_EMBED_CLASS = re.compile(r"Embed(?:ding)?s?$|Embedding|PosEnc|PositionalEncoding")
# Words (split on '_' and case changes) that mark a free-standing tensor as a token, a table,
# a scale or another non-matrix role.
_NO_DECAY_WORDS = re.compile(
    r"^(embed\w*|emb|pos\w*|token\w*|tokens|cls|mask\w*|register\w*|table|tables|latent\w*|queries|prompt\w*|"
    r"scale\w*|gamma\w*|beta|alpha|temperature|temp|tau|log\w*|bias\w*|offset\w*|shift|codebook\w*|"
    r"memory|mem|anchor\w*|prior\w*|freq\w*|inv|mean|std|var)$"
)
# Words that name a matrix's role, and words that say "a weight" but nothing more (single letters
# are often axes, as in SAM's ``rel_pos_w``): the latter decide only when no other word has a role.
_WEIGHT_WORDS = re.compile(r"^(proj|projection|router|gate|experts?|fc|dense|qkv|mat|matrix|lora|head)$")
_GENERIC_WORDS = re.compile(r"^(weight|weights|kernel|w\d*|wq|wk|wv|wo)$")
# Words that name a table of positions or embeddings: they outweigh a trace that saw the tensor as a matrix
# operand (relative-position tables read by ``matmul``, segment embeddings read by ``einsum``).
_TABLE_WORDS = re.compile(r"^(embed\w*|emb|pos|position\w*|positional|table|tables)$")


_ORIGINAL = re.compile(r"^original\d+$")


@functools.lru_cache(maxsize=8192)
def _words(name: str) -> tuple[str, ...]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return tuple(w for w in re.split(r"[_\W]+", spaced.lower()) if w)


def _leaf(name: str) -> str:
    """The name that says what a tensor is: its last component, or for a parametrization with several
    originals (``x.weight.original0``) the parametrized tensor's name (``weight``)."""
    head, _, leaf = name.rpartition(".")
    if head and _ORIGINAL.match(leaf):
        return head.rpartition(".")[2]
    return leaf


def _is_weight_norm_magnitude(name: str, module: nn.Module) -> bool:
    """Whether ``name`` is the magnitude ``g`` of weight normalization: ``original0`` of a ``weight_norm``
    parametrization, or ``<name>_g`` of the deprecated hook (``torch.nn.utils.weight_norm``), whose
    direction ``<name>_v`` is decayed like the weight it replaces."""
    head, _, leaf = name.rpartition(".")
    if leaf != "original0":
        hooks = getattr(module, "_forward_pre_hooks", None) or {}
        return any(isinstance(h, WeightNorm) and leaf == f"{h.name}_g" for h in hooks.values())
    plist = getattr(getattr(module, "parametrizations", None), head.rpartition(".")[2], None)
    return plist is not None and any(type(m).__name__ == "_WeightNorm" for m in plist)


def _holds_layer_weight(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_LINEAR)


_CLASS_FLAGS: dict[tuple[type, str], bool] = {}


def _class_named(cls: type, pattern: re.Pattern[str]) -> bool:
    """Whether the class or a base *module* class has a bare name matching ``pattern`` (cached per class).

    Mixins that are not modules say nothing about a module's role: transformers' ``PreTrainedModel``
    inherits ``EmbeddingAccessMixin``, which would make every model class look like an embedding.
    """
    key = (cls, pattern.pattern)
    hit = _CLASS_FLAGS.get(key)
    if hit is None:
        hit = any(pattern.search(k.__name__) for k in cls.__mro__ if issubclass(k, nn.Module))
        if len(_CLASS_FLAGS) < 8192:
            _CLASS_FLAGS[key] = hit
    return hit


def _check_role_args(name: object, param: object, module: object) -> None:
    """Refuse role-predicate arguments of the wrong types (the common case costs three type tests)."""
    if type(name) is str and isinstance(param, Tensor) and isinstance(module, nn.Module):
        return
    if not isinstance(name, str):
        raise TypeError(
            f"`name` must be the parameter's name as a string, got {type(name).__name__} {name!r:.80}. Pass for"
            " example 'fc.weight' (as `module.named_parameters()` gives it)."
        )
    if not isinstance(param, Tensor):
        raise TypeError(
            f"`param` must be the parameter tensor, got {type(param).__name__} {param!r:.80}. Pass for example"
            " `module.weight`, the tensor itself rather than its name or shape."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"`module` must be the torch.nn.Module that holds the parameter, got {type(module).__name__}"
            f" {module!r:.80}. Pass for example the nn.Linear whose `weight` is `param`."
        )


def _traced(param: Tensor) -> TracedRole | None:
    """The role of ``param`` in the trace the plan is being resolved with, if there is one and it used ``param``."""
    trace = active_trace()
    return None if trace is None else trace.get(param)


def _traced_role(name: str, param: Tensor, module: nn.Module) -> str | None:
    """The role the trace gives ``param``, or None where structure decides: where the forward did not use it,
    and where it used as a matrix operand a tensor that structure knows as a table (the weight of an
    embedding module, or a free-standing tensor named as an embedding or position table): a codebook read
    by ``einsum`` or a relative-position table read by ``matmul`` stays a table, as a tied head's weight does.
    """
    traced = _traced(param)
    if traced is None:
        return None
    if traced.role == "linear" and (_is_embedding(module) or _named_as_table(name, module)):
        note_structure_decides(param)  # the plan reports it as decided by structure
        return None
    return traced.role


def _named_as_table(name: str, module: nn.Module) -> bool:
    """Whether a free-standing tensor's name says it is an embedding or position table (the head word decides)."""
    if _holds_layer_weight(module) or _is_normalization(module):
        return False
    for word in reversed(_role_words(name, module)):
        if _TABLE_WORDS.match(word):
            return True
        if _WEIGHT_WORDS.match(word) or _NO_DECAY_WORDS.match(word):
            return False
    return False


def _traced_as_map_or_table(name: str, param: Tensor, module: nn.Module) -> bool:
    return _traced_role(name, param, module) not in (None, "other")


def is_embedding(name: str, param: Tensor, module: nn.Module) -> bool:
    """Whether ``param`` is held by an embedding table (torch's, or any class named like one).

    A weight tied between an embedding and an output head is reachable through the
    embedding too, so it matches here under that alias.

    Raises:
        TypeError: if ``name`` is not a string, ``param`` not a tensor or ``module`` not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> emb = torch.nn.Embedding(10, 4)
        >>> is_embedding("wte.weight", emb.weight, emb)
        True
    """
    _check_role_args(name, param, module)
    traced = _traced_role(name, param, module)
    if traced is not None:
        return traced == "embedding"
    return _is_embedding(module)


def _is_embedding(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_EMBEDDINGS):
        return True
    if _holds_layer_weight(module):
        return False
    return _class_named(type(module), _EMBED_CLASS)


def is_normalization(name: str, param: Tensor, module: nn.Module) -> bool:
    """Whether ``param`` belongs to a normalization layer, torch's or a custom one (``RMSNorm``, ``LayerNorm2d``...).

    Raises:
        TypeError: if ``name`` is not a string, ``param`` not a tensor or ``module`` not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> class MyRMSNorm(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.scale = torch.nn.Parameter(torch.ones(4))
        >>> norm = MyRMSNorm()
        >>> is_normalization("norm.scale", norm.scale, norm)
        True
    """
    _check_role_args(name, param, module)
    if _traced_as_map_or_table(name, param, module):
        return False
    return _is_normalization(module)


def _is_normalization(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_NORMS):
        return True
    if _holds_layer_weight(module):
        return False
    return _class_named(type(module), _NORM_CLASS)


def is_bias(name: str, param: Tensor, module: nn.Module) -> bool:
    """Whether ``param`` is an additive bias (``bias``, ``bias_k``, ``attn_bias``, ``relative_position_bias_table``...).

    Raises:
        TypeError: if ``name`` is not a string, ``param`` not a tensor or ``module`` not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> is_bias("fc.bias", lin.bias, lin), is_bias("fc.weight", lin.weight, lin)
        (True, False)
        >>> is_bias(lin.bias, "fc.bias", lin)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        TypeError: `name` must be the parameter's name as a string, got Parameter ...
    """
    _check_role_args(name, param, module)
    if _traced_as_map_or_table(name, param, module):
        return False
    return _is_bias(name)


def _is_bias(name: str) -> bool:
    return "bias" in _words(_leaf(name))


def is_linear_weight(name: str, param: Tensor, module: nn.Module) -> bool:
    """Whether ``param`` is the weight matrix or kernel of a linear map.

    True for the weights of ``nn.Linear`` and subclasses, convolutions of any dimension,
    ``nn.Bilinear``, recurrent layers and cells, ``nn.MultiheadAttention``'s projection
    matrices, any module holding a ``weight``/``kernel`` tensor of two or more dimensions
    (linear layers of other libraries, such as GPT-2's transposed 1-D convolution), and
    free-standing matrices whose role is a projection: stacked mixture-of-experts weights
    (three or more dimensions with a leading expert axis) and matrices named as
    projections, routers, gates, heads or layers (``fc``, ``dense``, ``qkv``, ``mat``, ``matrix``,
    ``lora_A``). A tensor in a ``ParameterDict`` or ``ParameterList`` is named by its container
    (peft's ``lora_A.default`` is ``lora_A``). Matrices with other names (``U``, ``A``, ``mix``) need a
    trace. A parametrized weight counts as the weight it parametrizes (``x.weight``, or the direction
    ``x.weight.original1`` of ``weight_norm``, whose magnitude ``original0`` is a scale; likewise ``weight_v``
    and ``weight_g`` of the deprecated ``torch.nn.utils.weight_norm``). A container named only
    ``weights`` is named by its parent too (``position_embeddings.weights.0`` is a position table). Biases,
    normalization and embedding parameters, tensors with fewer than two dimensions, and
    free-standing tokens, position tables and scales are never linear weights. When the plan
    traced a forward pass that used ``param``, the trace decides instead: true exactly when
    ``param`` (or a tensor computed from parameters alone, such as a weight-normalized or
    low-rank-merged matrix) was the weight operand of a linear map, unless structure knows it as a
    table (an embedding module's weight, a free-standing tensor named as an embedding or position table).

    Raises:
        TypeError: if ``name`` is not a string, ``param`` not a tensor or ``module`` not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> conv = torch.nn.Conv2d(3, 8, 3)
        >>> is_linear_weight("stem.weight", conv.weight, conv)
        True
        >>> class ViT(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.pos_embed = torch.nn.Parameter(torch.zeros(1, 16, 8))
        >>> vit = ViT()
        >>> is_linear_weight("pos_embed", vit.pos_embed, vit)
        False
    """
    _check_role_args(name, param, module)
    traced = _traced_role(name, param, module)
    if traced is not None:
        return traced == "linear"
    return _is_structural_linear_weight(name, param, module)


def _role_words(name: str, module: nn.Module) -> tuple[str, ...]:
    """The words of the name that says what a tensor is.

    In a ``ParameterDict`` or ``ParameterList`` a key or index says nothing of the role; the container's
    name does: peft keeps each adapter's tensor under the adapter's name (``q_proj.lora_A.default``,
    ``lokr_w1.default``). A container named only "a weight" (``weights``) is named by its parent module
    too: ``position_embeddings.weights.0`` is a table of positions.
    """
    if not (isinstance(module, (nn.ParameterDict, nn.ParameterList)) and "." in name):
        return _words(_leaf(name))
    container = name.rpartition(".")[0]
    words = _words(_leaf(container))
    if all(_GENERIC_WORDS.match(w) for w in words) and "." in container:
        words = _words(_leaf(container.rpartition(".")[0])) + words
    return words


def _is_structural_linear_weight(name: str, param: Tensor, module: nn.Module) -> bool:
    if param_ndim(param) < 2:
        return False
    if _is_bias(name) or _is_normalization(module) or _is_embedding(module):
        return False
    if _is_weight_norm_magnitude(name, module):
        return False
    words = _role_words(name, module)
    if _holds_layer_weight(module):
        # weight, weight_ih_l0, weight_hh_l0_reverse, weight_hr_l0, in_proj_weight, q_proj_weight, ...
        return "weight" in words
    if not words:
        return False
    shape = getattr(param, "ds_shape", None) or param.shape
    if sum(1 for n in shape if n != 1) <= 1:
        # A vector held in a broadcastable shape, such as the (1, 1, 1, C) gain of ConvNeXt-V2's
        # Global Response Normalization: an elementwise scale or offset, not the matrix of a map.
        return False
    # The head of a compound name is its last word: "prompts_visual_projection" is a projection,
    # "relative_position_bias_table" a table, "pos_embed_weight" an embedding. The last word with a
    # known role decides; a generic one ("weight", "w") only when no other word has one ("static_weight").
    for word in reversed(words):
        if _GENERIC_WORDS.match(word):
            continue
        if _NO_DECAY_WORDS.match(word):
            return False
        if _WEIGHT_WORDS.match(word):
            return True
    if any(_GENERIC_WORDS.match(word) for word in words):
        return True
    # A stack of matrices with a leading expert axis (fused mixture-of-experts weights).
    return param_ndim(param) >= 3 and shape[0] > 1


def role_of(name: str, param: Tensor, module: nn.Module) -> str:
    """The role of a parameter: ``"linear"`` (the weight of a linear map), ``"embedding"`` or ``"other"``.

    Taken from the trace the plan is being resolved with when its forward pass used ``param``, else
    from structure: ``"embedding"`` for the tables of embedding layers, ``"linear"`` where
    ``is_linear_weight`` holds, ``"other"`` for everything else (normalization parameters, biases,
    tokens, position tables, scales). ``DecayRule(roles=...)`` matches on it.

    Raises:
        TypeError: if ``name`` is not a string, ``param`` not a tensor or ``module`` not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> emb, lin = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)
        >>> role_of("wte.weight", emb.weight, emb), role_of("fc.weight", lin.weight, lin)
        ('embedding', 'linear')
        >>> role_of("fc.bias", lin.bias, lin)
        'other'
    """
    _check_role_args(name, param, module)
    traced = _traced_role(name, param, module)
    if traced is not None:
        return traced
    if _is_embedding(module):
        return "embedding"
    return "linear" if _is_structural_linear_weight(name, param, module) else "other"


def standard(weight_decay: float = 0.05, *, lr_scale: float = 1.0) -> list[DecayRule]:
    """Decay exactly the weight matrices and kernels of linear maps; nothing else.

    Returns named rules, evaluated in order, so that the plan explains each decision:
    ``embedding``, ``normalization`` and ``bias`` (no decay, group ``no_decay``), then
    ``linear`` (``weight_decay``, group ``decay``). Everything else (free tokens, position
    tables, layer-scale gammas, temperatures) is claimed by no rule and lands in the
    default ``no_decay`` group. Put your own rules before these to override them. With an example
    input (``example_inputs=`` or a LightningModule's ``example_input_array``), the same rules act on
    the roles the forward pass shows (see the module docstring), and on structure for the rest.

    Args:
        weight_decay: λ for the linear weights.
        lr_scale: learning-rate multiplier for the decayed group.

    Returns:
        The rule list.

    Raises:
        ValueError: if ``weight_decay`` is negative or not finite.

    Examples:
        >>> import lightning_wd as lwd
        >>> for rule in lwd.presets.standard(0.1):
        ...     print(rule.name, rule.weight_decay, rule.group_name)
        embedding 0.0 no_decay
        normalization 0.0 no_decay
        bias 0.0 no_decay
        linear 0.1 decay
    """
    return [
        DecayRule("embedding", 0.0, predicate=is_embedding, group="no_decay", optional=True),
        DecayRule("normalization", 0.0, predicate=is_normalization, group="no_decay", optional=True),
        DecayRule("bias", 0.0, predicate=is_bias, group="no_decay", optional=True),
        DecayRule("linear", weight_decay, predicate=is_linear_weight, group="decay", lr_scale=lr_scale, optional=True),
    ]


def gpt(weight_decay: float = 0.1) -> list[DecayRule]:
    """nanoGPT's heuristic: decay every parameter with two or more dimensions.

    Unlike ``standard`` this decays embeddings (including a tied output head),
    position tables and any other matrix.

    Args:
        weight_decay: λ for parameters with ``ndim >= 2``.

    Returns:
        The rule list: ``decay`` (``ndim >= 2``) then ``no_decay`` (the rest).

    Examples:
        >>> import lightning_wd as lwd
        >>> [(r.name, r.weight_decay) for r in lwd.presets.gpt(0.1)]
        [('decay', 0.1), ('no_decay', 0.0)]
    """
    return [
        DecayRule("decay", weight_decay, min_ndim=2, optional=True),
        DecayRule("no_decay", 0.0, max_ndim=1, optional=True),
    ]


def uniform(weight_decay: float) -> list[DecayRule]:
    """Decay every parameter alike (what an optimizer's own ``weight_decay`` does).

    Examples:
        >>> import lightning_wd as lwd
        >>> lwd.presets.uniform(0.01)[0].weight_decay
        0.01
    """
    return [DecayRule("all", weight_decay, optional=True)]


def none() -> list[DecayRule]:
    """Decay nothing (every parameter in one ``no_decay`` group).

    Examples:
        >>> import lightning_wd as lwd
        >>> lwd.presets.none()[0].name
        'no_decay'
    """
    return [DecayRule("no_decay", 0.0, optional=True)]


_PRESETS = {"standard": standard, "gpt": gpt, "uniform": uniform, "none": none}


class Preset(list):
    """A preset by name with its λ, and your own rules around it, as one value: one entry of a config file.

    It is the rule list itself (a ``list`` of ``DecayRule``), so it goes wherever rules go. Its use is
    LightningCLI, where a function such as ``presets.standard`` cannot be a config value but a class can:

    ```yaml
    model:
      decay_rules:
        class_path: lightning_wd.presets.Preset
        init_args:
          name: standard
          weight_decay: 0.05
          before:                 # your rules, ahead of the preset's
            - class_path: lightning_wd.DecayRule
              init_args: {name: head, weight_decay: 0.01, params: [head.weight]}
    ```

    with ``decay_rules: lwd.presets.Preset | list[lwd.DecayRule] | None = None`` in the module's
    ``__init__`` (a plain list of rules then works too).

    Args:
        name: The preset: ``"standard"``, ``"gpt"``, ``"uniform"`` or ``"none"``.
        weight_decay: Its λ; None keeps the preset's default (``uniform`` needs one; ``none`` takes none).
        lr_scale: For ``"standard"``, the learning-rate multiplier of the decayed group.
        before: Rules placed ahead of the preset's (they win where both match).
        after: Rules placed after the preset's (they claim what it leaves out).

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: on an unknown ``name``, a ``weight_decay`` for ``"none"`` or none for ``"uniform"``, an
            ``lr_scale`` for another preset than ``"standard"``, or rules that are not ``DecayRule``.

    Examples:
        >>> import lightning_wd as lwd
        >>> rules = lwd.presets.Preset("standard", 0.1, before=[lwd.DecayRule("head", 0.01, params="head.weight")])
        >>> [(r.name, r.weight_decay) for r in rules]
        [('head', 0.01), ('embedding', 0.0), ('normalization', 0.0), ('bias', 0.0), ('linear', 0.1)]
    """

    def __init__(
        self,
        name: str = "standard",
        weight_decay: float | None = None,
        *,
        lr_scale: float = 1.0,
        before: list[DecayRule] | None = None,
        after: list[DecayRule] | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"`name` must be a string, got {type(name).__name__} {name!r}. Use for example 'standard'.")
        factory = _PRESETS.get(name)
        if factory is None:
            raise ValueError(
                f"`name` must be one of {sorted(_PRESETS)}, got {name!r}. Use one of them, for example 'standard'."
            )
        if name == "none" and weight_decay is not None:
            raise ValueError(
                f"Preset 'none' decays nothing, so it takes no `weight_decay` (got {weight_decay!r}). Remove it, or"
                " use name='uniform' to decay every parameter alike."
            )
        if name == "uniform" and weight_decay is None:
            raise ValueError("Preset 'uniform' needs its λ: pass `weight_decay`, for example 0.01.")
        if lr_scale != 1.0 and name != "standard":
            raise ValueError(
                f"`lr_scale` applies to preset 'standard' (its decayed group), got lr_scale={lr_scale!r} with {name!r}."
                " Add a DecayRule with lr_scale to `before` instead."
            )
        kwargs: dict[str, float] = {} if weight_decay is None else {"weight_decay": weight_decay}
        if name == "standard":
            kwargs["lr_scale"] = lr_scale
        rules: list[DecayRule] = factory(**kwargs)  # type: ignore[operator]
        for argument, extra in (("before", before), ("after", after)):
            if extra is not None and (
                not isinstance(extra, (list, tuple)) or not all(isinstance(r, DecayRule) for r in extra)
            ):
                raise ValueError(
                    f"`{argument}` must be a list of lwd.DecayRule, got {type(extra).__name__} {extra!r}."
                    " Build each with lwd.DecayRule(name, weight_decay, ...)."
                )
        super().__init__([*(before or []), *rules, *(after or [])])
        self.name = name
        self.weight_decay = weight_decay

    def __reduce__(self) -> tuple[type, tuple[list[DecayRule]]]:
        """Pickle as the plain rule list (hyper-parameters load under ``torch.load(weights_only=True)``)."""
        return (list, (list(self),))

    def __repr__(self) -> str:
        return f"Preset({self.name!r}, {self.weight_decay!r}, rules={[r.name for r in self]})"
