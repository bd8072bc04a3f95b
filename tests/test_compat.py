"""The private attributes of torch and Lightning that ``lightning_wd._compat`` reaches still exist.

Each accessor has a fallback for a release without the attribute; these tests make sure the installed
releases have the real thing (so a rename fails here, not silently in a fit), and that no other module
of the package reaches a private attribute of torch or Lightning itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
from lightning.fabric import Fabric
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch.utils.data import DataLoader, TensorDataset

import lightning_wd as lwd
from lightning_wd import _compat

PACKAGE = Path(lwd.__file__).parent


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_trainer_attributes_exist_and_are_read(tmp_path: Path) -> None:
    seen: list[tuple[bool, int, bool]] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            assert hasattr(trainer._logger_connector, "should_update_logs")
            assert hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped")
            assert hasattr(trainer.fit_loop, "_skip_backward")
            seen.append(
                (
                    _compat.should_update_logs(trainer),
                    _compat.batches_that_stepped(trainer),
                    _compat.backward_skipped(trainer),
                )
            )

    trainer = L.Trainer(
        max_steps=3,
        log_every_n_steps=2,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[Probe()],
    )
    data = DataLoader(TensorDataset(torch.ones(6, 2)), batch_size=2)
    trainer.fit(Tiny(), data)
    # logged at steps 2 (index 1) only; the step given to loggers counts from 0 before the increment
    assert seen == [(False, 0, False), (True, 1, False), (False, 2, False)]


def test_inner_optimizer_unwraps_lightning_and_fabric_optimizers() -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert _compat.inner_optimizer(LightningOptimizer(opt)) is opt
    fabric = Fabric(accelerator="cpu", devices=1)
    _model, fabric_opt = fabric.setup(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1))
    assert isinstance(_compat.inner_optimizer(fabric_opt), torch.optim.SGD)
    assert _compat.inner_optimizer(opt) is None


def test_the_lr_scheduler_marker_is_the_one_torch_checks() -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert getattr(opt.step, "_wrapped_by_lr_sched", False)  # torch still marks its own wrapper so


def test_a_step_pre_hook_is_moved_after_those_registered_later() -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    order: list[str] = []
    mine = opt.register_step_pre_hook(lambda *a: order.append("mine"))
    opt.register_step_pre_hook(lambda *a: order.append("later"))
    _compat.keep_step_pre_hook_last(opt, mine.id)
    opt.step()
    assert order == ["later", "mine"]
    mine.remove()
    _compat.keep_step_pre_hook_last(opt, mine.id)  # gone: nothing to move


def test_dtensor_types_are_found() -> None:
    assert _compat.DTENSOR_TYPES and _compat.REPLICATE is not None


PRIVATE = re.compile(
    r"\b(?:trainer|fit_loop|epoch_loop|strategy|optimizer|opt|inner)\._(?!_)[a-z]\w*"
    r"|\b_wrapped_by_lr_sched\b|torch\.distributed\._tensor|_logger_connector|_batches_that_stepped|_skip_backward"
    r"|[\"'.]_handle\b|\._shapes\b|[\"'.]_params\b|_fsdp_flattened|_is_flat_param"
    r"|_optimizer_step_pre_hooks"
)


def test_no_other_module_reaches_a_private_attribute_of_torch_or_lightning() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            code = re.sub(r"``[^`]*``|\b(?:self|engine)\._\w+", "", code)  # docstrings' names; our own attributes
            if PRIVATE.search(code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "reach these through lightning_wd._compat:\n" + "\n".join(offenders)
