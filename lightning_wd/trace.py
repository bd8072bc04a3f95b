"""Parameter roles observed in one forward pass (pure torch).

A parameter's role is a fact about the computation: the weight operand of a linear map, a table
looked up by data, or anything else (added, multiplied, normalized, concatenated as a token, a
gate or a scale). ``trace_roles`` runs the module's forward once, without grad, under a
``torch.overrides.TorchFunctionMode`` that sees every torch function, and records for each
parameter how it meets the data:

* ``"linear"``: the weight of ``linear``, ``conv*``, ``conv_transpose*``, ``bilinear``; an operand
  of ``matmul``/``mm``/``bmm``/``addmm``/``baddbmm``/grouped matmuls, or of ``einsum`` with an index
  contracted against data; a weight of the fused recurrent and attention kernels.
* ``"embedding"``: the table of ``embedding``/``embedding_bag``, or a tensor indexed by data
  (``table[ids]``, ``index_select``, ``gather``). A weight tied between an embedding and an output
  head is an embedding.
* ``"other"``: any other use against data.

Parameter math is followed back to the parameters: views, reshapes, transposes, chunks,
casts, parametrizations, weight norm (whose magnitude is a scale, ``"other"``) and low-rank merges
(``A @ B`` used as a weight makes both linear). A tensor that does not depend on the forward's inputs
(a buffer, a tensor attribute of a submodule, or a tensor computed from those alone) takes part in
parameter math as a constant would: ``F.linear(x, w * mask)`` with a registered ``mask`` makes ``w`` a
linear weight (pruning's ``weight_orig * weight_mask``, NoisyNet's ``mu + sigma * epsilon``, the
fake quantization of quantization-aware training). Lookups are the exception: a table indexed by a
buffer (``position_ids``, a relative-position index) is still looked up. A stack of matrices indexed by
data (the experts of a mixture of experts) takes the role of the rows it gives.

The pass runs on the ``meta`` device where it can (the parameters and inputs are replaced by
shape-only tensors, so a large model costs no memory) and on the module's own device when an op
has no meta kernel or the forward needs real values. The model is not modified: parameters are
swapped only for the duration of the call (``torch.func.functional_call``), buffers are replaced
by copies, training mode and hooks are left as they are, and the random number generators are
restored, and attributes a forward sets on a submodule (a cache) are put back as they were.

Examples:
    >>> import torch
    >>> from lightning_wd.trace import trace_roles
    >>> class Mixer(torch.nn.Module):  # a free matrix whose name says nothing of its role
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.U = torch.nn.Parameter(torch.randn(4, 4))
    ...     def forward(self, x):
    ...         return x @ self.U
    >>> mixer = Mixer()
    >>> traced = trace_roles(mixer, torch.zeros(1, 4)).get(mixer.U)
    >>> traced.role, traced.evidence
    ('linear', 'weight of `matmul` in 1 call')
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from lightning_wd._compat import DTENSOR_TYPES, fsdp1_flattened

__all__ = ["ROLES", "ParamUse", "RoleTrace", "TraceError", "TracedRole", "is_sharded", "trace_roles"]

Role = Literal["linear", "embedding", "other"]
#: The roles a trace assigns, in the order that decides between several uses of one parameter.
ROLES: tuple[Role, ...] = ("embedding", "linear", "other")
Device = Literal["auto", "meta", "module"]
_DEVICES = ("auto", "meta", "module")

#: Layer ops: the position and keyword of their weight operand (every other operand is "other").
_LAYER_OPS: dict[str, tuple[int, str]] = {
    **{name: (1, "weight") for name in ("linear", "convolution", "_convolution", "conv_tbc")},
    **{f"conv{d}d": (1, "weight") for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": (1, "weight") for d in (1, 2, 3)},
    "bilinear": (2, "weight"),
}
#: Matrix products: every operand is the matrix of a linear map, except the additive one of ``add*``.
_MATMUL_OPS = frozenset(
    {"matmul", "mm", "bmm", "mv", "tensordot", "chain_matmul", "multi_dot", "grouped_mm", "_grouped_mm"}
    | {"_scaled_grouped_mm", "addmm", "addbmm", "baddbmm", "addmv"}
)
_ADDITIVE_OPS = frozenset({"addmm", "addbmm", "baddbmm", "addmv"})
_EMBEDDING_OPS = frozenset({"embedding", "embedding_bag"})
#: Lookups of ``self`` by an index tensor.
_INDEX_OPS = frozenset({"getitem", "index_select", "take", "gather", "take_along_dim"})
#: Ops whose other operands select from a parameter: an index there is data, even a buffer of indices.
_LOOKUP_OPS = _EMBEDDING_OPS | _INDEX_OPS | {"index_add", "index_copy", "index_fill", "scatter", "scatter_add"}
#: Fused recurrent and attention kernels: operands of two or more dimensions are weights.
_FUSED_OPS = frozenset(
    {"lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"}
    | {"_native_multi_head_attention", "_transformer_encoder_layer_fwd", "_thnn_fused_lstm_cell"}
    | {"_thnn_fused_gru_cell"}
)
#: Ops whose tensor operands other than ``self`` give only a dtype, device or shape.
_LIKE_OPS = frozenset({"type_as", "expand_as", "view_as", "reshape_as", "to", "broadcast_to"})
#: Ops whose result holds none of the values of their operands.
_FRESH_OPS = frozenset(
    {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
    | {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
)
#: Elementwise ops in which a broadcast operand of parameter-only math is a scale (weight norm's magnitude).
_ELEMENTWISE_OPS = frozenset(
    {"mul", "div", "truediv", "add", "sub", "multiply", "divide", "true_divide", "_weight_norm"}
)
#: Shown names of ops whose Python name says little.
_SHOWN = {
    "getitem": "indexing",
    "multi_head_attention_forward": "multi_head_attention",
    "truediv": "div",
    "true_divide": "div",
    "multiply": "mul",
    "divide": "div",
}

_ACTIVE: contextvars.ContextVar[RoleTrace | None] = contextvars.ContextVar("lightning_wd_trace", default=None)


class TraceError(ValueError):
    """The forward pass of a trace failed on every device tried.

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import TraceError, trace_roles
        >>> try:
        ...     trace_roles(torch.nn.Linear(4, 4), torch.zeros(1, 3))  # an input of the wrong width
        ... except TraceError as err:
        ...     print(isinstance(err, ValueError), str(err)[:46])
        True The forward pass of Linear on `example_inputs`
    """


@dataclass(frozen=True)
class ParamUse:
    """One kind of use of a parameter in the traced forward pass.

    Attributes:
        role: The role this use gives (``"linear"``, ``"embedding"`` or ``"other"``).
        op: The torch function, by its short name (``linear``, ``matmul``, ``embedding``, ``add``...).
        calls: In how many calls of ``op`` the parameter (or a tensor computed from it alone) took part.

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import trace_roles
        >>> model = torch.nn.Linear(4, 4)
        >>> trace_roles(model, torch.zeros(1, 4)).get(model.weight).uses
        (ParamUse(role='linear', op='linear', calls=1),)
    """

    role: Role
    op: str
    calls: int

    def describe(self) -> str:
        """This use in words, such as ``weight of `linear` in 2 calls``.

        Examples:
            >>> from lightning_wd.trace import ParamUse
            >>> ParamUse(role="linear", op="matmul", calls=2).describe()
            'weight of `matmul` in 2 calls'
        """
        what = {"linear": "weight of", "embedding": "looked up by", "other": "operand of"}[self.role]
        if self.role == "embedding" and self.op == "indexing":
            what, op = "indexed by data", ""
        else:
            op = f" `{self.op}`"
        return f"{what}{op} in {self.calls} call{'s' if self.calls != 1 else ''}"


@dataclass(frozen=True)
class TracedRole:
    """The role of one parameter in the traced forward pass, with the uses that show it.

    Attributes:
        role: ``"embedding"`` if any use looks it up, else ``"linear"`` if any use is the weight of a
            linear map, else ``"other"``.
        uses: Every kind of use, those that decided the role first.

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import trace_roles
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> traced = trace_roles(model, torch.tensor([[1, 2]])).get(model[0].weight)
        >>> traced.role, traced.evidence
        ('embedding', 'looked up by `embedding` in 1 call')
    """

    role: Role
    uses: tuple[ParamUse, ...]

    @property
    def evidence(self) -> str:
        """The uses in words: ``weight of `linear` in 2 calls``, then any other use after ``also``."""
        deciding = [u.describe() for u in self.uses if u.role == self.role]
        others = [u.describe() for u in self.uses if u.role != self.role]
        return ", ".join(deciding) + (f"; also {', '.join(others)}" if others else "")


class RoleTrace:
    """The roles of a module's parameters, observed in one forward pass (build it with ``trace_roles``).

    Parameters are identified by identity, so the trace of a module applies to the same module
    however it is wrapped. A parameter the forward pass did not use has no traced role: rules
    decide it from structure.

    Attributes:
        device: Where the pass ran: ``"meta"``, or the module's device (``"cpu"``, ``"cuda:0"``).
        fallback: Why the pass did not run on the meta device (the error it raised there), or None.

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import trace_roles
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> trace_roles(model, torch.tensor([[1, 2]]))
        RoleTrace(embedding=1, linear=1, other=1, untraced=0, device='meta')
    """

    def __init__(
        self, roles: Mapping[int, TracedRole], params: tuple[nn.Parameter, ...], device: str, fallback: str | None
    ) -> None:
        self._roles = dict(roles)
        self._params = params  # held, so that the ids stay theirs
        self.device = device
        self.fallback = fallback

    def get(self, param: Tensor) -> TracedRole | None:
        """The traced role of ``param``, or None when the forward pass did not use it.

        Examples:
            >>> import torch
            >>> from lightning_wd.trace import trace_roles
            >>> model = torch.nn.Linear(4, 4)
            >>> trace = trace_roles(model, torch.zeros(1, 4))
            >>> trace.get(model.weight).role, trace.get(torch.nn.Parameter(torch.zeros(1)))
            ('linear', None)
        """
        return self._roles.get(id(param))

    def __contains__(self, param: object) -> bool:
        return id(param) in self._roles

    def __len__(self) -> int:
        return len(self._roles)

    @property
    def untraced(self) -> tuple[nn.Parameter, ...]:
        """The module's parameters that the forward pass did not use, in registration order."""
        return tuple(p for p in self._params if id(p) not in self._roles)

    def __repr__(self) -> str:
        counts = Counter(r.role for r in self._roles.values())
        shown = ", ".join(f"{role}={counts[role]}" for role in ROLES if counts[role])
        return f"RoleTrace({shown}, untraced={len(self.untraced)}, device={self.device!r})"


def active_trace() -> RoleTrace | None:
    """The trace that rules are being resolved with, if any (set by the plan while it matches rules).

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import active_trace, trace_roles, use_trace
        >>> trace = trace_roles(torch.nn.Linear(4, 4), torch.zeros(1, 4))
        >>> with use_trace(trace):
        ...     active_trace() is trace
        True
        >>> active_trace() is None
        True
    """
    return _ACTIVE.get()


#: While a plan resolves its rules: the ids of the tensors whose traced role a predicate set aside for
#: what structure says (``note_structure_decides``), so that the plan reports them as decided by structure.
_SET_ASIDE: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("lightning_wd_set_aside", default=None)


def note_structure_decides(param: Tensor) -> None:
    """Record that a role predicate set aside the trace's role of ``param`` for what structure says (a table
    read as a matrix stays a table), so that the plan being resolved says so. Outside a plan, nothing.

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import note_structure_decides, recording_set_aside
        >>> table = torch.zeros(4, 4)
        >>> with recording_set_aside() as set_aside:
        ...     note_structure_decides(table)
        >>> id(table) in set_aside
        True
    """
    set_aside = _SET_ASIDE.get()
    if set_aside is not None:
        set_aside.add(id(param))


@contextlib.contextmanager
def recording_set_aside() -> Iterator[set[int]]:
    """Collect, for a block, the ids of the tensors ``note_structure_decides`` is told of (the plan does).

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import note_structure_decides, recording_set_aside
        >>> with recording_set_aside() as set_aside:
        ...     pass
        >>> set_aside
        set()
    """
    set_aside: set[int] = set()
    token = _SET_ASIDE.set(set_aside)
    try:
        yield set_aside
    finally:
        _SET_ASIDE.reset(token)


@contextlib.contextmanager
def use_trace(trace: RoleTrace | None) -> Iterator[None]:
    """Make ``trace`` the one the role predicates and ``DecayRule(roles=...)`` consult, for a block.

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> from lightning_wd.trace import trace_roles, use_trace
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> trace = trace_roles(model, torch.tensor([[1, 2]]))
        >>> with use_trace(trace):
        ...     lwd.presets.is_embedding("0.weight", model[0].weight, model[0])
        True
    """
    token = _ACTIVE.set(trace)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ------------------------------------------------------------------------------ the tracer
def _op_name(func: Callable[..., Any]) -> str:
    """The short name of a torch function: ``__rmatmul__`` -> ``matmul``, ``__iadd__`` -> ``add``."""
    name = getattr(func, "__name__", "") or ""
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name not in ("getitem", "matmul") and name[:1] in ("r", "i") and name[1:] in _DUNDER_TAILS:
            name = name[1:]
        if name == "rmatmul":
            name = "matmul"
    return name.rstrip("_") if not name.startswith("_") else name


_DUNDER_TAILS = frozenset({"add", "sub", "mul", "truediv", "floordiv", "matmul", "pow", "mod", "and", "or", "xor"})


def _tensors(value: Any, slot: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Tensor]]:
    """Tensors in an argument (one level of lists and tuples, as torch's signatures allow), with their slot."""
    if isinstance(value, Tensor):
        yield slot, value
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            if isinstance(item, Tensor):
                yield (*slot, j), item
            elif isinstance(item, (list, tuple)):  # an index tuple such as x[ids, :]
                for k, inner in enumerate(item):
                    if isinstance(inner, Tensor):
                        yield (*slot, j, k), inner


def _einsum_linear(args: tuple[Any, ...], derived: list[bool]) -> list[bool]:
    """Which einsum operands have an index summed against a data operand (the weight of a map)."""
    equation = args[0] if args and isinstance(args[0], str) else None
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if equation is None or len(operands) != len(derived):
        return [True] * len(derived)
    equation = equation.replace(" ", "").replace("...", ".")
    inputs, arrow, output = equation.partition("->")
    subs = inputs.split(",")
    if not arrow:
        letters = Counter(c for s in subs for c in s)
        output = "".join(sorted(c for c, n in letters.items() if n == 1))
    if len(subs) != len(derived):
        return [True] * len(derived)
    data_letters = {c for s, d in zip(subs, derived, strict=True) if not d for c in s}
    return [set(s) - set(output) - {"."} & data_letters != set() for s in subs]


class _Tracer(TorchFunctionMode):
    """Follows tensors computed from parameters alone and counts each parameter's uses against data."""

    def __init__(self, n_params: int) -> None:
        super().__init__()
        # tensor -> (indices of the parameters it is computed from, whether it is a stack indexed by data)
        self.derived: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        # tensors that do not depend on the forward's inputs: buffers, tensor attributes, and what is
        # computed from those alone (tensor -> True)
        self.static: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.uses: list[Counter[tuple[Role, str]]] = [Counter() for _ in range(n_params)]

    def seed(self, index: int, tensor: Tensor) -> None:
        self.derived[tensor] = (frozenset((index,)), False)

    def seed_static(self, tensor: Tensor) -> None:
        self.static[tensor] = True

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        operands = [(slot, t) for i, a in enumerate(args) for slot, t in _tensors(a, ("pos", i))]
        operands += [(slot, t) for k, v in kwargs.items() for slot, t in _tensors(v, ("kw", k))]
        infos = [self.derived.get(t) for _, t in operands]
        if any(info is not None for info in infos):
            self._record(func, args, kwargs, operands, infos, out)
        else:
            self._follow_static(func, operands, out)
        return out

    def _follow_static(self, func: Callable[..., Any], operands: list[tuple[Any, Tensor]], out: Any) -> None:
        """A result computed from tensors that do not depend on the inputs does not either; an op that
        writes data into such a tensor in place (a cache) makes it data."""
        if _op_name(func) in _LIKE_OPS:
            operands = [(slot, t) for slot, t in operands if slot == ("pos", 0)]
        static = bool(operands) and all(t in self.static for _, t in operands)
        for _, tensor in _tensors(out, ()):
            if static:
                self.static[tensor] = True
            else:
                self.static.pop(tensor, None)

    def _record(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        operands: list[tuple[tuple[Any, ...], Tensor]],
        infos: list[Any],
        out: Any,
    ) -> None:
        name = _op_name(func)
        if name in _FRESH_OPS:
            return
        if name in _LIKE_OPS:  # a cast or view of `self`; the other tensors give a dtype, device or shape
            if infos[0] is not None and operands[0][0] == ("pos", 0):
                self._propagate(out, infos[0][0], infos[0][1])
            return
        calls: set[tuple[int, Role, str]] = set()
        shown = _SHOWN.get(name, name)

        def use(info: Any, role: Role) -> None:
            # Rows of a stack selected by data and used as data: the lookup is what shows the role.
            op = "indexing" if role == "embedding" and info[1] else shown
            for index in info[0]:
                calls.add((index, role, op))

        if name in _LAYER_OPS:
            position, keyword = _LAYER_OPS[name]
            for (slot, _), info in zip(operands, infos, strict=True):
                if info is not None:
                    weight = slot[:2] in (("pos", position), ("kw", keyword))
                    use(info, "linear" if weight else "embedding" if info[1] else "other")
        elif all(info is not None or self._constant(name, t) for (_, t), info in zip(operands, infos, strict=True)):
            # A 0-dim tensor that no parameter gives is a constant, as a Python number would be: peft's
            # LoHa scales the merged weight by torch.tensor(1) before it becomes the weight of a layer.
            # So is a tensor that does not depend on the inputs: a pruning mask, a noise buffer, the
            # scale and zero point of a fake quantization.
            size = max((t.numel() for _, t in operands), default=0)
            kept = [(o, info) for o, info in zip(operands, infos, strict=True) if info is not None]
            self._parameter_math(name, [o for o, _ in kept], [info for _, info in kept], out, use, size)
        elif name in _EMBEDDING_OPS:
            # torch.nn.functional.embedding(input, weight), but torch.embedding(weight, input)
            table = ("pos", 1) if func in (F.embedding, F.embedding_bag) else ("pos", 0)
            for (slot, _), info in zip(operands, infos, strict=True):
                if info is not None:
                    use(info, "embedding" if slot[:2] in (table, ("kw", "weight")) else "other")
        elif name in _INDEX_OPS and infos[0] is not None and operands[0][0] == ("pos", 0):
            if operands[0][1].dim() >= 3:  # a stack of matrices: the rows it gives decide
                self._propagate(out, infos[0][0], True)
            else:
                use(infos[0], "embedding")
        elif name in _MATMUL_OPS or name == "einsum":
            derived = [info is not None for info in infos]
            linear = _einsum_linear(args, derived) if name == "einsum" else [True] * len(infos)
            for (slot, _), info, is_map in zip(operands, infos, linear, strict=True):
                if info is not None:
                    additive = name in _ADDITIVE_OPS and slot[:2] in (("pos", 0), ("kw", "input"))
                    use(info, "linear" if is_map and not additive else "other")
        elif name in _FUSED_OPS or name == "multi_head_attention_forward":
            weights = _weight_slots(func, args, kwargs) if name == "multi_head_attention_forward" else None
            for (slot, tensor), info in zip(operands, infos, strict=True):
                if info is not None:
                    is_weight = tensor.dim() >= 2 if weights is None else slot[:2] in weights
                    use(info, "linear" if is_weight else "other")
        else:
            for info in infos:
                if info is not None:
                    use(info, "embedding" if info[1] else "other")
        for index, role, op in calls:
            self.uses[index][(role, op)] += 1

    def _parameter_math(
        self,
        name: str,
        operands: list[tuple[tuple[Any, ...], Tensor]],
        infos: list[Any],
        out: Any,
        use: Callable[[Any, Role], None],
        size: int,
    ) -> None:
        """Every tensor operand comes from parameters or is a constant: the result comes from the parameters
        (a broadcast factor, smaller than the largest of the op's ``size`` elements, is a scale)."""
        sources: set[int] = set()
        stacked = False
        for i, ((_, tensor), info) in enumerate(zip(operands, infos, strict=True)):
            others = frozenset().union(*(other[0] for j, other in enumerate(infos) if j != i))
            # a factor computed from the same parameters is a normalization (spectral norm's W / sigma(W))
            if name in _ELEMENTWISE_OPS and tensor.numel() < size and not info[0] <= others:
                use(info, "other")
                continue
            sources |= info[0]
            stacked = stacked or info[1]
        self._propagate(out, frozenset(sources), stacked)

    def _propagate(self, out: Any, sources: frozenset[int], stacked: bool) -> None:
        if not sources:
            return
        for _, tensor in _tensors(out, ()):
            self.derived[tensor] = (sources, stacked)

    def _constant(self, name: str, tensor: Tensor) -> bool:
        """Whether ``tensor``, which no parameter gives, is a constant of ``name`` rather than data: a 0-dim
        factor of an elementwise op, or (in any op but a lookup) a tensor that does not depend on the inputs."""
        if name in _ELEMENTWISE_OPS and tensor.dim() == 0:
            return True
        return name not in _LOOKUP_OPS and tensor in self.static


@functools.lru_cache(maxsize=8)
def _signature(func: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def _weight_slots(func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> set[tuple[Any, ...]]:
    """The slots of the arguments named ``*weight*`` (``in_proj_weight``, ``q_proj_weight``...)."""
    sig = _signature(func)
    if sig is None:
        return set()
    names = list(sig.parameters)
    slots = {("pos", i) for i, n in enumerate(names[: len(args)]) if "weight" in n}
    return slots | {("kw", k) for k in kwargs if "weight" in k}


# ------------------------------------------------------------------------------ sharded modules
def _sharding(module: nn.Module) -> str | None:
    """What shards ``module``, in words (FSDP1 or FSDP2 / DTensor), or None when nothing does."""
    if "torch.distributed" not in sys.modules:  # no sharding without torch.distributed imported
        return None
    if "torch.distributed.fsdp" in sys.modules:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp2: tuple[type, ...] = tuple(
            c for c in [getattr(sys.modules["torch.distributed.fsdp"], "FSDPModule", None)] if c
        )
        for name, mod in module.named_modules():
            if isinstance(mod, FullyShardedDataParallel):
                return f"FSDP1: a FullyShardedDataParallel unit at {name or '<root>'!r}"
            if fsdp2 and isinstance(mod, fsdp2):
                return f"FSDP2: `fully_shard` applied to {name or '<root>'!r}"
    for name, param in module.named_parameters(remove_duplicate=False):
        if fsdp1_flattened(param):
            return f"FSDP1: parameter {name!r} is, or is a view of, a flat parameter"
        if DTENSOR_TYPES and isinstance(param, DTENSOR_TYPES):
            return f"DTensor parameters: {name!r} is a DTensor"
    return None


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is sharded (FSDP1 units or flat parameters, FSDP2 ``fully_shard`` or DTensor
    parameters), which ``trace_roles`` cannot trace: decide the roles from structure instead.

    Examples:
        >>> import torch
        >>> from lightning_wd.trace import is_sharded
        >>> is_sharded(torch.nn.Linear(4, 4))
        False
    """
    return _sharding(module) is not None


def _refuse_sharded(module: nn.Module) -> None:
    """Raise TraceError when ``module`` is sharded: its forward runs the wrapper's gathers, not the model's math."""
    what = _sharding(module)
    if what is None:
        return
    fix = (
        "trace the model before wrapping it (FSDP1 keeps the same parameters: pass"
        " `trace=lightning_wd.trace.trace_roles(model, inputs)` made then), or "
        if what.startswith("FSDP1")
        else ""
    )
    raise TraceError(
        f"`example_inputs` were given for a sharded module ({type(module).__name__}; {what}): tracing"
        " a sharded module is not supported, its forward runs the sharding's gathers and its parameters hold"
        f" shards. To fix it, {fix}leave `example_inputs` out to decide every role from structure (in a"
        " LightningModule using WDMixin, set `trace_roles = False`)."
    )


# ------------------------------------------------------------------------------ running the pass
def _unwrap(module: nn.Module) -> nn.Module:
    """The module to call: compiled and data-parallel wrappers hold the same parameters."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        wrapped = getattr(module, "module", None)
        if type(module).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(wrapped, nn.Module):
            module = wrapped
            continue
        return module


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _call_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Lightning's ``example_input_array`` convention: a tuple or list is positional, a dict keywords."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return (inputs,), {}


def _run(
    module: nn.Module, params: list[tuple[str, nn.Parameter]], inputs: Any, on_meta: bool
) -> list[Counter[tuple[Role, str]]]:
    """One forward pass under the tracer; the parameters and buffers are replaced for its duration only."""
    tracer = _Tracer(len(params))
    buffers = dict(module.named_buffers())
    if on_meta:
        values: dict[str, Tensor] = {
            n: nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for n, p in params
        }
        values.update({n: torch.empty_like(b, device="meta") for n, b in buffers.items()})
        inputs = _map_tensors(inputs, lambda t: torch.empty_like(t, device="meta"))
        seeds = [values[n] for n, _ in params]
    else:
        values = {n: b.clone() for n, b in buffers.items()}  # a forward in training mode updates running stats
        devices = {p.device for _, p in params}
        if len(devices) == 1:
            (device,) = devices
            inputs = _map_tensors(inputs, lambda t: t.to(device))
        seeds = [p for _, p in params]
    for i, tensor in enumerate(seeds):
        tracer.seed(i, tensor)
    for tensor in [*(values[n] for n in buffers), *_tensor_attributes(module)]:
        tracer.seed_static(tensor)
    args, kwargs = _call_args(inputs)
    cuda = sorted({p.device.index or 0 for _, p in params if p.device.type == "cuda"})
    with _attributes_kept(module), torch.random.fork_rng(devices=cuda), torch.no_grad(), tracer:
        torch.func.functional_call(module, values, args, kwargs, tie_weights=True, strict=False)
    return tracer.uses


_ABSENT = object()


def _tensor_attributes(module: nn.Module) -> Iterator[Tensor]:
    """Tensors that submodules hold as plain attributes (a mask or a table not registered as a buffer)."""
    for mod in module.modules():
        for value in vars(mod).values():
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                yield value


@contextlib.contextmanager
def _attributes_kept(module: nn.Module) -> Iterator[None]:
    """Put back every submodule's plain attributes after the pass: a forward that caches a tensor in one
    (a position table built on first use) would otherwise keep the meta tensor of the trace. Parameters
    and buffers are put back too: ``functional_call`` leaves the trace's tensors in a submodule that is
    registered under two names (``nn.Sequential(lin, act, lin)``, peft's shared VB-LoRA vector bank)."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        yield
    finally:
        for mod, attrs, params, buffers in saved:
            current = mod.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _ABSENT) is not value:
                    current[key] = value
            for key, param in params.items():
                if mod._parameters.get(key, _ABSENT) is not param:
                    mod._parameters[key] = param
            for key, buffer in buffers.items():
                if mod._buffers.get(key, _ABSENT) is not buffer:
                    mod._buffers[key] = buffer


def _decide(uses: Counter[tuple[Role, str]]) -> TracedRole:
    role = next(r for r in ROLES if any(k[0] == r for k in uses))
    ordered = sorted(uses.items(), key=lambda item: (item[0][0] != role, ROLES.index(item[0][0]), -item[1]))
    return TracedRole(role, tuple(ParamUse(r, op, n) for (r, op), n in ordered))


def trace_roles(module: nn.Module, example_inputs: Any, *, device: Device = "auto") -> RoleTrace:
    """Run one forward pass of ``module`` on ``example_inputs`` and record each parameter's role.

    Args:
        module: The model. Compiled and data-parallel wrappers are looked through; a sharded model
            (FSDP1, FSDP2) is refused.
        example_inputs: What the forward takes, as Lightning's ``example_input_array``: a tuple or
            list is passed as positional arguments, a dict as keyword arguments, anything else as the
            one argument. Only shapes and dtypes matter on the meta device.
        device: ``"auto"``: the meta device, and the module's own device if the pass fails there;
            ``"meta"`` or ``"module"``: that device only.

    Returns:
        The roles, by parameter identity.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
        ValueError: if ``example_inputs`` is None or ``device`` is not one of the choices.
        TraceError: (a ValueError) if the forward pass raises on every device tried; the message
            gives each error. Also, before any forward pass, if ``module`` is sharded (FSDP1 units or
            flat parameters, FSDP2 ``fully_shard`` or DTensor parameters; see ``is_sharded``).

    Examples:
        >>> import torch, lightning_wd as lwd
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.U = torch.nn.Parameter(torch.randn(4, 8))
        ...         self.gain = torch.nn.Parameter(torch.ones(8))
        ...     def forward(self, x):
        ...         return (x @ self.U) * self.gain
        >>> net = Net()
        >>> trace = lwd.trace.trace_roles(net, torch.randn(2, 4))
        >>> trace.get(net.U).role, trace.get(net.U).evidence
        ('linear', 'weight of `matmul` in 1 call')
        >>> trace.get(net.gain).evidence
        'operand of `mul` in 1 call'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"`module` must be a torch.nn.Module, got {type(module).__name__}. Pass the model whose forward to trace."
        )
    if example_inputs is None:
        raise ValueError(
            "`example_inputs` is None: pass what the model's forward takes (a tensor, a tuple of positional"
            " arguments or a dict of keyword arguments), for example torch.zeros(2, 16, dtype=torch.long)."
        )
    if device not in _DEVICES:
        raise ValueError(f"`device` must be one of {', '.join(map(repr, _DEVICES))}, got {device!r}.")
    _refuse_sharded(module)
    target = _unwrap(module)
    params = list(target.named_parameters())
    tries = [True, False] if device == "auto" else [device == "meta"]
    errors: list[str] = []
    for on_meta in tries:
        try:
            uses = _run(target, params, example_inputs, on_meta)
        except Exception as err:  # the forward is user code: any error means "not on this device"
            errors.append(f"on {'the meta device' if on_meta else 'its own device'}: {type(err).__name__}: {err}")
            continue
        roles = {id(p): _decide(u) for (_, p), u in zip(params, uses, strict=True) if u}
        where = "meta" if on_meta else str(params[0][1].device) if params else "cpu"
        return RoleTrace(roles, tuple(p for _, p in params), where, errors[0] if errors else None)
    raise TraceError(
        f"The forward pass of {type(target).__name__} on `example_inputs` raised {'; and '.join(errors)}. Pass"
        " inputs the forward accepts (a tuple for several positional arguments, a dict for keywords), or drop"
        " them to decide every role from structure."
    )
