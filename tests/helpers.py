"""Test helpers shared by the test modules: ``RunIf`` skip markers, and running a script of ``tests/scripts``.

``RunIf`` follows Lightning's own test helper: one decorator that both marks a test
(``cuda``) and skips it when the requirement is not met, so that
``pytest -m cuda`` selects the GPU tests and a CPU machine skips them with a reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
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


def cpu_backward_supports(dtype: torch.dtype) -> bool:
    """Whether this torch differentiates a loss in ``dtype`` on CPU (older releases lack half kernels)."""
    try:
        x = torch.ones(2, dtype=dtype, requires_grad=True)
        torch.nn.functional.mse_loss(x, torch.zeros(2, dtype=dtype)).backward()
    except RuntimeError:
        return False
    return True


def unsafe_load_kwargs() -> dict[str, Any]:
    """``weights_only=False`` for ``Trainer.fit`` / ``load_from_checkpoint`` where Lightning takes it (2.5+).

    Older releases load checkpoints with torch's own default, which allows the pickled optimizer
    partials these tests save with their hyper-parameters.
    """
    import inspect

    import lightning as L

    return {"weights_only": False} if "weights_only" in inspect.signature(L.Trainer.fit).parameters else {}


ROOT = Path(__file__).resolve().parents[1]
#: Variables a distributed launch leaves in ``os.environ`` (Lightning's ``ddp_spawn`` sets MASTER_PORT
#: in the test process itself).
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``tests/scripts/<name>`` in a fresh interpreter that imports this repository's ``tests`` and
    starts its own process group (no launch variables inherited), and assert that it exited with 0."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
