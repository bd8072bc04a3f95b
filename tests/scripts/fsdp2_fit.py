"""Train the FSDP2-sharded ShardedNet with ModelParallelStrategy on 2 CPU processes and check the result.

Usage: python tests/scripts/fsdp2_fit.py MODE ROOT_DIR [PHASE], MODE "decoupled" or "relative".

PHASE "first" trains the first epoch only and saves a sharded (distributed) checkpoint directory,
``ROOT_DIR/sharded``; PHASE "resume" resumes from it to the end. Either way the end state must be
the single-process reference of the whole run: a resume from the sharded checkpoint keeps λ.

``ModelParallelStrategy`` launches the second process by re-running this script. After the fit every
rank gathers the full parameters; rank 0 compares them with the single-process reference
(``tests.fsdp2_helpers.reference_fit``) and the logged norms with norms of the gathered parameters,
prints ``fsdp2_fit OK`` and exits 0, or fails an assertion and exits non-zero.
"""

import csv
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

import lightning_wd as lwd
from tests.callback_helpers import InterleavedData, make_data
from tests.fsdp2_helpers import (
    CALLBACKS,
    DECAYED,
    EPOCHS,
    GLOBAL_BATCH,
    NO_DECAY,
    WD,
    ShardedNet,
    full_parameters,
    group_norm,
    reference_fit,
)


class CheckShards(L.Callback):
    """In every process: the parameters are sharded as planned, and the groups mix DTensors and plain tensors."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        rows = {"net.fc1.weight": [4, 3], "net.fc2.weight": [1, 0], "net.fc2.bias": [1, 0]}
        for name, per_rank in rows.items():
            p = params[name]
            assert isinstance(p, DTensor), f"{name} is not sharded"
            assert p.to_local().shape[0] == per_rank[trainer.global_rank], (name, p.to_local().shape)
        assert not isinstance(params["net.proj.weight"], DTensor)
        # λ is each group's own weight_decay, also right after a resume from a sharded checkpoint
        wds = {g["name"]: g["weight_decay"] for g in trainer.optimizers[0].param_groups}
        assert wds == {"no_decay": 0.0, "decay": WD}, wds


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    phase = sys.argv[3] if len(sys.argv) > 3 else "whole"
    model = ShardedNet()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60)),
        use_distributed_sampler=False,
        max_epochs=1 if phase == "first" else EPOCHS,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(root, name="csv", version=0),
        log_every_n_steps=1,
        default_root_dir=root,
        callbacks=[lwd.WeightDecayCallback(**CALLBACKS[mode]), CheckShards()],
    )
    ckpt = str(root / "sharded") if phase == "resume" else None
    trainer.fit(model, datamodule=InterleavedData(batch_size=GLOBAL_BATCH // 2), ckpt_path=ckpt)
    if phase == "first":
        trainer.save_checkpoint(root / "sharded")  # ModelParallelStrategy's default: a directory of shards
        assert (root / "sharded").is_dir()
        print("fsdp2_fit OK: first epoch saved")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.exit(0)
    params = full_parameters(model)
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, params["net.proj.weight"])
    assert torch.equal(gathered[0], gathered[1]), "the replicated proj.weight differs across ranks"
    if trainer.is_global_zero:
        reference = reference_fit(mode)
        for name, value in reference["params"].items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        rows = list(csv.DictReader((root / "csv" / "version_0" / "metrics.csv").open()))
        logged = [r for r in rows if r.get("wd/decay/param_norm")]
        steps = EPOCHS * len(make_data()) // GLOBAL_BATCH
        first = steps // EPOCHS if phase == "resume" else 0
        assert [int(r["step"]) for r in logged] == list(range(first, steps)), "not logged at every step"
        last = logged[-1]
        for group, names in (("decay", DECAYED), ("no_decay", NO_DECAY)):
            value, expected = float(last[f"wd/{group}/param_norm"]), group_norm(params, names)
            assert abs(value - expected) <= 1e-5 * expected, f"{group} param_norm {value} != {expected}"
        if mode == "relative":
            for metric in ("grad_norm", "update_norm"):
                value, expected = float(last[f"wd/decay/{metric}"]), reference[metric]
                assert abs(value - expected) <= 1e-4 * expected, f"{metric} {value} != {expected}"
        print(f"fsdp2_fit OK: mode={mode}, {len(logged)} logged steps, final param_norm {last['wd/decay/param_norm']}")
    # Lightning leaves a gloo group alive until exit, where its threads may abort: end it cleanly.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
