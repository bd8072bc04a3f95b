"""Lightning Fabric: the engine after ``fabric.setup`` decays by the formula and logs through Fabric's logger;
``Fabric(callbacks=[WeightDecayCallback()])`` refuses to do nothing, with the recipe.

The reference is a plain loop over the documented decoupled formula (SGD without momentum, so the
optimizer's own update is ``-lr * grad``), never through ``lightning_wd``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_wd as lwd
from tests.callback_helpers import LR, WD, Net, make_data
from tests.helpers import run_script


def _setup(fabric: Fabric) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.SGD(lwd.build_param_groups(net, lwd.presets.standard(WD)), lr=LR)
    return fabric.setup(net, optimizer)


def test_the_engine_under_fabric_decays_by_the_formula_and_logs_through_fabric(tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(tmp_path, name="csv"))
    model, optimizer = _setup(fabric)
    decay = lwd.WeightDecay(optimizer)  # Fabric's optimizer wrapper is unwrapped
    data = make_data()
    for step in range(4):
        x, y = data.tensors[0][step * 8 : (step + 1) * 8], data.tensors[1][step * 8 : (step + 1) * 8]
        optimizer.zero_grad()
        fabric.backward(nn.functional.mse_loss(model(x), y))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        for n, p in model.named_parameters():
            expected = before[n] - LR * grads[n]
            if n.endswith(("fc1.weight", "fc2.weight")):
                expected = expected * (1 - LR * WD)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=n)
        fabric.log_dict({f"wd/{k}": v for k, v in decay.metrics().items()}, step=step)
    fabric.logger.finalize("success")
    rows = list(csv.DictReader((Path(fabric.logger.log_dir) / "metrics.csv").open()))
    assert [float(r["wd/decay/weight_decay"]) for r in rows] == [WD] * 4
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    norm = torch.sqrt(sum(w.detach().double().pow(2).sum() for w in weights))
    assert float(rows[-1]["wd/decay/param_norm"]) == pytest.approx(float(norm), rel=1e-6)


def test_the_callback_passed_to_fabric_refuses_to_do_nothing_and_gives_the_recipe():
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lwd.WeightDecayCallback()])
    model, optimizer = _setup(fabric)
    x, y = make_data().tensors
    fabric.backward(nn.functional.mse_loss(model(x[:8]), y[:8]))
    with pytest.raises(MisconfigurationException, match=r"Fabric\(callbacks=.*lwd\.WeightDecay\(optimizer\)"):
        optimizer.step()


@pytest.mark.slow
def test_the_engine_under_fabric_ddp_on_two_processes_matches_one_process(tmp_path):
    """The script checks (on rank 0) the parameters against a single-process loop and the logged norm."""
    result = run_script("fabric_ddp.py", str(tmp_path / "run"), cwd=tmp_path)
    assert "fabric_ddp OK: 5 steps on 2 processes" in result.stdout, result.stdout[-3000:]
