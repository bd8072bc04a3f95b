"""``lightning_wd.functional`` on one process: norms (float64, mixed dtypes, empty tensors, bad ``ord``) and
the argument checks of the decay kernels (accepted steps and lists, refusals that leave every tensor as it was).

Expected values are worked out by hand in the comments; the sharded (DTensor) cases are in
``tests/test_sharded.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_wd import _native
from lightning_wd import functional as F

f64 = torch.float64


def test_float64_norms_and_means_match_hand_computed_values():
    # elements 3, -4, 12: |x| sums to 19, squares to 9 + 16 + 144 = 169, the largest |x| is 12
    tensors = [torch.tensor([3.0, -4.0], dtype=f64), torch.tensor([[12.0]], dtype=f64)]
    for ord, expected in ((2.0, 13.0), (1.0, 19.0), (math.inf, 12.0)):
        value = F.global_norm(tensors, ord)
        assert value.dtype == torch.float32 and value.dim() == 0
        assert float(value) == pytest.approx(expected, rel=1e-7)
    assert float(F.mean_abs(tensors)) == pytest.approx(19 / 3, rel=1e-7)
    assert float(F.rms(tensors)) == pytest.approx(math.sqrt(169 / 3), rel=1e-7)
    assert float(F.mean_abs(tensors, numel=6)) == pytest.approx(19 / 6, rel=1e-7)


def test_mixed_float64_float32_and_bfloat16():
    # 3 (float64), 4 (float32), 12 (bfloat16, exact): sqrt(169) = 13; |x| sum 19; max 12
    tensors = [torch.tensor([3.0], dtype=f64), torch.tensor([4.0]), torch.tensor([12.0], dtype=torch.bfloat16)]
    assert float(F.global_norm(tensors)) == pytest.approx(13.0)
    assert float(F.global_norm(tensors, 1.0)) == pytest.approx(19.0)
    assert float(F.global_norm(tensors, math.inf)) == pytest.approx(12.0)
    assert float(F.mean_abs(tensors)) == pytest.approx(19 / 3)


def test_empty_tensors_count_as_zero():
    # an empty tensor adds nothing (an empty shard of a sharded parameter), also to the max
    tensors = [torch.empty(0), torch.tensor([-2.0]), torch.empty(0, 3, dtype=f64)]
    assert float(F.global_norm(tensors, math.inf)) == 2.0
    assert float(F.global_norm(tensors)) == 2.0
    assert float(F.mean_abs(tensors)) == 2.0
    assert float(F.global_norm([torch.empty(0)], math.inf)) == 0.0


@pytest.mark.parametrize("ord", [0, -1.0, math.nan, -math.inf, True, "2"])
def test_global_norm_refuses_an_order_that_is_not_positive(ord):
    with pytest.raises(ValueError, match=r"`ord` must be a number > 0 .*got .*pass for example ord=2.0"):
        F.global_norm([torch.ones(2)], ord)


def test_empty_list_is_refused():
    for func in (F.global_norm, F.mean_abs, F.rms):
        with pytest.raises(ValueError, match="`tensors` is empty"):
            func([])


# ---------------------------------------------------------- apply_decay_: accepted input, refusals that change nothing
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, [[2.0, -4.0], [8.0]]),  # an int step: nothing decays
        (0.25, [[1.5, -3.0], [6.0]]),  # x * (1 - 0.25)
        (1, [[0.0, 0.0], [0.0]]),  # x * (1 - 1)
        (torch.tensor(0.5), [[1.0, -2.0], [4.0]]),  # a 0-dim tensor step
        (torch.tensor(0.5, dtype=f64), [[1.0, -2.0], [4.0]]),  # of another dtype than the tensors
    ],
)
def test_accepted_steps_decay_by_hand_computed_factors(step, expected):
    p = [torch.tensor([2.0, -4.0]), torch.tensor([8.0])]
    F.apply_decay_(p, step)
    assert [t.tolist() for t in p] == expected


def test_accepted_lists_and_masks_by_hand():
    # a tuple, a generator: lists of any kind; masks of 0/1 floats, bools or ints pick the coordinates
    p = (torch.tensor([2.0, -4.0]), torch.tensor([8.0]))
    F.apply_decay_(p, 0.5, mask=[torch.tensor([1.0, 0.0]), torch.tensor([True])])
    assert [t.tolist() for t in p] == [[1.0, -4.0], [4.0]]
    F.apply_decay_((t for t in p), 0.5, ord=1, mask=[torch.tensor([0, 1]), torch.tensor([1])])
    # L1 where the mask is 1: -4 -> -(4 - 0.5) = -3.5, 4 -> 3.5; the masked-out 1.0 stays
    assert [t.tolist() for t in p] == [[1.0, -3.5], [3.5]]
    F.apply_decay_([], 0.1)  # nothing to decay is fine


def test_a_tensor_step_is_used_as_given_without_a_host_synchronisation(monkeypatch):
    def sync(*args: object) -> None:
        raise AssertionError("apply_decay_ read a tensor step on the host")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    p = [torch.tensor([2.0, -4.0])]
    F.apply_decay_(p, torch.tensor(0.25))
    F.apply_decay_(p, torch.tensor(0.5), ord=1)
    F.apply_decay_(p, torch.tensor(math.nan))  # not refused: its value is never looked at
    monkeypatch.undo()
    # 2 * 0.75 = 1.5 -> 1.0 (L1 by 0.5); -4 * 0.75 = -3 -> -2.5; then NaN times each
    assert all(math.isnan(v) for v in p[0].tolist())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(step=0.5, mask=[torch.ones(2), torch.ones(1, 3)]), ValueError),  # broadcastable, wrong shape
        (dict(step=0.5, mask=[torch.ones(2), torch.ones(3, device="meta")]), ValueError),
        (dict(step=True), TypeError),  # once x * (1 - True): zeroed
        (dict(step=-1), ValueError),  # once x * (1 + 1): doubled
        (dict(step=0.5, ord=True), ValueError),
    ],
)
def test_refused_decay_leaves_every_tensor_as_it_was(kwargs, error):
    p = [torch.tensor([2.0, -4.0]), torch.tensor([8.0, 1.0, 3.0])]
    with pytest.raises(error):
        F.apply_decay_(p, **kwargs)
    assert [t.tolist() for t in p] == [[2.0, -4.0], [8.0, 1.0, 3.0]]


def test_a_non_float_tensor_after_float_ones_is_refused_before_any_is_scaled():
    p = [torch.tensor([2.0, -4.0]), torch.tensor([3, 4])]
    with pytest.raises(TypeError, match=r"`tensors\[1\]` has dtype torch.int64"):
        F.apply_decay_(p, 0.5)
    assert p[0].tolist() == [2.0, -4.0] and p[1].tolist() == [3, 4]


def test_cautious_mask_refuses_shapes_that_foreach_would_broadcast():
    after, before = [torch.tensor([[0.5, 2.0]])], [torch.tensor([1.0, 1.0])]
    with pytest.raises(ValueError, match=r"`before\[0\]` has shape \(2,\) but `after\[0\]` has shape \(1, 2\)"):
        F.cautious_mask(after, before)
    # the same shapes: 0.5 moved toward zero from 1.0 (1), 2.0 away from it (0)
    assert F.cautious_mask([torch.tensor([0.5, 2.0])], before)[0].tolist() == [1.0, 0.0]


def test_numel_may_be_given_as_any_int_at_least_zero():
    tensors = [torch.tensor([3.0, -4.0])]
    # |3| + |-4| = 7 over 7 elements (as if the tensors were larger) = 1; 3^2 + 4^2 = 25 over 4 -> sqrt 6.25 = 2.5
    assert float(F.mean_abs(tensors, numel=7)) == 1.0
    assert float(F.rms(tensors, numel=4)) == 2.5
    assert float(F.mean_abs(tensors, numel=0)) == 7.0  # no elements counted: divided by 1, as for empty tensors


@pytest.mark.parametrize("way", ["memmove", "copy_", "stream"])
def test_the_engines_copies_hold_the_same_bits_in_their_own_memory(monkeypatch, way):
    """``_copies`` (the snapshot of cautious and update modes): bit for bit, NaN, -0.0 and inf included."""
    if way == "stream" and _native.library() is None:
        pytest.skip(f"the C loops cannot be built here: {_native._STATE['failed']}")
    moved = []
    copy_by = F._copy_by
    monkeypatch.setitem(F._COPY, "method", way)
    monkeypatch.setattr(F, "_copy_by", lambda *args: (moved.append(args[0]), copy_by(*args))[1])
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45])
    large = [torch.randn(300, 200), torch.randn(200, 300)]  # a few large contiguous CPU tensors: one by one
    large[0].view(-1)[:5] = special
    cases = {
        "large": large,
        "float64": [torch.randn(40_000, dtype=torch.float64)],
        "many small": [torch.randn(3, 4) for _ in range(20)],
        "transposed": [torch.randn(300, 200).t()],
        "empty": [torch.randn(0), torch.randn(3, 0)],
    }
    for name, tensors in cases.items():
        moved.clear()
        copies = F._copies(tensors)
        assert moved == ([way] * len(tensors) if name in ("large", "float64") else []), name  # none for empty ones
        for t, c in zip(tensors, copies, strict=True):
            bits = torch.int64 if t.dtype == torch.float64 else torch.int32
            assert c.shape == t.shape and c.dtype == t.dtype
            assert torch.equal(c.contiguous().view(bits), t.contiguous().view(bits)), name
            assert not t.numel() or c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), name
        if not tensors[0].numel():
            continue
        first = (0,) * tensors[0].dim()
        tensors[0][first] = 7.0  # the copy does not follow the original
        assert copies[0][first] != 7.0, name
