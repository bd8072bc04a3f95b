"""Distributed and sharded training on CPU.

* DDP (``ddp_spawn`` over gloo) with 2 and 3 processes and an uneven dataset: Lightning's
  ``DistributedSampler`` shuffles and pads the last samples by repeating the first ones, so the
  single-process reference is fed exactly the global batches the ranks see together
  (``ddp_global_batches``, written here from the sampler's documented algorithm). Parameters end equal on every rank and
  equal to the reference.
* Every rank performs the same collectives in the same order while the callback logs on only some
  steps (on rank zero): ``torch.distributed``'s collectives are wrapped in each child by a callback's
  ``setup`` and the per-rank sequences compared at the end. A short process-group timeout turns a
  mismatch (a collective on one rank only) into an error rather than a hang.
* ``ModelParallelStrategy`` with FSDP2 ``fully_shard`` (DTensor parameters) works: a real
  ``Trainer.fit`` on one process here (a one-rank mesh: DTensors and collectives all the same), matched
  against the single-process reference of ``tests.fsdp2_helpers``; the 2-process run is in
  ``tests/test_sharded.py``.
* FSDP1 with flat parameters (``use_orig_params=False``) and DeepSpeed are refused at fit start; FSDP1
  with its default ``use_orig_params=True`` is accepted (its runs are in ``tests/test_fsdp1.py``).
  Lightning does not run them on CPU (or without the ``deepspeed`` package), so the checks go through
  ``WeightDecayCallback.setup`` with a trainer stand-in holding a real strategy object.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import lightning_wd as lwd
from tests.callback_helpers import CleanDistributedExit, WDNet, loader, make_data
from tests.test_callback_ddp import CheckAcrossRanks

N = 37  # not divisible by world_size * batch for 2 or 3 processes
BATCH = 4  # per rank
CB_KWARGS = dict(mode="relative", source="update", cautious=True)


def ddp_global_batches(n: int, world: int, batch: int, epoch: int, seed: int) -> list[list[int]]:
    """Global batch k of a DDP run in ``epoch``: batch k of every rank.

    Lightning always gives the training loader a ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED
    or 0, drop_last=False)``, written here from its documented algorithm: a permutation of ``range(n)``
    drawn with seed ``seed + epoch``, padded with its first indices to a multiple of ``world``, then every
    ``world``-th index from ``rank``.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    indices += indices[: total - n]
    per_rank = [indices[r:total:world] for r in range(world)]
    length = len(per_rank[0])
    return [[i for r in range(world) for i in per_rank[r][k : k + batch]] for k in range(0, length, batch)]


def _seed() -> int:
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class GlobalBatches:
    """The batch sampler of the single-process reference: the DDP run's global batches, epoch by epoch."""

    def __init__(self, n: int, world: int, batch: int) -> None:
        self.n, self.world, self.batch, self.epoch = n, world, batch, 0
        self.sampler = self  # Lightning calls `batch_sampler.sampler.set_epoch(epoch)` at every epoch start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        return iter(ddp_global_batches(self.n, self.world, self.batch, self.epoch, _seed()))

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.world) / self.batch)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_global_batches_follow_the_distributed_sampler(world, epoch):
    """The reference's batches are the union of what DistributedSampler hands each rank (checked directly)."""
    from torch.utils.data.distributed import DistributedSampler

    per_rank = []
    for rank in range(world):
        sampler = DistributedSampler(list(range(N)), world, rank, shuffle=True, seed=_seed())
        sampler.set_epoch(epoch)
        per_rank.append(list(DataLoader(list(range(N)), batch_size=BATCH, sampler=sampler)))
    assert len({len(p) for p in per_rank}) == 1  # the same number of batches on every rank (padded)
    expected = [[int(i) for r in range(world) for i in per_rank[r][k]] for k in range(len(per_rank[0]))]
    assert ddp_global_batches(N, world, BATCH, epoch, _seed()) == expected
    assert sum(len(b) for b in expected) > N  # uneven: some samples repeat


def _trainer(root: Path, **kw: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    options.update(kw)
    return L.Trainer(**options)


def single_process_reference(root: Path, world: int) -> dict[str, torch.Tensor]:
    model = WDNet()
    data = DataLoader(make_data(N), batch_sampler=GlobalBatches(N, world, BATCH))
    t = _trainer(root, devices=1, logger=False, callbacks=[lwd.WeightDecayCallback(**CB_KWARGS)])
    t.fit(model, data)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)


class CollectiveRecorder(L.Callback):
    """In each child: record every ``torch.distributed`` collective (name, step), then compare ranks."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.calls: list[tuple[str, int]] = []
        self.originals: dict[str, Any] = {}
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self.originals[name] = original

            def wrapper(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                self.calls.append((_name, trainer.global_step))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
            if getattr(c10d, name, None) is original:
                setattr(c10d, name, wrapper)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("probe")  # the wrappers see Lightning's own collectives
        assert ("barrier", 0) in self.calls, self.calls

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        calls = list(self.calls)
        for name, original in self.originals.items():
            setattr(dist, name, original)
            if hasattr(c10d, name):
                setattr(c10d, name, original)
        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, calls)
        for rank, sequence in enumerate(gathered):
            assert sequence == gathered[0], f"rank {rank} ran collectives {sequence}, rank 0 ran {gathered[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [3])  # 3 ranks: uneven shards; 2 ranks run in the other DDP tests
def test_ddp_uneven_data_matches_single_process_and_ranks_agree_on_collectives(tmp_path, world):
    reference = single_process_reference(tmp_path / "single", world)
    ref_path = tmp_path / "reference.pt"
    torch.save(reference, ref_path)
    logger = CSVLogger(tmp_path, name="ddp", version=0)
    t = _trainer(
        tmp_path,
        devices=world,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=120)),
        logger=logger,
        log_every_n_steps=2,
        callbacks=[
            lwd.WeightDecayCallback(**CB_KWARGS),
            CheckAcrossRanks(str(ref_path)),
            CollectiveRecorder(),
            CleanDistributedExit(),
        ],
    )
    t.fit(WDNet(), loader(n=N, batch_size=BATCH))
    steps = 2 * len(GlobalBatches(N, world, BATCH))
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header, body = rows[0].split(","), [r.split(",") for r in rows[1:]]
    column = header.index("wd/decay/param_norm")
    logged_steps = [int(r[header.index("step")]) for r in body if r[column]]
    assert logged_steps == [s for s in range(steps) if (s + 1) % 2 == 0]  # only some steps, as configured
    norm = math.sqrt(sum(float(reference[n].double().pow(2).sum()) for n in ("net.fc1.weight", "net.fc2.weight")))
    assert float(body[[i for i, r in enumerate(body) if r[column]][-1]][column]) == pytest.approx(norm, rel=1e-5)


# ---------------------------------------------------------------- ModelParallelStrategy (FSDP2) works
class _AssertSharded(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        params = dict(pl_module.named_parameters())
        assert all(isinstance(params[n], DTensor) for n in ("net.fc1.weight", "net.norm.weight", "net.fc2.weight"))
        assert not isinstance(params["net.proj.weight"], DTensor)


@pytest.fixture
def own_process_group():
    """A one-process fit here initializes a process group in this process, whose store may keep listening
    on its port: give it a port of its own (not the MASTER_PORT that a ``ddp_spawn`` test left in the
    environment for later ones), and afterwards destroy the group and restore the environment."""
    environ = dict(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("mode", ["decoupled", "relative"])
def test_model_parallel_strategy_with_fully_shard_matches_reference(tmp_path, mode, own_process_group):
    """One process (FSDP2 over a one-rank mesh): the decay and the logged norms match the reference."""
    from tests.fsdp2_helpers import CALLBACKS, DECAYED, EPOCHS, GLOBAL_BATCH, ShardedNet, group_norm, reference_fit

    model = ShardedNet()
    logger = CSVLogger(tmp_path, name="csv", version=0)
    t = _trainer(
        tmp_path,
        devices=1,
        strategy=ModelParallelStrategy(),
        use_distributed_sampler=False,
        max_epochs=EPOCHS,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[lwd.WeightDecayCallback(**CALLBACKS[mode]), _AssertSharded()],
    )
    t.fit(model, loader(batch_size=GLOBAL_BATCH))
    reference = reference_fit(mode)
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters()}
    for name, value in reference["params"].items():
        torch.testing.assert_close(
            params[name].detach(), value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    logged = float(last[header.index("wd/decay/param_norm")])
    assert logged == pytest.approx(group_norm(reference["params"], DECAYED), rel=1e-5)
    if mode == "relative":
        assert float(last[header.index("wd/decay/update_norm")]) == pytest.approx(reference["update_norm"], rel=1e-4)


@pytest.mark.parametrize(
    ("sharded", "is_global_zero", "should_update_logs", "measures"),
    [
        (False, True, True, True),  # replicated parameters: rank zero measures alone, with no collective
        (False, False, True, False),
        (True, True, True, True),  # sharded parameters: every rank takes part in the norms' collectives
        (True, False, True, True),
        (True, False, False, False),  # never on steps that are not logged
        (False, True, False, False),
    ],
)
def test_which_ranks_measure_the_norms(sharded, is_global_zero, should_update_logs, measures):
    cb = lwd.WeightDecayCallback()
    cb._trainer = SimpleNamespace(  # type: ignore[assignment]
        loggers=[object()],
        is_global_zero=is_global_zero,
        _logger_connector=SimpleNamespace(should_update_logs=should_update_logs),
    )
    cb.engines = [SimpleNamespace(sharded=sharded)]  # type: ignore[list-item]
    assert cb._logging_step() is measures


def test_lightning_refuses_fsdp_on_cpu_before_our_callback():
    """Why FSDP is checked through ``setup`` below: Lightning itself refuses FSDP on CPU (if this ever
    changes, switch the FSDP check to a real ``Trainer.fit``)."""
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=1, strategy=FSDPStrategy(), callbacks=[lwd.WeightDecayCallback()])


class MyFSDP(FSDPStrategy):
    """A user's subclass is refused too."""


def _never_started(cls: type) -> Any:
    """A real strategy instance whose ``__init__`` never ran (DeepSpeed's needs the ``deepspeed`` package)."""
    return cls.__new__(cls)


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        (
            FSDPStrategy(use_orig_params=False),
            r"`strategy`=FSDPStrategy with use_orig_params=False: FSDP then trains flat parameters.*Leave"
            r" `use_orig_params` at its default, True",
        ),
        (MyFSDP(use_orig_params=False), r"`strategy`=MyFSDP with use_orig_params=False"),
        (
            _never_started(DeepSpeedStrategy),
            r"`strategy`=DeepSpeedStrategy: DeepSpeed steps its own fp32 master partitions.*drop this callback and"
            r" let DeepSpeed's optimizer apply each group's own weight_decay.*or train with strategy='fsdp'",
        ),
    ],
    ids=["fsdp-flat-parameters", "fsdp-subclass-flat-parameters", "deepspeed"],
)
def test_fsdp1_flat_parameters_and_deepspeed_are_refused_in_setup(strategy, match):
    """``setup`` is the first hook of a fit (before ``configure_optimizers`` and any step): it refuses
    the strategy with the reason and the alternative."""
    cb = lwd.WeightDecayCallback()
    stand_in = SimpleNamespace(strategy=strategy)  # setup reads only the strategy
    with pytest.raises(MisconfigurationException, match=match):
        cb.setup(stand_in, WDNet(), "fit")  # type: ignore[arg-type]
    cb.setup(stand_in, WDNet(), "validate")  # evaluation never decays: nothing to refuse


class MyModelParallel(ModelParallelStrategy):
    """A user's subclass of an accepted strategy."""


@pytest.mark.parametrize("strategy", [ModelParallelStrategy, MyModelParallel, DDPStrategy, FSDPStrategy, MyFSDP])
def test_model_parallel_fsdp_and_ddp_are_accepted_in_setup(strategy):
    cb = lwd.WeightDecayCallback()
    cb.setup(SimpleNamespace(strategy=_never_started(strategy)), WDNet(), "fit")  # type: ignore[arg-type]
