"""FSDP1 (``FullyShardedDataParallel`` with ``use_orig_params=True``) on 2 CPU processes over gloo.

With ``use_orig_params=True`` every original parameter is, between steps, a 1-D view of this rank's
part of a flat parameter: here ``body.fc1.weight`` (7x6) is 26 elements on rank 0 and 16 on rank 1,
``body.fc1.bias`` and ``body.norm.bias`` are empty on rank 0, ``body.norm.weight`` on rank 1, and the
flat parameters hold alignment padding between tensors.

* The plan of the wrapped model gives every tensor its name, shape and owner (the groups and
  shapes are written out here from the model's definition), for the standard and gpt presets and a
  user predicate reading ``param.ndim``; the views are as they were afterwards; a plan made before
  wrapping holds the very tensors the wrapped model trains; a module whose FSDP unit wraps it from
  outside, and ``use_orig_params=False``, are refused with the fix.
* The engine trains the wrapped model with AdamW for 4 steps in ``decoupled`` and ``relative``
  mode (each source, both metrics), under ``FULL_SHARD``, ``SHARD_GRAD_OP`` and ``HYBRID_SHARD``
  (one 2-process replica group of 1-process shards, and one 2-process shard group): the gathered
  parameters and, at every step, the metrics (parameter, gradient and update norms of each group)
  equal a single-process reference, a plain loop over the decay modes' formulas written here. The
  collectives ``lightning_wd`` issues are counted by wrapping ``torch.distributed``'s functions
  around each ``optimizer.step()`` and each ``metrics()`` call. ``tests/scripts/fsdp1_hybrid.py``
  runs the same checks on 4 processes, 2 replicas of 2-process shards (not part of the suite).
* ``WeightDecayCallback.setup`` accepts ``FSDPStrategy`` and refuses ``use_orig_params=False`` and
  DeepSpeed with the alternative. Lightning runs ``FSDPStrategy`` on GPUs only; its end-to-end fit,
  ``tests/scripts/fsdp1_fit.py``, runs it on CPU through a subclass that passes FSDP1 the CPU as its
  device (the rest of the strategy's code is Lightning's).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_wd as lwd
from tests.callback_helpers import WDNet
from tests.fsdp1_helpers import WORLD, free_port, worker
from tests.helpers import run_script

pytestmark = pytest.mark.slow


def test_fsdp1_plan_and_engine_in_two_processes():
    """Every check on both ranks (``tests.fsdp1_helpers``): an assertion in either fails the spawn with its
    traceback. One spawn for all: starting the processes costs far more than the checks."""
    torch.multiprocessing.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)


# ---------------------------------------------------------------- Lightning
def _never_started(cls: type) -> Any:
    """A real strategy instance whose ``__init__`` never ran (DeepSpeed's needs the ``deepspeed`` package)."""
    return cls.__new__(cls)


def test_callback_accepts_fsdp_strategy_and_refuses_flat_parameters():
    cb = lwd.WeightDecayCallback()
    cb.setup(SimpleNamespace(strategy=FSDPStrategy()), WDNet(), "fit")  # type: ignore[arg-type]
    hybrid = FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={torch.nn.Linear})
    cb.setup(SimpleNamespace(strategy=hybrid), WDNet(), "fit")  # type: ignore[arg-type]
    flat = SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False))
    with pytest.raises(MisconfigurationException, match=r"use_orig_params=False.*FSDPStrategy\(use_orig_params=True\)"):
        cb.setup(flat, WDNet(), "fit")  # type: ignore[arg-type]
    deepspeed = SimpleNamespace(strategy=_never_started(DeepSpeedStrategy))
    with pytest.raises(MisconfigurationException, match=r"DeepSpeedStrategy: DeepSpeed steps its own fp32 master"):
        cb.setup(deepspeed, WDNet(), "fit")  # type: ignore[arg-type]


def test_lightning_fsdp_strategy_fit_on_cpu_matches_single_process(tmp_path):
    """``relative`` mode, with the update and gradient norms logged: a collective at every step and on
    every logged one. The script asserts on rank 0 the gathered parameters against the single-process
    reference and the logged norms against the gathered parameters and the reference, and exits non-zero
    on a mismatch (``python tests/scripts/fsdp1_fit.py decoupled DIR`` runs the other mode)."""
    result = run_script("fsdp1_fit.py", "relative", str(tmp_path / "run"), cwd=tmp_path)
    assert "fsdp1_fit OK: mode=relative, 10 logged steps" in result.stdout, result.stdout[-3000:]
