"""Real multi-process DDP on CPU (gloo): ``ddp_spawn`` inside pytest and a ``ddp`` script in a subprocess."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_wd as lwd
from tests.callback_helpers import CleanDistributedExit, InterleavedData, WDNet, loader
from tests.helpers import run_script

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
CB_KWARGS = dict(mode="relative", source="update", cautious=True)


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kw,
    )


def single_process_reference(tmp_path: Path) -> dict[str, torch.Tensor]:
    model = WDNet()
    t = _trainer(tmp_path / "single", devices=1, logger=False, callbacks=[lwd.WeightDecayCallback(**CB_KWARGS)])
    t.fit(model, loader(batch_size=GLOBAL_BATCH))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class CheckAcrossRanks(L.Callback):
    """Runs in every child process: parameters equal on all ranks and to the single-process run."""

    def __init__(self, reference_path: str) -> None:
        self.reference_path = reference_path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reference = torch.load(self.reference_path, weights_only=True)
        for name, p in pl_module.named_parameters():
            gathered = trainer.strategy.all_gather(p.detach())
            assert gathered.shape[0] == trainer.world_size
            for rank in range(1, trainer.world_size):
                assert torch.equal(gathered[rank], gathered[0]), f"{name} differs on rank {rank}"
            torch.testing.assert_close(p.detach(), reference[name], rtol=1e-5, atol=1e-6)


def _last_logged_norm(log_dir: Path) -> float:
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    return float([r for r in rows if r.get("wd/decay/param_norm")][-1]["wd/decay/param_norm"])


def _norm(params: dict[str, torch.Tensor], names: list[str]) -> float:
    return math.sqrt(sum(float(params[n].double().pow(2).sum()) for n in names))


def test_ddp_spawn_matches_single_process(tmp_path):
    reference = single_process_reference(tmp_path)
    ref_path = tmp_path / "reference.pt"
    torch.save(reference, ref_path)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="ddp", version=0)
    t = _trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[lwd.WeightDecayCallback(**CB_KWARGS), CheckAcrossRanks(str(ref_path)), CleanDistributedExit()],
    )
    t.fit(WDNet(), datamodule=InterleavedData(batch_size=GLOBAL_BATCH // 2))
    logged = _last_logged_norm(Path(logger.log_dir))
    assert logged == pytest.approx(_norm(reference, ["net.fc1.weight", "net.fc2.weight"]), rel=1e-5)


def test_ddp_script_in_subprocess(tmp_path):
    reference = single_process_reference(tmp_path)
    out = tmp_path / "ddp_params.pt"
    run_script("ddp_fit.py", str(out), str(tmp_path / "run"), cwd=tmp_path)
    ddp = torch.load(out, weights_only=True)
    for name, value in reference.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6)
    logged = _last_logged_norm(tmp_path / "run" / "csv" / "version_0")
    assert logged == pytest.approx(_norm(reference, ["net.fc1.weight", "net.fc2.weight"]), rel=1e-5)
