"""Hugging Face ``transformers.Trainer`` with lightning_wd: groups from the standard preset, the engine attached.

Run from the repository root (``pip install -e ".[hf]"``)::

    python examples/hf_trainer.py

A tiny GPT-2 (2 layers, 32 wide; its output head is tied to the token embedding, which the preset
leaves undecayed) trained for a few steps on CPU. ``Trainer`` is given the optimizer
(``optimizers=(optimizer, None)``); ``lwd.WeightDecay`` decays after each of its steps (accelerate's
optimizer wrapper calls the real ``step``), and the ``DecayMetrics`` callback puts the engine's
metrics into every log, where ``trainer.state.log_history`` and the reporting integrations read them.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import lightning_wd as lwd


class DecayMetrics(TrainerCallback):
    """Adds ``wd/<group>/<metric>`` to each log, measured when the Trainer logs (logging steps only)."""

    def __init__(self, decay: lwd.WeightDecay) -> None:
        self.decay = decay

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        metrics = {f"wd/{k}": v for k, v in self.decay.metrics().items()}
        logs.update(metrics)  # seen by the callbacks after this one (reporting integrations)
        if state.log_history:
            state.log_history[-1].update(metrics)  # the Trainer appended this log just before


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


def train(
    output_dir: str, *, steps: int = 5, weight_decay: float = 0.1, lr: float = 1e-3, optimizer: Any = torch.optim.AdamW
) -> tuple[Trainer, lwd.WeightDecay]:
    model = tiny_gpt2()
    optimizer = optimizer(lwd.build_param_groups(model, lwd.presets.standard(weight_decay)), lr=lr)
    decay = lwd.WeightDecay(optimizer)
    ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": ids, "labels": ids}] * (4 * steps)  # one sequence: every batch is the same
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.add_callback(DecayMetrics(decay))
    trainer.train()
    return trainer, decay


if __name__ == "__main__":
    trainer, decay = train(sys.argv[1] if len(sys.argv) > 1 else "outputs/hf_trainer")
    for log in trainer.state.log_history:
        if "loss" in log and "wd/decay/param_norm" in log:
            print(f"step {log['step']}: loss {log['loss']:.3f}  |decayed weights| {log['wd/decay/param_norm']:.4f}")
    print({g["name"]: g["weight_decay"] for g in decay.optimizer.param_groups})
