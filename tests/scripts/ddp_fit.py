"""Train WDNet with strategy="ddp" on 2 CPU processes; rank 0 saves the final parameters.

Usage: python tests/scripts/ddp_fit.py OUT.pt ROOT_DIR
"""

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

import lightning_wd as lwd
from tests.callback_helpers import InterleavedData, WDNet

if __name__ == "__main__":
    out, root = sys.argv[1], sys.argv[2]
    model = WDNet()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(root, name="csv", version=0),
        log_every_n_steps=1,
        default_root_dir=root,
        callbacks=[lwd.WeightDecayCallback(mode="relative", source="update", cautious=True)],
    )
    trainer.fit(model, datamodule=InterleavedData(batch_size=4))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gathered = {n: trainer.strategy.all_gather(p) for n, p in params.items()}
    for n, g in gathered.items():
        assert torch.equal(g[0], g[1]), f"{n} differs across ranks"
    if trainer.is_global_zero:
        torch.save(params, out)
    # Lightning leaves a gloo group alive until exit, where its threads may abort: end it cleanly.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
