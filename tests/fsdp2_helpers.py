"""An FSDP2-sharded model for ``ModelParallelStrategy`` runs, and an independent single-process reference.

``ShardedNet`` shards its layers with ``fully_shard`` in ``configure_model`` over the trainer's
data-parallel mesh. With 2 processes its shards are uneven (``fc1`` has 7 output rows: 4 and 3),
one is empty (``fc2`` has 1 output row: rank 1 holds none of it), and one decayed weight
(``proj.weight``) is left out of FSDP, a plain tensor replicated on every rank whose gradient is
averaged by hand. The standard preset therefore puts DTensors and a plain tensor in one group.

``reference_fit`` trains the same unsharded network in a plain loop: AdamW without weight decay,
then the decay written from DESIGN.md after each step. It never calls ``lightning_wd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

import lightning_wd as lwd
from tests.callback_helpers import loader
from tests.fsdp1_helpers import Body, _mean_abs, _norm

LR = 0.05
WD = 0.3
#: The parameters the standard preset decays (weights of linear layers), written from DESIGN.md.
DECAYED = ("net.fc1.weight", "net.fc2.weight", "net.proj.weight")
NO_DECAY = ("net.fc1.bias", "net.norm.weight", "net.norm.bias", "net.fc2.bias")
EPOCHS = 2
GLOBAL_BATCH = 8
#: The callback's arguments for each mode of :func:`reference_fit`.
CALLBACKS: dict[str, dict[str, Any]] = {
    "decoupled": dict(mode="decoupled"),
    "relative": dict(mode="relative", source="update", log_grad_norm=True, log_update_norm=True),
}


class ShardedNet(lwd.WDMixin, L.LightningModule):
    """``Body`` sharded with FSDP2 in ``configure_model``; AdamW from the mixin's standard preset."""

    show_decay_plan = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = Body()
        self.optimizer = partial(torch.optim.AdamW, lr=LR)
        self.decay_rules = lwd.presets.standard(WD)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net.fc1, self.net.norm, self.net.fc2):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh, ignored_params=set(self.net.proj.parameters()))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_after_backward(self) -> None:
        # proj is not sharded: average its gradient over the ranks as FSDP does for the others.
        grad = self.net.proj.weight.grad
        assert grad is not None
        torch.distributed.all_reduce(grad)
        grad.div_(self.trainer.world_size)


def full_parameters(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter whole, on every rank (``full_tensor()`` is a collective: call it on all ranks)."""
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.named_parameters()
    }


def reference_fit(mode: str, seed: int = 0) -> dict[str, Any]:
    """The run on one process: the DDP-equivalent global batches, AdamW, then the decay by the formula.

    ``mode`` is ``"decoupled"`` (``p <- p (1 - lr λ)``) or ``"relative"`` with ``source="update"``
    (``p <- p - lr λ m p``, ``m`` the mean absolute value of the optimizer's update over the decayed
    group). Returns the final parameters (``params``), and for the last step the L2 norms of the decayed
    group's gradients (``grad_norm``) and of its update before the decay (``update_norm``).
    """
    torch.manual_seed(seed)
    model = nn.Module()
    model.net = Body()
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    out: dict[str, Any] = {}
    for _ in range(EPOCHS):
        for x, y in loader(batch_size=GLOBAL_BATCH):
            optimizer.zero_grad()
            nn.functional.mse_loss(model.net(x), y).backward()
            before = {n: params[n].detach().clone() for n in DECAYED}
            optimizer.step()
            with torch.no_grad():
                updates = [params[n] - before[n] for n in DECAYED]
                out["grad_norm"] = _norm([params[n].grad for n in DECAYED])  # type: ignore[misc]
                out["update_norm"] = _norm(updates)
                if mode == "decoupled":
                    step = LR * WD
                elif mode == "relative":
                    step = LR * WD * _mean_abs(updates)
                else:
                    raise ValueError(f"`mode` must be 'decoupled' or 'relative', got {mode!r}.")
                for n in DECAYED:
                    params[n].mul_(1 - step)
    out["params"] = {n: p.detach().clone() for n, p in params.items()}
    return out


def group_norm(params: dict[str, Tensor], names: Sequence[str]) -> float:
    return _norm([params[n] for n in names])
