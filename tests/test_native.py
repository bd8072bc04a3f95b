"""The C loops of ``lightning_wd._native`` against plain torch, and the engine without them."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_wd as lwd
from lightning_wd import _native
from lightning_wd import functional as F
from lightning_wd.plan import PLANNED_KEY

built = pytest.mark.skipif(_native.library() is None, reason=f"no C loops here: {_native._STATE['failed']}")

#: Lengths around the loop's grain (1,024), its 16-lane steps and the split over threads (2^18 per thread).
SIZES = [1, 15, 16, 17, 1023, 1024, 1025, 5 * 1024 + 7, 2**18 - 1, 2**19 + 333]


@built
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_and_square_sum_give_torchs_bits_and_the_exact_sum(dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        for n in SIZES:
            t = torch.randn(n, dtype=dtype, generator=gen) * 10
            if n > 20:
                t[:5] = torch.tensor([0.0, -0.0, 1e-38, -3e38, 7.0], dtype=dtype)
            original = t.clone()
            factor = 1.0 - 1e-3 * 0.1
            total = _native.decay_sumsq_(t, factor)
            # torch's own multiply by the factor rounded to the dtype, bit for bit
            expected = original * torch.tensor(factor, dtype=dtype)
            bits = torch.int64 if dtype == torch.float64 else torch.int32
            assert torch.equal(t.view(bits), expected.view(bits)), n
            # the sum of squares of the result, against a float64 sum over Python floats
            reference = math.fsum(v * v for v in expected.double().tolist())
            assert total == pytest.approx(reference, rel=1e-6 if dtype == torch.float32 else 1e-12), n
    finally:
        torch.set_num_threads(previous)


@built
@pytest.mark.parametrize("threads", [1, 2])
def test_the_streaming_copy_copies_every_byte_at_any_alignment(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        source = torch.randint(0, 256, (2**20 + 77,), dtype=torch.uint8)
        for offset in (0, 1, 3, 17, 63):
            for n in (1, 63, 64, 65, 4096 + 5, 2**20):
                dst = torch.zeros(n + 128, dtype=torch.uint8)
                src = source[offset : offset + n]
                _native.stream_copy(dst[offset : offset + n], src, n)
                assert torch.equal(dst[offset : offset + n], src), (offset, n)
                assert not dst[:offset].any() and not dst[offset + n :].any(), (offset, n)  # nothing outside
    finally:
        torch.set_num_threads(previous)


@built
@pytest.mark.parametrize("soft", [False, True], ids=["ord2", "ord1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cautious_loop_decays_exactly_where_the_update_moved_toward_zero(dtype, soft):
    gen = torch.Generator().manual_seed(5)
    step = 0.05
    for n in SIZES[:-2]:  # (the formula in Python, element by element: the shorter lengths)
        before = torch.randn(n, dtype=dtype, generator=gen)
        p = before + 0.3 * torch.randn(n, dtype=dtype, generator=gen)
        if n > 20:  # a NaN, signed zeros, a coordinate that did not move, one that crossed zero
            p[:5] = torch.tensor([float("nan"), -0.0, 0.0, float(before[3]), -float(before[4])], dtype=dtype)
        expected = p.clone()
        s = float(torch.tensor(step, dtype=dtype))  # the step as the dtype holds it

        def held(v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=dtype)

        for i, (x, b) in enumerate(zip(p.tolist(), before.tolist(), strict=True)):  # the formula, element by element
            if (x - b) * b < 0:
                expected[i] = held(x) - held(min(max(x, -s), s)) if soft else held(x) - held(x) * held(s)
        _native.cautious_(p, before, step, soft)
        bits = torch.int64 if dtype == torch.float64 else torch.int32
        assert torch.equal(p.view(bits), expected.view(bits)), n  # NaN and the signs of zeros included


@built
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_absolute_sum_is_the_exact_sum(dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(6)
        for n in SIZES:
            t = torch.randn(n, dtype=dtype, generator=gen)
            reference = math.fsum(abs(v) for v in t.tolist())
            assert _native.abs_sum(t) == pytest.approx(reference, rel=1e-12), n
    finally:
        torch.set_num_threads(previous)


@built
@pytest.mark.parametrize("kwargs", [{"cautious": True}, {"mode": "relative"}], ids=["cautious", "relative"])
def test_the_c_loops_and_the_paths_without_them_decay_alike(monkeypatch, kwargs):
    """Five SGD steps over a few large tensors: the C loops against the eager paths of a machine without them."""

    def run() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(2**18 + 9, generator=gen)) for _ in range(3)]
        optimizer = torch.optim.SGD([{"params": params, "weight_decay": 0.5, PLANNED_KEY: True}], lr=0.1)
        lwd.WeightDecay(optimizer, **kwargs)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        return [p.detach().clone() for p in params]

    with_loops = run()
    monkeypatch.setitem(F._COPY, "method", None)
    monkeypatch.setitem(_native._STATE, "library", None)
    monkeypatch.setitem(_native._STATE, "failed", "RuntimeError: turned off for the test")
    without = run()
    for a, b in zip(with_loops, without, strict=True):
        # the same decay to the last bit of a multiply-add (the eager cautious path forms p + s p q)
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


def _logged_run(monkeypatch: pytest.MonkeyPatch | None, **kwargs: object) -> tuple[list[torch.Tensor], float]:
    """Three logged decoupled steps of an SGD over four tensors of 2^18 + 5 elements: weights and last norm."""
    if monkeypatch is not None:  # as on a machine without a C compiler
        monkeypatch.setitem(F._COPY, "method", None)
        monkeypatch.setitem(_native._STATE, "library", None)
        monkeypatch.setitem(_native._STATE, "failed", "FileNotFoundError: no C compiler found (for the test)")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(2**18 + 5, generator=gen)) for _ in range(4)]
    optimizer = torch.optim.SGD([{"params": params, "weight_decay": 0.1, PLANNED_KEY: True, "name": "decay"}], lr=0.01)
    engine = lwd.WeightDecay(optimizer, **kwargs)
    norm = 0.0
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.01 * (i + 1 + step))
        engine.norms_in_step = True
        optimizer.step()
        norm = engine.metrics()["decay/param_norm"]
    return [p.detach().clone() for p in params], norm


def test_without_a_compiler_the_logged_step_gives_the_same_weights_and_norm(monkeypatch):
    reference = [torch.nn.Parameter(p) for p in _logged_run(None, fused=False)[0]]
    weights, norm = _logged_run(None)
    fallback, fallback_norm = _logged_run(monkeypatch)
    for a, b, c in zip(weights, fallback, reference, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # the norm of the weights after the last step, in float64
    expected = math.sqrt(math.fsum(float((p.double() ** 2).sum()) for p in weights))
    assert norm == pytest.approx(expected, rel=1e-6) and fallback_norm == pytest.approx(expected, rel=1e-5)


def test_a_failed_build_is_recorded_once_and_every_caller_keeps_the_torch_path(monkeypatch):
    monkeypatch.setitem(_native._STATE, "library", None)
    monkeypatch.setitem(_native._STATE, "failed", None)
    monkeypatch.setitem(F._COPY, "method", None)  # (chosen by earlier tests, maybe the stream)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setattr(_native, "_CC", ())
    assert _native.library() is None
    assert "no C compiler found" in _native._STATE["failed"]
    t = torch.randn(2**18 + 3)
    expected = t * torch.tensor(1 - 0.01)
    square_sum = F._decay_and_square_sum_([t], 0.01, {t.dtype})
    assert torch.equal(t, expected)
    assert float(square_sum) == pytest.approx(float((expected.double() ** 2).sum()), rel=1e-5)
    copy = F._copies([t])[0]
    assert torch.equal(copy, t) and copy.data_ptr() != t.data_ptr()
