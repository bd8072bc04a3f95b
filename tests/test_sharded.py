"""Sharded (DTensor) tensors and parameters on CPU, 2 processes over gloo.

* ``lightning_wd.functional`` in 2 processes started by ``torch.multiprocessing.spawn``: norms and
  means over lists mixing ``Shard(0)`` DTensors with uneven shards, a shard that is empty on one rank,
  ``Shard(1)``, a float64 DTensor, ``Replicate`` DTensors, plain tensors, DTensors on a 2-D mesh and a
  ``Partial`` DTensor equal, on every rank, the plain-loop reference over the full tensors, with one
  ``all_reduce`` per sharded mesh dimension of each group of tensors sharing a mesh and sharded mesh
  dimensions (never one per tensor); the decay kernels applied to local shards give the reference on
  the full tensors.
* ``WeightDecayCallback`` under ``ModelParallelStrategy`` with FSDP2 ``fully_shard`` on 2 processes:
  ``tests/scripts/fsdp2_fit.py`` in a subprocess (the strategy re-runs ``sys.argv`` to start the
  second process), compared with the single-process reference of ``tests.fsdp2_helpers``.

References are computed here from the documented formulas, with plain Python loops over the
elements of the full tensors, never through ``lightning_wd``.
"""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from typing import Any

import pytest
import torch
from torch import Tensor

import lightning_wd as lwd
from tests.helpers import run_script

pytestmark = pytest.mark.slow

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- references (plain loops over the elements)
def _values(tensors: list[Tensor]) -> list[float]:
    return [float(x) for t in tensors for x in t.double().flatten().tolist()]


def ref_norm(tensors: list[Tensor], ord: float) -> float:
    values = [abs(v) for v in _values(tensors)]
    if ord == math.inf:
        return max(values)
    return sum(v**ord for v in values) ** (1.0 / ord)


def ref_mean_abs(tensors: list[Tensor]) -> float:
    values = _values(tensors)
    return sum(abs(v) for v in values) / len(values)


def ref_rms(tensors: list[Tensor]) -> float:
    values = _values(tensors)
    return math.sqrt(sum(v * v for v in values) / len(values))


def ref_decay(full: Tensor, step: float, ord: int, mask: Tensor | None) -> Tensor:
    out = full.clone().flatten()
    m = mask.flatten().tolist() if mask is not None else [1.0] * out.numel()
    for i, x in enumerate(full.flatten().tolist()):
        if not m[i]:
            continue
        out[i] = x * (1 - step) if ord == 2 else math.copysign(max(abs(x) - step, 0.0), x) if x else 0.0
    return out.view_as(full)


def ref_cautious(after: Tensor, before: Tensor) -> Tensor:
    pairs = zip(after.flatten().tolist(), before.flatten().tolist(), strict=True)
    return torch.tensor([1.0 if (a - b) * b < 0 else 0.0 for a, b in pairs], dtype=after.dtype).view_as(after)


def _close(value: Tensor, expected: float, what: str) -> None:
    assert type(value) is Tensor and value.dim() == 0 and value.dtype == torch.float32, (what, type(value), value)
    assert math.isclose(float(value), expected, rel_tol=1e-6, abs_tol=1e-7), f"{what}: {float(value)} != {expected}"


# ---------------------------------------------------------------- the functional kernels, in 2 spawned processes
def _full_tensors() -> dict[str, Tensor]:
    """The same full tensors on every rank."""
    g = torch.Generator().manual_seed(0)
    full = {
        "uneven": torch.randn(3, 4, generator=g),  # Shard(0): 2 rows on rank 0, 1 on rank 1
        "empty": torch.randn(1, 5, generator=g),  # Shard(0): rank 1's shard is empty
        "columns": torch.randn(5, 3, generator=g),  # Shard(1): 2 columns and 1
        "float64": torch.randn(3, generator=g, dtype=torch.float64),  # Shard(0)
        "replicated": torch.randn(2, 2, generator=g),  # Replicate()
        "plain": torch.randn(4, generator=g),  # a plain tensor, the same on every rank
        "2d-outer": torch.randn(3, 2, generator=g),  # 2-D mesh (2, 1): (Shard(0), Replicate())
        "2d-inner": torch.randn(2, 3, generator=g),  # 2-D mesh (2, 1): (Replicate(), Shard(0)), whole on every rank
    }
    full["columns"][0, 2] = -10.0  # the largest |x| lies in rank 1's shard only
    return full


def _distribute(full: dict[str, Tensor]) -> dict[str, Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))
    placements: dict[str, tuple[Any, list[Any]]] = {
        "uneven": (mesh, [Shard(0)]),
        "empty": (mesh, [Shard(0)]),
        "columns": (mesh, [Shard(1)]),
        "float64": (mesh, [Shard(0)]),
        "replicated": (mesh, [Replicate()]),
        "2d-outer": (mesh2, [Shard(0), Replicate()]),
        "2d-inner": (mesh2, [Replicate(), Shard(0)]),
    }
    # (clones: distribute_tensor may keep the tensor it is given as the local tensor of a replica)
    return {n: distribute_tensor(t.clone(), *placements[n]) if n in placements else t.clone() for n, t in full.items()}


class _CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls (what ``lightning_wd.functional`` reduces with)."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> _CountAllReduce:
        import torch.distributed as dist

        self.original = dist.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        dist.all_reduce = self.original


def _check_norms(rank: int) -> None:
    from torch.distributed.tensor import DTensor, Partial

    from lightning_wd import functional as F

    full = _full_tensors()
    dt = _distribute(full)
    assert dt["empty"].to_local().numel() == (5 if rank == 0 else 0)
    assert dt["uneven"].to_local().shape[0] == (2 if rank == 0 else 1)
    assert dt["columns"].to_local().shape[1] == (2 if rank == 0 else 1)

    one_mesh = ["uneven", "empty", "columns", "float64", "replicated", "plain"]
    cases = {
        **{name: [name] for name in full},
        "one mesh, mixed": one_mesh,
        "everything": list(full),
    }
    for case, names in cases.items():
        tensors, fulls = [dt[n] for n in names], [full[n] for n in names]
        for ord in (1.0, 2.0, math.inf):
            _close(F.global_norm(tensors, ord), ref_norm(fulls, ord), f"global_norm({case}, ord={ord})")
        _close(F.mean_abs(tensors), ref_mean_abs(fulls), f"mean_abs({case})")
        _close(F.rms(tensors), ref_rms(fulls), f"rms({case})")
        _close(F.mean_abs(tensors, numel=sum(t.numel() for t in fulls)), ref_mean_abs(fulls), f"mean_abs({case})")

    # Few collectives: one per sharded mesh dimension of each (mesh, sharded dimensions) group, never one per tensor:
    # the 1-D mesh's Shard(0) and Shard(1) tensors share one; the 2-D mesh adds one for each of its two groups.
    for names, expected in ((one_mesh, 1), (list(full), 3), (["replicated", "plain", "2d-inner"], 1)):
        with _CountAllReduce() as count:
            F.global_norm([dt[n] for n in names])
        assert count.calls == expected, (names, count.calls, expected)
    with _CountAllReduce() as count:
        F.global_norm([dt["replicated"], dt["plain"]])
    assert count.calls == 0  # nothing sharded: nothing to reduce

    # A Partial DTensor holds addends of its elements: it is reduced first, then counted once.
    g = torch.Generator().manual_seed(1)
    addends = [torch.randn(2, 3, generator=g) for _ in range(WORLD)]
    mesh = dt["uneven"].device_mesh
    partial = DTensor.from_local(addends[rank].clone(), mesh, [Partial()], run_check=False)
    total = addends[0] + addends[1]
    for ord in (1.0, 2.0, math.inf):
        _close(F.global_norm([partial, dt["uneven"]], ord), ref_norm([total, full["uneven"]], ord), "partial")
    _close(F.mean_abs([partial]), ref_mean_abs([total]), "partial mean_abs")


def _check_decay(rank: int) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    from lightning_wd import functional as F

    full = _full_tensors()
    g = torch.Generator().manual_seed(2)
    masks = {n: (torch.rand(t.shape, generator=g) > 0.5).to(t.dtype) for n, t in full.items()}
    for ord, step in ((2, 0.1), (2, torch.tensor(0.1)), (1, 0.5)):
        for masked in (False, True):
            dt = _distribute(full)
            local = [t.to_local() if isinstance(t, DTensor) else t for t in dt.values()]
            mask = None
            if masked:
                mask = [
                    distribute_tensor(masks[n], t.device_mesh, t.placements).to_local()
                    if isinstance(t, DTensor)
                    else masks[n]
                    for n, t in dt.items()
                ]
            F.apply_decay_(local, step, ord=ord, mask=mask)  # type: ignore[arg-type]
            for n, t in dt.items():
                got = t.full_tensor() if isinstance(t, DTensor) else t
                expected = ref_decay(full[n], float(step), ord, masks[n] if masked else None)
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=f"{n}, ord={ord}, masked={masked}")

    # cautious_mask on local shards, put back together
    before = _distribute(full)
    after = _distribute({n: t - 0.3 * torch.sign(t) * (masks[n] * 2 - 1) for n, t in full.items()})
    for n, b in before.items():
        a = after[n]
        if not isinstance(b, DTensor):
            torch.testing.assert_close(F.cautious_mask([a], [b])[0], ref_cautious(a, b))
            continue
        assert isinstance(a, DTensor)
        (local,) = F.cautious_mask([a.to_local()], [b.to_local()])
        got = DTensor.from_local(local, b.device_mesh, b.placements, shape=b.shape, stride=b.stride()).full_tensor()
        torch.testing.assert_close(got, ref_cautious(full[n] - 0.3 * torch.sign(full[n]) * (masks[n] * 2 - 1), full[n]))


def _check_engine_refuses_partial_parameters(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (WORLD,))
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(2), mesh, [Partial()], run_check=False))
    optimizer = torch.optim.SGD([{"params": [p], "name": "decay", "weight_decay": 0.1}], lr=0.1)
    try:
        lwd.WeightDecay(optimizer)
    except ValueError as error:
        assert "group 'decay' is a DTensor with placements (Partial(sum),)" in str(error), str(error)
        assert "Shard or replicate it (FSDP2's `fully_shard`" in str(error), str(error)
        assert "step" not in optimizer.__dict__  # nothing attached
    else:
        raise AssertionError("a Partial parameter was accepted")


def _worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        _check_norms(rank)
        _check_decay(rank)
        _check_engine_refuses_partial_parameters(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_functional_on_dtensors_matches_full_tensors_in_two_processes():
    """Every check runs on both ranks (an assertion in either fails the spawn with its traceback)."""
    torch.multiprocessing.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


# ---------------------------------------------------------------- ModelParallelStrategy + fully_shard, 2 processes
# decoupled runs in the resume test below, in two phases that end where the straight run does
@pytest.mark.parametrize("mode", ["relative"])
def test_fsdp2_script_in_subprocess_matches_single_process(tmp_path, mode):
    """The script asserts (on rank 0) the gathered parameters against the reference and the logged norms
    against the gathered parameters, and exits non-zero on a mismatch."""
    result = run_script("fsdp2_fit.py", mode, str(tmp_path / "run"), cwd=tmp_path)
    assert f"fsdp2_fit OK: mode={mode}, 10 logged steps" in result.stdout, result.stdout[-3000:]


def test_fsdp2_resume_from_a_sharded_checkpoint_keeps_the_decay(tmp_path):
    """ModelParallelStrategy's default checkpoint is a directory of shards: resumed from it, every group
    keeps its λ (checked at train start in both processes) and the run ends where the straight run does."""
    run_script("fsdp2_fit.py", "decoupled", str(tmp_path / "run"), "first", cwd=tmp_path)
    result = run_script("fsdp2_fit.py", "decoupled", str(tmp_path / "run"), "resume", cwd=tmp_path)
    assert "fsdp2_fit OK: mode=decoupled, 5 logged steps" in result.stdout, result.stdout[-3000:]
