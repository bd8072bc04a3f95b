"""The callback on a CUDA device: numerics, AMP overflow, and no host sync in the step path.

Marked ``cuda`` and skipped without a CUDA device; run them on a GPU machine.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import pytest
import torch

import lightning_wd as lwd
from tests.callback_helpers import DECAYED, WD, StepRecorder, WDNet, loader

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

WDS = dict.fromkeys(DECAYED, WD)


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cuda",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


@pytest.mark.parametrize(
    "config",
    [
        dict(mode="decoupled"),
        dict(mode="relative", source="update", cautious=True),
        dict(mode="lr_ratio", ord=1),
        dict(mode="decoupled", cautious=True, fused=True),
    ],
    ids=["decoupled", "relative-update-cautious", "lr_ratio-L1", "cautious-fused"],
)
def test_modes_match_reference_on_cuda(tmp_path, config):
    recorder = StepRecorder(WDS, **config)
    _trainer(tmp_path, [lwd.WeightDecayCallback(**config), recorder]).fit(WDNet(), loader())
    assert recorder.checked == 5


class SyncGuard(L.Callback):
    """Turns CUDA sync detection to "error" from just before the optimizer step until just after the decay."""

    def __init__(self) -> None:
        self.guarded = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered after WeightDecayCallback's hook, so it runs after the decay.
        trainer.optimizers[0].register_step_post_hook(self._release)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def _release(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self.guarded += 1


@pytest.mark.parametrize(
    "config",
    [dict(mode="decoupled"), dict(mode="relative", source="grad"), dict(mode="independent", cautious=True, ord=1)],
    ids=["decoupled", "relative-grad", "independent-cautious-L1"],
)
def test_step_path_does_not_sync(tmp_path, config):
    guard = SyncGuard()
    model = WDNet(optimizer=partial(torch.optim.SGD, lr=0.1, foreach=True))
    try:
        _trainer(tmp_path, [lwd.WeightDecayCallback(**config), guard]).fit(model, loader())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.guarded == 5


def test_fused_adamw_16_mixed_overflow_on_cuda(tmp_path):
    nan_at = 2
    model = WDNet(optimizer=partial(torch.optim.AdamW, lr=1e-2, fused=True), nan_at=(nan_at,))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[batch_idx] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            same = all(torch.equal(p, seen[batch_idx][n]) for n, p in pl_module.named_parameters())
            assert same == (batch_idx == nan_at), batch_idx

    _trainer(tmp_path, [lwd.WeightDecayCallback(mode="independent"), Watch()], precision="16-mixed").fit(
        model, loader()
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
