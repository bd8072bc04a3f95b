"""Hugging Face ``transformers.Trainer`` with the engine (``examples/hf_trainer.py``): decayed by the formula.

The reference replays the run in a plain loop: torch's SGD with ``weight_decay=0`` on a copy of the
model (an update linear in the gradient keeps float noise far below the decay), then
``p <- p (1 - lr λ)`` on the weight matrices listed here by hand (GPT-2's transposed ``Conv1D``
kernels; the tied embedding head, position table and LayerNorms stay undecayed).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
STEPS, WD, LR = 4, 0.1, 0.1
DECAYED = [
    f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_with_the_engine_matches_a_plain_loop_and_logs_the_metrics(tmp_path):
    example = _example()
    trainer, decay = example.train(str(tmp_path), steps=STEPS, weight_decay=WD, lr=LR, optimizer=torch.optim.SGD)

    reference = example.tiny_gpt2()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR, weight_decay=0.0)
    ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(1)).repeat(4, 1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        # Trainer divides the summed token loss by the batch's label count (num_items_in_batch: 4 x 16),
        # where the model's own mean divides by the 4 x 15 shifted targets
        (reference(input_ids=ids, labels=ids).loss * (15 / 16)).backward()
        optimizer.step()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name in DECAYED:
                    p.mul_(1 - LR * WD)
    trained = dict(trainer.model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(trained[name].detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=name)

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == STEPS and all(log["wd/decay/weight_decay"] == WD for log in logs)
    norm = torch.sqrt(sum(p.detach().double().pow(2).sum() for n, p in reference.named_parameters() if n in DECAYED))
    assert logs[-1]["wd/decay/param_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert {g["name"]: g["weight_decay"] for g in decay.optimizer.param_groups} == {"no_decay": 0.0, "decay": WD}
