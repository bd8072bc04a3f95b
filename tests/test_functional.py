"""``lightning_wd.functional`` norms on one process: float64, mixed dtypes, empty tensors, bad ``ord``.

Expected values are worked out by hand in the comments; the sharded (DTensor) cases are in
``tests/test_sharded.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

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
