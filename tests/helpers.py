"""Test helpers shared by the test modules: ``RunIf`` skip markers.

``RunIf`` follows Lightning's own test helper: one decorator that both marks a test
(``cuda``) and skips it when the requirement is not met, so that
``pytest -m cuda`` selects the GPU tests and a CPU machine skips them with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
from packaging.version import Version

_T = TypeVar("_T")


def run_if_marks(*, cuda: bool = False, min_cuda_gpus: int = 0, min_torch: str | None = None) -> list[Any]:
    """The marks ``RunIf`` applies, for ``pytest.param(..., marks=run_if_marks(cuda=True))``."""
    marks: list[Any] = []
    conditions: list[bool] = []
    reasons: list[str] = []
    gpus = max(min_cuda_gpus, 1 if cuda else 0)
    if gpus:
        marks.append(pytest.mark.cuda)
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        conditions.append(available < gpus)
        reasons.append(f"needs {gpus} CUDA device(s), found {available}")
    if min_torch is not None:
        current = Version(torch.__version__.split("+")[0])
        conditions.append(current < Version(min_torch))
        reasons.append(f"needs torch>={min_torch}, found {current}")
    failed = [r for c, r in zip(conditions, reasons, strict=True) if c]
    marks.append(pytest.mark.skipif(bool(failed), reason="; ".join(failed) or "requirements met"))
    return marks


def RunIf(*, cuda: bool = False, min_cuda_gpus: int = 0, min_torch: str | None = None) -> Callable[[_T], _T]:
    """Decorator: mark a test with its requirements and skip it where they are not met.

    Example::

        @RunIf(cuda=True)
        def test_on_gpu(): ...
    """
    marks = run_if_marks(cuda=cuda, min_cuda_gpus=min_cuda_gpus, min_torch=min_torch)

    def decorate(obj: _T) -> _T:
        for mark in marks:
            obj = mark(obj)
        return obj

    return decorate
