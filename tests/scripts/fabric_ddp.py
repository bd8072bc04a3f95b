"""Train Net under Lightning Fabric's ``ddp`` on 2 CPU processes with ``lwd.WeightDecay``; check it on rank 0.

Usage: python tests/scripts/fabric_ddp.py ROOT_DIR

Fabric launches the second process by re-running this script. Each rank takes every other sample of
each batch of 8, so the averaged gradients are those of the whole batch. Rank 0 replays the run in a
plain single-process loop (SGD without decay, then ``p <- p (1 - lr λ)`` on the weight matrices, by
hand) and compares the parameters and the metrics logged through ``fabric.log_dict``; it prints
``fabric_ddp OK`` and exits 0, or fails an assertion and exits non-zero.
"""

import copy
import csv
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from torch import nn

import lightning_wd as lwd
from tests.callback_helpers import LR, WD, Net, make_data

STEPS = 5
DECAYED = ("fc1.weight", "fc2.weight")


def reference(start: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(start)
    for step in range(STEPS):
        net.zero_grad()
        nn.functional.mse_loss(net(x[step * 8 : (step + 1) * 8]), y[step * 8 : (step + 1) * 8]).backward()
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.sub_(LR * p.grad)
                if n in DECAYED:
                    p.mul_(1 - LR * WD)
    return {n: p.detach() for n, p in net.named_parameters()}


if __name__ == "__main__":
    root = Path(sys.argv[1])
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", loggers=CSVLogger(root, name="csv", version=0))
    fabric.launch()
    torch.manual_seed(0)
    net = Net()
    start = copy.deepcopy(net)
    model, optimizer = fabric.setup(net, torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR))
    decay = lwd.WeightDecay(optimizer)
    x, y = make_data().tensors
    for step in range(STEPS):
        batch = slice(step * 8 + fabric.global_rank, (step + 1) * 8, 2)
        optimizer.zero_grad()
        fabric.backward(nn.functional.mse_loss(model(x[batch]), y[batch]))
        optimizer.step()
        fabric.log_dict({f"wd/{k}": v for k, v in decay.metrics().items()}, step=step)  # rank zero writes
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    for n, p in params.items():
        gathered = fabric.all_gather(p)
        assert torch.equal(gathered[0], gathered[1]), f"{n} differs across ranks"
    if fabric.global_rank == 0:
        fabric.logger.finalize("success")
        expected = reference(start, x, y)
        for n, p in params.items():
            torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        rows = list(csv.DictReader((root / "csv" / "version_0" / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == list(range(STEPS)), rows
        norm = torch.sqrt(sum(expected[n].double().pow(2).sum() for n in DECAYED))
        logged = float(rows[-1]["wd/decay/param_norm"])
        assert abs(logged - float(norm)) <= 1e-5 * float(norm), (logged, float(norm))
        print(f"fabric_ddp OK: {STEPS} steps on 2 processes, param_norm {logged:.6f}")
    fabric.barrier()
    torch.distributed.destroy_process_group()
