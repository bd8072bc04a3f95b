"""Shared pytest configuration.

* Hypothesis: the ``lwd`` profile runs ``LWD_HYPOTHESIS_EXAMPLES`` examples per property
  (default 300) without a deadline (building torch modules has uneven timing).
* Tests marked ``cuda`` are skipped on machines without a CUDA device.
* ``tests`` is a package (``tests/__init__.py``): test modules import shared models with
  ``from tests.models import ...`` under plain ``python -m pytest`` from the repository root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.helpers import LAUNCH_VARIABLES

settings.register_profile(
    "lwd",
    max_examples=int(os.environ.get("LWD_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("lwd")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_launch_environment() -> Iterator[None]:
    """Each test starts without the launch variables an earlier distributed test left behind, so that
    every multi-process run picks a free port of its own instead of reusing one whose socket may linger."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARIABLES if k in os.environ}
    yield
    for k in LAUNCH_VARIABLES:
        os.environ.pop(k, None)
    os.environ.update(saved)


@pytest.fixture
def without_c_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine where ``lightning_wd._native``'s C loops cannot be built (no C compiler): the CPU
    takes the ``torch.compile`` kernels and the eager paths."""
    from lightning_wd import _native
    from lightning_wd import functional as F

    monkeypatch.setitem(_native._STATE, "library", None)
    monkeypatch.setitem(_native._STATE, "failed", "RuntimeError: turned off for the test")
    monkeypatch.setitem(F._COPY, "method", None)  # (the stream, chosen by an earlier test, is not there)
