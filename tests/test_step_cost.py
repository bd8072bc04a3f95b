"""What a decay step costs, counted instead of timed: memory passes and kernel calls per mode, Python work per step.

Timings depend on the machine (they are in BENCHMARKS.md); these counts do not:

* the elements each mode reads and writes, in units of the decayed parameters' size, counted over
  every aten call of a real ``optimizer.step()`` with a ``TorchDispatchMode`` (one read-write pass
  is 2.0); the expected figures are worked out by hand from the kernels' formulas below;
* the number of aten calls and of Python events (calls, lines) of a steady-state step, which must
  be the same for 16 and for 256 parameter tensors: no Python code runs per tensor.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_wd as lwd
from lightning_wd import _native
from lightning_wd import functional as F
from lightning_wd.plan import PLANNED_KEY

LR, WD = 1e-2, 0.1


class _NoStep(torch.optim.SGD):
    """An optimizer whose own update does nothing, so that a step counts only the engine's work."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return None


def _params(count: int, numel: int, *, contiguous: bool = False) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(numel, generator=gen)
    if contiguous:
        F.make_contiguous_(params)
    return params


def _engine(params: list[torch.nn.Parameter], **kwargs: Any) -> tuple[torch.optim.Optimizer, lwd.WeightDecay]:
    group = {"params": params, "weight_decay": WD, PLANNED_KEY: True, "name": "decay"}
    optimizer = _NoStep([group], lr=LR)
    return optimizer, lwd.WeightDecay(optimizer, **kwargs)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class Traffic(TorchDispatchMode):
    """Elements read and written by every aten call, in the parameters and in buffers at least ``large`` big.

    An argument is read unless it is an ``out=`` argument (or the destination of ``copy_``, whose old
    values are not used), and written when the schema marks it as
    mutated; a new tensor returned by the call is written, unless the call only allocates it (``empty``);
    views move nothing. Views of a large buffer (blocks of a parameter or of a copy, even one allocated
    before) count with it; small temporaries (0-dim factors, per-tensor norms, cache-sized scratch
    blocks) do not count, as they never leave the cache. Copies made by ``ctypes.memmove`` (outside
    aten) are counted by :func:`_passes`, the same as by ``copy_``: a read and a write.
    """

    def __init__(self, params: list[Tensor], large: int) -> None:
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.large = large
        self.elements = 0
        self.calls: Counter[str] = Counter()

    def _counted(self, t: Tensor) -> bool:
        storage = t.untyped_storage()
        return (
            storage.data_ptr() in self.storages
            or t.numel() >= self.large
            or storage.nbytes() >= self.large * t.element_size()
        )

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls[func.overloadpacket.__name__] += 1
        if func.overloadpacket.__name__ in _ALLOCATIONS:
            return out  # reads and writes nothing
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out  # a view (detach, view, split): no element is moved
        seen: set[int] = set()
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written = arg.alias_info is not None and arg.alias_info.is_write
            is_out = getattr(arg, "is_out", arg.name == "out") or (i == 0 and func.overloadpacket.__name__ == "copy_")
            for t in _tensors(value):
                if not self._counted(t):
                    continue
                if not is_out and id(t) not in seen:
                    self.elements += t.numel()  # read
                seen.add(id(t))
                if written:
                    self.elements += t.numel()
        if not returns or all(r.alias_info is None for r in returns):
            for t in _tensors(out):  # a new tensor: written once
                if t.numel() >= self.large:
                    self.storages.add(t.untyped_storage().data_ptr())
                    self.elements += t.numel()
        return out


#: Calls that allocate a tensor without writing it.
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _passes(params: list[Tensor], run: Callable[[], Any]) -> tuple[float, Counter[str]]:
    """Elements moved by ``run()`` in units of the parameters' size (one read-write pass: 2.0), and its calls.

    Work outside aten is counted here: a ``ctypes.memmove`` or a streaming copy (``_native.stream_copy``)
    of ``n`` bytes (the engine's copy of a few large CPU tensors) reads and writes ``n`` bytes, and the
    C loops read and write what their formula says: ``_native.decay_sumsq_`` (decay and square sum) reads
    and writes a tensor once, ``_native.cautious_`` reads it and its copy and writes it, ``_native.abs_sum``
    reads it.
    """
    total = sum(p.numel() for p in params)
    itemsize = params[0].element_size()
    moved = [0]
    memmove, stream_copy, decay_sumsq_ = ctypes.memmove, _native.stream_copy, _native.decay_sumsq_
    cautious_, abs_sum = _native.cautious_, _native.abs_sum

    def counting_memmove(dst: Any, src: Any, nbytes: int) -> Any:
        moved[0] += 2 * nbytes // itemsize
        return memmove(dst, src, nbytes)

    def counting_stream_copy(copy: Tensor, t: Tensor, nbytes: int) -> None:
        moved[0] += 2 * nbytes // itemsize
        stream_copy(copy, t, nbytes)

    def counting_decay_sumsq_(t: Tensor, factor: float) -> float:
        moved[0] += 2 * t.numel()
        return decay_sumsq_(t, factor)

    def counting_cautious_(t: Tensor, before: Tensor, step: float, soft: bool) -> None:
        moved[0] += 3 * t.numel()  # reads t and its copy, writes t
        cautious_(t, before, step, soft)

    def counting_abs_sum(t: Tensor) -> float:
        moved[0] += t.numel()
        return abs_sum(t)

    with (
        mock.patch.object(ctypes, "memmove", counting_memmove),
        mock.patch.object(_native, "stream_copy", counting_stream_copy),
        mock.patch.object(_native, "decay_sumsq_", counting_decay_sumsq_),
        mock.patch.object(_native, "cautious_", counting_cautious_),
        mock.patch.object(_native, "abs_sum", counting_abs_sum),
        Traffic(params, large=min(p.numel() for p in params)) as traffic,
    ):
        run()
    return (traffic.elements + moved[0]) / total, traffic.calls


# Worked out from each kernel's formula (r: elements read, w: written, per element of the parameters):
#   decoupled, lr_ratio, independent: p *= f                                  r1 w1        = 2
#   ord=1, a few large tensors: softshrink(p, t, out=p)                       r1 w1        = 2
#   ord=1, many tensors: c = clamp_max(p, t); clamp_min_(c, -t); p -= c       2 + 2 + 3    = 7
#   relative (params): sum |p| (read once) + p *= f                           1 + 2        = 3
#   cautious, a few large tensors, with the C loops: copy b = p (before the update), then one loop
#             p = where((p - b) b < 0, p - step p, p)  (ord=1: p - clamp(p, -t, t))   2 + 3 = 5
#   and without them (no C compiler), block by block with cache-sized scratch blocks m and s (not counted):
#             copy b = p (before the update); m = p - b; m *= b;
#             m = (m < 0); p -= step p m                                      2 + 2 + 1 + 0 + 2 = 7
#   cautious, ord=1: the same up to m, then s = clamp(p, -t, t); p -= s m     2 + 2 + 1 + 0 + 1 + 2 = 8
#   cautious, many tensors (foreach, a temporary d the size of the tensors):
#             copy; d = p - b; b *= d; clamp_max_(b, 0); sign_(b); p += step p b  2 + 3 + 3 + 2 + 2 + 3 = 15
#   logged decoupled step: p *= f, then ‖p‖ for the metrics (read once)      2 + 1        = 3
@pytest.mark.parametrize(
    ("kwargs", "count", "expected"),
    [
        pytest.param({}, 4, 2.0, id="decoupled"),
        pytest.param({"mode": "lr_ratio"}, 4, 2.0, id="lr_ratio"),
        pytest.param({"mode": "independent"}, 4, 2.0, id="independent"),
        pytest.param({"ord": 1}, 4, 2.0, id="L1-large"),
        pytest.param({"ord": 1}, 64, 7.0, id="L1-many"),
        pytest.param({"mode": "relative"}, 4, 3.0, id="relative-params-large"),
        pytest.param({"mode": "relative", "metric": "rms"}, 64, 3.0, id="relative-params-rms-many"),
        pytest.param({"cautious": True}, 4, 5.0, id="cautious-large"),
        pytest.param({"cautious": True, "ord": 1}, 4, 5.0, id="cautious-L1-large"),
        pytest.param({"cautious": True}, 64, 15.0, id="cautious-many"),
    ],
)
def test_memory_passes_of_a_step(kwargs, count, expected):
    if count <= 8 and (kwargs.get("cautious") or kwargs.get("mode") == "relative") and _native.library() is None:
        pytest.skip(f"the C loops cannot be built here: {_native._STATE['failed']}")
    params = _params(count, 2**12 if count > 8 else 2**20)  # many small tensors take the foreach paths
    optimizer, _ = _engine(params, **kwargs)
    optimizer.step()  # the first step (warnings, checks) apart
    passes, _ = _passes(params, optimizer.step)
    assert passes == pytest.approx(expected)


@pytest.mark.usefixtures("without_c_loops")
@pytest.mark.parametrize(
    ("kwargs", "count", "expected"),
    [
        pytest.param({"mode": "relative"}, 4, 3.0, id="relative-params-large"),
        pytest.param({"cautious": True}, 4, 7.0, id="cautious-large"),
        pytest.param({"cautious": True, "ord": 1}, 4, 8.0, id="cautious-L1-large"),
    ],
)
def test_memory_passes_of_a_step_without_the_c_loops(kwargs, count, expected):
    params = _params(count, 2**20)
    optimizer, _ = _engine(params, **kwargs)
    optimizer.step()
    passes, _ = _passes(params, optimizer.step)
    assert passes == pytest.approx(expected)


@pytest.mark.parametrize("c_loops", [True, False], ids=["C-loops", "blocks"])
@pytest.mark.parametrize(
    ("kwargs", "expected", "blocks"),
    [
        pytest.param({"cautious": True}, 5.0, 7.0, id="cautious"),
        pytest.param({"cautious": True, "ord": 1}, 5.0, 8.0, id="cautious-L1"),
        pytest.param({"mode": "relative"}, 3.0, 3.0, id="relative-params"),
        pytest.param({"ord": 1}, 2.0, 2.0, id="L1"),
    ],
)
def test_many_large_tensors_take_the_paths_of_a_few_large_ones(request, kwargs, expected, blocks, c_loops):
    """A model's dozens of weight matrices (here 12), not only a few tensors, go tensor by tensor: through
    the C loops, or block by block without them.

    (Each larger than the two scratch blocks together, so that those are not taken for memory traffic.)
    """
    if not c_loops:
        request.getfixturevalue("without_c_loops")
        expected = blocks
    elif _native.library() is None:
        pytest.skip(f"the C loops cannot be built here: {_native._STATE['failed']}")
    params = _params(12, 2 * F._BLOCK + 3)
    optimizer, _ = _engine(params, **kwargs)
    optimizer.step()
    passes, _ = _passes(params, optimizer.step)
    assert passes == pytest.approx(expected)


def test_a_logged_step_reads_the_parameters_once_more():
    params = _params(4, 2**20)
    optimizer, engine = _engine(params)
    optimizer.step()

    def logged_step() -> None:
        optimizer.step()
        engine.metrics()

    passes, _ = _passes(params, logged_step)
    assert passes == pytest.approx(3.0)


class _Calls(TorchDispatchMode):
    """The aten calls made under it, each with the address of its first tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        first = next(_tensors(list(args)), None)
        self.calls.append((func.overloadpacket.__name__, -1 if first is None else first.data_ptr()))
        return func(*args, **(kwargs or {}))


def _reference_norm(params: list[Tensor]) -> float:
    return math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in params))


@pytest.mark.parametrize(
    ("count", "numel", "contiguous"),
    [(4, 2**18 + 3, False), (4, 2**18 + 3, True), (24, 2**15 + 3, False)],
    ids=["few-large", "contiguous", "many-large"],
)
@pytest.mark.parametrize("native", [True, False], ids=["C-loop", "blocks"])
def test_a_step_measured_for_logging_takes_the_norm_in_the_decay_pass(count, numel, contiguous, native):
    params = _params(count, numel, contiguous=contiguous)
    optimizer, engine = _engine(params, fused=None if native else False)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    engine.norms_in_step = True
    looped: list[int] = []
    decay_sumsq_ = _native.decay_sumsq_

    def counting(t: Tensor, factor: float) -> float:
        looped.append(t.data_ptr())
        return decay_sumsq_(t, factor)

    with _Calls() as seen, mock.patch.object(_native, "decay_sumsq_", counting):
        optimizer.step()
    names = [name for name, _ in seen.calls]
    assert "_foreach_norm" not in names and "linalg_vector_norm" not in names
    assert "_foreach_mul_" not in names  # the decay itself went tensor by tensor
    if native and _native.library() is not None:
        # one C loop per tensor decays it and sums its squares: no aten call touches the parameters
        assert sorted(looped) == sorted(p.data_ptr() for p in (params[:1] if contiguous else params))
        assert not {"mul_", "dot"} & set(names)
    else:
        assert not looped
        blocks = [(name, ptr) for name, ptr in seen.calls if name in ("mul_", "dot")]
        # each block's square sum reads the block the decay has just written, while it is in cache
        assert blocks[0::2] == [("mul_", ptr) for _, ptr in blocks[1::2]]
        assert [name for name, _ in blocks[1::2]] == ["dot"] * (len(blocks) // 2) and len(blocks) >= 10
    step = LR * WD
    for p, b in zip(params, before, strict=True):  # the decay is the formula's, to the bit
        assert torch.equal(p.detach(), b * torch.tensor(1.0 - step, dtype=b.dtype))
    with _Calls() as seen:
        measured = engine.metrics()["decay/param_norm"]
    assert measured == pytest.approx(_reference_norm(params), rel=1e-5)
    assert not {"_foreach_norm", "linalg_vector_norm", "dot"} & {name for name, _ in seen.calls}


@pytest.mark.parametrize("contiguous", [False, True], ids=["separate", "contiguous"])
def test_a_norm_taken_in_the_step_is_not_reused_once_the_parameters_change(contiguous):
    params = _params(2, 2**18, contiguous=contiguous)
    optimizer, engine = _engine(params)
    engine.norms_in_step = True
    optimizer.step()
    with torch.no_grad():
        params[0].mul_(3.0)  # another callback's in-place change after the step (a contiguous group's own counter)
    assert engine.metrics()["decay/param_norm"] == pytest.approx(_reference_norm(params), rel=1e-4)
    optimizer.step()
    params[1].data = torch.full_like(params[1], 0.5)  # a replaced `.data`
    assert engine.metrics()["decay/param_norm"] == pytest.approx(_reference_norm(params), rel=1e-4)
    params[0].grad = None  # a step that leaves a tensor out is measured after it, as before
    optimizer.step()
    with _Calls() as seen:
        assert engine.metrics()["decay/param_norm"] == pytest.approx(_reference_norm(params), rel=1e-4)
    assert "_foreach_norm" in {name for name, _ in seen.calls}


def test_a_contiguous_group_is_one_pass_of_one_kernel():
    params = _params(300, 64, contiguous=True)
    optimizer, _ = _engine(params)
    optimizer.step()
    passes, calls = _passes(params, optimizer.step)
    assert passes == pytest.approx(2.0)
    assert calls["_foreach_mul_"] == 1  # over the one flat view of the buffer


class PythonEvents:
    """Counts the Python events (calls, lines, returns) of everything run under it, with ``sys.settrace``,
    and the functions called. The garbage collector is held off meanwhile: a collection would run the
    finalizers of whatever earlier tests left behind, which are not the step's work."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.functions: Counter[str] = Counter()

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        self.events[event] += 1
        if event == "call":
            self.functions[f"{frame.f_code.co_filename}:{frame.f_code.co_name}"] += 1
        return self._trace

    def __enter__(self) -> PythonEvents:
        self._previous = sys.gettrace()
        self._collecting = gc.isenabled()
        gc.disable()
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)
        if self._collecting:
            gc.enable()


def _step_costs(count: int, contiguous: bool, kwargs: dict[str, Any]) -> tuple[PythonEvents, Counter[str]]:
    """Python events and aten calls of one steady-state step over ``count`` small tensors."""
    params = _params(count, 4, contiguous=contiguous)
    optimizer, _ = _engine(params, **kwargs)
    for _ in range(2):
        optimizer.step()
    with Traffic(params, large=2**62) as traffic:
        optimizer.step()
    with PythonEvents() as python:
        optimizer.step()
    return python, traffic.calls


@pytest.mark.parametrize("contiguous", [False, True], ids=["separate", "contiguous"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "lr_ratio"},
        {"mode": "independent", "ord": 1},
        {"mode": "relative"},
        {"mode": "relative", "source": "grad", "metric": "rms"},
        {"mode": "relative", "source": "update"},
        {"cautious": True},
    ],
    ids=["decoupled", "lr_ratio", "independent-L1", "relative", "relative-grad-rms", "relative-update", "cautious"],
)
def test_step_does_no_python_work_per_tensor(contiguous, kwargs):
    few, few_calls = _step_costs(16, contiguous, kwargs)
    many, many_calls = _step_costs(256, contiguous, kwargs)
    # the same Python calls and lines for 16 and 256 tensors
    assert many.events == few.events, (many.functions - few.functions, few.functions - many.functions)
    assert many_calls == few_calls  # the same kernel calls: foreach over lists, or one over the buffer


def test_the_python_event_count_sees_a_loop_over_tensors():
    """The measure itself: a Python loop over the parameters shows in the events (this test can fail)."""
    few, many = _params(16, 4), _params(256, 4)

    def check(params: list[Tensor]) -> Counter[str]:
        with PythonEvents() as python:
            all(p.grad is not None for p in params)
        return python.events

    assert check(many)["call"] > check(few)["call"]


def test_tensors_without_a_gradient_are_still_left_alone():
    """The C-speed gradient check keeps its meaning: a parameter without a gradient is not decayed."""
    params = _params(20, 4)
    params[3].grad = None
    params[17].grad = None
    before = [p.detach().clone() for p in params]
    optimizer, _ = _engine(params)
    optimizer.step()
    for i, (p, b) in enumerate(zip(params, before, strict=True)):
        expected = b if i in (3, 17) else b * (1 - LR * WD)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0, msg=str(i))


class _Shift(torch.optim.SGD):
    """An optimizer whose update adds a fixed random shift, so that some coordinates move toward zero."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.param_groups[0]["params"]:
                p.add_(torch.randn(p.shape, generator=gen), alpha=0.5)
        return None


@pytest.mark.parametrize(
    ("count", "numel"),
    [
        pytest.param(3, 2**18 + 5, id="few-large-in-blocks"),
        pytest.param(12, 2**15 + 7, id="many-large-in-blocks"),
        pytest.param(40, 100, id="many-small-foreach"),
    ],
)
@pytest.mark.parametrize("ord", [2, 1], ids=["L2", "L1"])
@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
def test_fast_paths_decay_by_the_documented_formulas(count, numel, ord, cautious):
    """Both paths of each kernel (tensor by tensor or in blocks, and foreach) against the documented formulas."""
    params = _params(count, numel)
    before = [p.detach().clone() for p in params]
    step = LR * WD
    optimizer = _Shift([{"params": params, "weight_decay": WD, PLANNED_KEY: True, "name": "decay"}], lr=LR)
    lwd.WeightDecay(optimizer, ord=ord, cautious=cautious)
    optimizer.step()
    gen = torch.Generator().manual_seed(1)
    for p, b in zip(params, before, strict=True):
        after = b + 0.5 * torch.randn(b.shape, generator=gen)
        # the documented formulas: p (1 - step), or sign(p) max(|p| - step, 0), where (p - b) b < 0 if cautious
        decayed = after * (1 - step) if ord == 2 else torch.sign(after) * torch.clamp_min(after.abs() - step, 0.0)
        expected = torch.where((after - b) * b < 0, decayed, after) if cautious else decayed
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        x, old = float(after[-1]), float(b[-1])  # and the last coordinate (in the last block) by hand
        if not cautious or (x - old) * old < 0:
            x = x * (1 - step) if ord == 2 else math.copysign(max(abs(x) - step, 0.0), x)
        assert float(p.detach()[-1]) == pytest.approx(x, rel=1e-6, abs=1e-7)


def test_cautious_copies_into_the_last_steps_copies_and_anew_for_a_tensor_that_changed():
    """The copy of a few large CPU tensors is made into the last step's copies (no allocation: freed memory
    would come back from the kernel page by page), and anew for a tensor whose shape changed; every step
    still decays by the documented formula."""
    params = _params(3, 2**18 + 5)
    optimizer = _Shift([{"params": params, "weight_decay": WD, PLANNED_KEY: True, "name": "decay"}], lr=LR)
    lwd.WeightDecay(optimizer, cautious=True, fused=False)
    step = LR * WD

    def checked_step() -> int:
        before = [p.detach().clone() for p in params]
        _, calls = _passes(params, optimizer.step)
        gen = torch.Generator().manual_seed(1)
        for p, b in zip(params, before, strict=True):
            after = b + 0.5 * torch.randn(b.shape, generator=gen)
            expected = torch.where((after - b) * b < 0, after * (1 - step), after)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        return calls["empty_like"]  # the copies allocated

    assert checked_step() == 3
    assert checked_step() == 0
    assert checked_step() == 0
    params[1].data = torch.randn(2**17 + 3)
    params[1].grad = torch.randn(2**17 + 3)
    assert checked_step() == 1
    assert checked_step() == 0


@pytest.mark.parametrize("built", [True, False], ids=["with-stream", "without-C-loops"])
@pytest.mark.parametrize("fast", ["memmove", "copy_", "stream"])
def test_large_copies_are_made_the_way_found_fastest_on_the_first_ones(monkeypatch, fast, built):
    """The first copies of 1 MiB or more take every way in turn, timed; later ones the fastest; the bits are the same.

    The streaming copy is a way only where ``_native``'s loops are built; a caller that turns them off
    (``fused=False``) takes the faster of the other two even after the stream was chosen.
    """
    if not built:
        monkeypatch.setitem(_native._STATE, "library", None)
        monkeypatch.setitem(_native._STATE, "failed", "no C compiler found (for the test)")
    elif _native.library() is None:
        pytest.skip(f"the C loops cannot be built here: {_native._STATE['failed']}")
    for key in ("method", "plain"):
        monkeypatch.setitem(F._COPY, key, None)
    for way in ("memmove", "copy_", "stream"):
        monkeypatch.setitem(F._COPY, way, [])
    ways: list[str] = []
    copy_by = F._copy_by
    # a clock that only the copies move: the fast way takes 1 s, the others 10 s, the stream 5 s
    cost = {way: 1.0 if way == fast else 5.0 if way == "stream" else 10.0 for way in ("memmove", "copy_", "stream")}
    now = [0.0]

    def timed(way: str, copy: Tensor, t: Tensor, nbytes: int) -> None:
        ways.append(way)
        now[0] += cost[way]
        copy_by(way, copy, t, nbytes)

    monkeypatch.setattr(F, "_copy_by", timed)
    monkeypatch.setattr(F, "_clock", lambda: now[0])
    gen = torch.Generator().manual_seed(0)
    small, large = torch.randn(1000, generator=gen), torch.randn(2**18, 2, generator=gen)
    assert torch.equal(F._copies([small])[0], small) and F._COPY["method"] is None  # too small to time
    assert ways == ["memmove"]
    spare: list[Tensor] = []
    for _ in range(12):
        copies = F._copies([large, small], spare=spare)
        assert torch.equal(copies[0], large) and torch.equal(copies[1], small)
    candidates = ["memmove", "copy_", "stream"] if built else ["memmove", "copy_"]
    chosen = min(candidates, key=cost.__getitem__)
    plain = min(("memmove", "copy_"), key=cost.__getitem__)
    assert F._COPY["method"] == chosen and F._COPY["plain"] == plain
    # the large tensor's first copy, into new memory, is not timed; the next take the ways in turn (the
    # small one memmove meanwhile), the choice is made after the last timed one, and from then on both
    # take the chosen way
    timed_copies = 3 * len(candidates)
    turns = [w for i in range(timed_copies) for w in (candidates[i % len(candidates)], "memmove")]
    assert ways[1:] == ["memmove", "memmove"] + turns[:-1] + [chosen] * (1 + 2 * (11 - timed_copies))
    ways.clear()  # a caller without the C loops (fused=False): the faster of the other two, as timed
    assert torch.equal(F._copies([large], native=False)[0], large)
    assert ways == [plain]


def test_a_caller_without_the_c_loops_leaves_the_stream_to_be_timed_by_one_with_them(monkeypatch):
    """A ``fused=False`` engine's copies choose between memmove and torch's copy for it alone: the next engine
    that may stream times the stream (its first copies) and chooses among all three."""
    if _native.library() is None:
        pytest.skip(f"the C loops cannot be built here: {_native._STATE['failed']}")
    for key in ("method", "plain"):
        monkeypatch.setitem(F._COPY, key, None)
    for way in ("memmove", "copy_", "stream"):
        monkeypatch.setitem(F._COPY, way, [])
    ways: list[str] = []
    copy_by = F._copy_by
    cost = {"memmove": 10.0, "copy_": 8.0, "stream": 1.0}
    now = [0.0]

    def timed(way: str, copy: Tensor, t: Tensor, nbytes: int) -> None:
        ways.append(way)
        now[0] += cost[way]
        copy_by(way, copy, t, nbytes)

    monkeypatch.setattr(F, "_copy_by", timed)
    monkeypatch.setattr(F, "_clock", lambda: now[0])
    large = torch.randn(2**19)
    spare: list[Tensor] = []
    for _ in range(8):  # the first into new memory, not timed
        assert torch.equal(F._copies([large], spare=spare, native=False)[0], large)
    assert ways == ["memmove"] + ["memmove", "copy_"] * 3 + ["copy_"]
    assert F._COPY["plain"] == "copy_" and F._COPY["method"] is None
    ways.clear()
    for _ in range(4):
        assert torch.equal(F._copies([large], spare=spare)[0], large)
    assert ways == ["stream"] * 4 and F._COPY["method"] == "stream"


def test_copies_into_new_memory_are_not_timed(monkeypatch):
    """A copy into memory just allocated pays its page faults: timing it would choose the way by them."""
    for key in ("method", "plain"):
        monkeypatch.setitem(F._COPY, key, None)
    for way in ("memmove", "copy_", "stream"):
        monkeypatch.setitem(F._COPY, way, [])
    large = torch.randn(2**19)
    for _ in range(12):
        assert torch.equal(F._copies([large])[0], large)  # no spare kept: a new copy every time
    assert F._COPY["method"] is None and not any(F._COPY[w] for w in ("memmove", "copy_", "stream"))
