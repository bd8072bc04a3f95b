"""Train a WDMixin module with Lightning's FSDPStrategy (FSDP1) on 2 CPU processes and check the result.

Usage: python tests/scripts/fsdp1_fit.py MODE ROOT_DIR, MODE "decoupled" or "relative".

Lightning runs ``FSDPStrategy`` on GPUs only, by a check that tests ``type(strategy) is FSDPStrategy``;
``CPUFSDPStrategy`` is a subclass that changes one argument of the strategy's wrapping call (FSDP1's
``device_id``, which must be ``torch.device("cpu")`` on CPU), so the strategy's code runs as on a GPU:
it wraps the LightningModule itself in ``FullyShardedDataParallel`` (``use_orig_params=True``, one
unit per ``nn.Linear``) before ``configure_optimizers``, over gloo. The strategy launches the second process by
re-running this script. Each rank checks at train start that WDMixin's groups hold the planned
tensors, as flattened views; after the fit every rank gathers the full parameters, and rank 0
compares them with the single-process reference (``tests.fsdp2_helpers.reference_fit``, the same
network and batches) and the logged norms with norms of the gathered parameters, prints
``fsdp1_fit OK`` and exits 0, or fails an assertion and exits non-zero.
"""

import csv
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel

import lightning_wd as lwd
from tests.callback_helpers import CleanDistributedExit, InterleavedData, make_data
from tests.fsdp2_helpers import (
    CALLBACKS,
    DECAYED,
    EPOCHS,
    GLOBAL_BATCH,
    LR,
    NO_DECAY,
    WD,
    Body,
    group_norm,
    reference_fit,
)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, with the CPU as FSDP's device (see the module's notes)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # Lightning's own call, but FSDP1 needs `device_id=torch.device("cpu")` on CPU, where Lightning passes
        # the device's index (None).
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class FSDP1Net(lwd.WDMixin, L.LightningModule):
    """``Body`` with AdamW from the mixin's standard preset; the strategy shards it (one unit per Linear)."""

    show_decay_plan = False

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Body()
        self.optimizer = partial(torch.optim.AdamW, lr=LR)
        self.decay_rules = lwd.presets.standard(WD)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


class CheckGroups(L.Callback):
    """In every process: the module is wrapped, its tensors are flat views, and WDMixin's groups are the plan's."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(trainer.strategy.model, FullyShardedDataParallel)
        assert pl_module.net.fc1.weight.dim() == 1, pl_module.net.fc1.weight.shape  # a shard, flattened
        names = {g["name"]: (g["weight_decay"], tuple(g["param_names"])) for g in trainer.optimizers[0].param_groups}
        assert names == {"no_decay": (0.0, NO_DECAY), "decay": (WD, DECAYED)}, names


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    model = FSDP1Net()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(auto_wrap_policy={nn.Linear}, timeout=timedelta(seconds=60)),
        use_distributed_sampler=False,
        max_epochs=EPOCHS,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(root, name="csv", version=0),
        log_every_n_steps=1,
        default_root_dir=root,
        callbacks=[lwd.WeightDecayCallback(**CALLBACKS[mode]), CheckGroups()],
    )
    trainer.fit(model, datamodule=InterleavedData(batch_size=GLOBAL_BATCH // 2))
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
        params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}
    if trainer.is_global_zero:
        reference = reference_fit(mode)
        for name, value in reference["params"].items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        rows = list(csv.DictReader((root / "csv" / "version_0" / "metrics.csv").open()))
        logged = [r for r in rows if r.get("wd/decay/param_norm")]
        steps = EPOCHS * len(make_data()) // GLOBAL_BATCH
        assert [int(r["step"]) for r in logged] == list(range(steps)), "not logged at every step"
        last = logged[-1]
        for group, names in (("decay", DECAYED), ("no_decay", NO_DECAY)):
            value, expected = float(last[f"wd/{group}/param_norm"]), group_norm(params, names)
            assert abs(value - expected) <= 1e-5 * expected, f"{group} param_norm {value} != {expected}"
        if mode == "relative":
            for metric in ("grad_norm", "update_norm"):
                value, expected = float(last[f"wd/decay/{metric}"]), reference[metric]
                assert abs(value - expected) <= 1e-4 * expected, f"{metric} {value} != {expected}"
        print(f"fsdp1_fit OK: mode={mode}, {len(logged)} logged steps, final param_norm {last['wd/decay/param_norm']}")
    CleanDistributedExit().teardown(trainer, model, "fit")
