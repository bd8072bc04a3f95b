"""FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) checks run in each of 2 gloo CPU processes.

Imported by the spawned processes, so it imports torch and ``lightning_wd`` only (not Lightning).
``reference`` is the single-process run, a plain loop over the decay modes' formulas; it never calls
``lightning_wd``. See ``tests/test_fsdp1.py`` for what is checked.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any, cast

import pytest
import torch
from torch import Tensor, nn

import lightning_wd as lwd

WORLD = 2
LR = 0.05
WD = 0.3
STEPS = 4
DECAYED = ("body.fc1.weight", "body.fc2.weight", "body.proj.weight")
NO_DECAY = ("body.fc1.bias", "body.norm.weight", "body.norm.bias", "body.fc2.bias")
#: Every tensor's shape, from the definition of ``Body``.
SHAPES = {
    "body.fc1.weight": (7, 6),
    "body.fc1.bias": (7,),
    "body.norm.weight": (7,),
    "body.norm.bias": (7,),
    "body.fc2.weight": (1, 7),
    "body.fc2.bias": (1,),
    "body.proj.weight": (2, 1),
}
#: The collective functions counted (all that ``torch.distributed`` has of them).
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "barrier",
    "all_gather_object",
)
#: The engine's options per run.
MODES: dict[str, dict[str, Any]] = {
    "decoupled": dict(mode="decoupled"),
    "relative-params": dict(mode="relative", source="params"),
    "relative-grad-rms": dict(mode="relative", source="grad", metric="rms"),
    "relative-update": dict(mode="relative", source="update"),
}


class Body(nn.Module):
    """Linear(6, 7) -> LayerNorm(7) -> Linear(7, 1) -> Linear(1, 2, bias=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 1)
        self.proj = nn.Linear(1, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.tanh(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _wrap(model: nn.Module, **kwargs: Any) -> nn.Module:
    """FSDP1 as Lightning's FSDPStrategy builds it: the root wraps the model, here with a unit per Linear."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs.setdefault("use_orig_params", True)
    return FullyShardedDataParallel(
        model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), **kwargs
    )


def _canonical(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


# ---------------------------------------------------------------- the single-process reference (plain loops)
def _values(tensors: list[Tensor]) -> list[float]:
    return [float(x) for t in tensors for x in t.double().flatten().tolist()]


def _norm(tensors: list[Tensor]) -> float:
    return math.sqrt(sum(v * v for v in _values(tensors)))


def _mean_abs(tensors: list[Tensor]) -> float:
    values = _values(tensors)
    return sum(abs(v) for v in values) / len(values)


def _rms(tensors: list[Tensor]) -> float:
    values = _values(tensors)
    return math.sqrt(sum(v * v for v in values) / len(values))


def _batches() -> list[tuple[Tensor, Tensor]]:
    """Global batches of 8: two, seen twice."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])] * (STEPS // 2)


def reference(options: dict[str, Any]) -> tuple[dict[str, Tensor], list[dict[str, float]]]:
    """AdamW without decay on the global batches, then the decay on the decayed tensors, by its formula.

    ``decoupled``: ``p <- p (1 - lr λ)``; ``relative``: ``p <- p - lr λ m p``, ``m`` the mean absolute
    value (or RMS) over the decayed group of its gradients, its parameters after the optimizer's update,
    or that update. Returns the final parameters and, per step, each group's norms after the step.
    """
    torch.manual_seed(0)
    model = Model()
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    history = []
    for x, y in _batches():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.step()
        with torch.no_grad():
            updates = {n: params[n] - before[n] for n in params}
            decayed = [params[n] for n in DECAYED]
            if options["mode"] == "decoupled":
                step = LR * WD
            else:
                source = {
                    "params": [p.detach() for p in decayed],
                    "grad": [params[n].grad for n in DECAYED],
                    "update": [updates[n] for n in DECAYED],
                }[options["source"]]
                m = _rms(source) if options.get("metric") == "rms" else _mean_abs(source)  # type: ignore[arg-type]
                step = min(LR * WD * m, 1.0)
            for p in decayed:
                p.mul_(1 - step)
        row = {}
        for group, names in (("decay", DECAYED), ("no_decay", NO_DECAY)):
            row[f"{group}/param_norm"] = _norm([params[n].detach() for n in names])
            row[f"{group}/grad_norm"] = _norm([params[n].grad for n in names])  # type: ignore[misc]
            row[f"{group}/update_norm"] = _norm([updates[n] for n in names])
            b = [v for n in names for v in _values([before[n]])]
            a = [v for n in names for v in _values([params[n].detach()])]
            dot, bb, aa = sum(x * y for x, y in zip(b, a, strict=True)), sum(x * x for x in b), sum(y * y for y in a)
            row[f"{group}/update_ratio"] = math.sqrt(sum((y - x) ** 2 for x, y in zip(b, a, strict=True)) / bb)
            row[f"{group}/angular_update"] = math.atan2(math.sqrt(max(bb * aa - dot * dot, 0.0)), dot)
        history.append(row)
    return {n: p.detach().clone() for n, p in params.items()}, history


# ---------------------------------------------------------------- counting collectives
class CountCollectives:
    """Counts calls of ``torch.distributed``'s collectives by name while active (what the package calls)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __enter__(self) -> CountCollectives:
        import torch.distributed as dist

        self.originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

        def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] = self.calls.get(name, 0) + 1
                return original(*args, **kwargs)

            return call

        for name, original in self.originals.items():
            setattr(dist, name, counting(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        for name, original in self.originals.items():
            setattr(dist, name, original)


# ---------------------------------------------------------------- the plan, in 2 spawned processes
def _check_plan(rank: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    model = Model()
    planned_before = lwd.DecayPlan.from_module(model, lwd.presets.standard(WD))
    fsdp = _wrap(model)
    local = {_canonical(n): (tuple(p.shape), p.data_ptr()) for n, p in fsdp.named_parameters()}
    # the views as FSDP1 leaves them: flat, uneven, empty on one rank
    assert local["body.fc1.weight"][0] == ((26,) if rank == 0 else (16,)), local
    assert local["body.fc1.bias"][0] == ((0,) if rank == 0 else (7,)), local
    assert local["body.norm.weight"][0] == ((7,) if rank == 0 else (0,)), local
    assert local["body.norm.bias"][0] == ((0,) if rank == 0 else (7,)), local

    plan = lwd.DecayPlan.from_module(fsdp, lwd.presets.standard(WD))
    assert [(g.name, g.weight_decay, g.param_names) for g in plan.groups] == [
        ("no_decay", 0.0, NO_DECAY),
        ("decay", WD, DECAYED),
    ]
    assert {e.name: e.shape for e in plan.entries} == SHAPES
    assert {e.name: e.owners for e in plan.entries}["body.norm.weight"] == ("LayerNorm",)
    assert [g.numel for g in plan.groups] == [22, 51]  # 7+7+7+1 and 42+7+2
    assert "total" in plan.table() and "73" in plan.table()
    assert plan.explain("body.fc1.weight").endswith("shape (7, 6), owner Linear")
    # the views are back as they were
    assert {_canonical(n): (tuple(p.shape), p.data_ptr()) for n, p in fsdp.named_parameters()} == local

    gpt = lwd.DecayPlan.from_module(fsdp, lwd.presets.gpt(WD))
    assert {g.name: g.param_names for g in gpt.groups}["decay"] == DECAYED
    wide = lwd.DecayRule("wide", 0.1, predicate=lambda name, p, module: p.ndim == 2 and p.shape[1] == 6)
    custom = lwd.DecayPlan.from_module(fsdp, [wide])
    assert {g.name: g.param_names for g in custom.groups}["wide"] == ("body.fc1.weight",)

    # a plan made before wrapping holds the tensors the wrapped model trains
    assert [id(p) for g in planned_before.groups for p in g.params] == [id(p) for g in plan.groups for p in g.params]

    # the inner module: the root unit, which holds body.norm's tensors, wraps it from outside
    inner = fsdp.module
    with pytest.raises(ValueError, match=r"Parameter 'body\.norm\.weight' of `module` \(Model\) is a flattened FSDP"):
        lwd.DecayPlan.from_module(inner, lwd.presets.standard(WD))
    with pytest.raises(ValueError, match=r"Plan the FSDP wrapper instead \(`DecayPlan\.from_module\(fsdp_model"):
        lwd.build_param_groups(inner)
    from lightning_wd import _fsdp

    assert _fsdp.wrapper_of(inner, fsdp) is fsdp and _fsdp.wrapper_of(inner, None) is inner

    flat = _wrap(Model(), use_orig_params=False)
    assert isinstance(flat, FullyShardedDataParallel)
    with pytest.raises(ValueError, match=r"is an FSDP flat parameter.*Wrap the model with `use_orig_params=True`"):
        lwd.DecayPlan.from_module(flat)

    # the engine needs the wrapped model to know each shard's group: refused without it, nothing attached
    optimizer = torch.optim.AdamW(lwd.build_param_groups(fsdp, lwd.presets.standard(WD)), lr=LR)
    with pytest.raises(ValueError, match=r"group 'no_decay' holds parameters that FSDP.*module=fsdp_model"):
        lwd.WeightDecay(optimizer)
    assert "step" not in optimizer.__dict__


def _run(rank: int, port: int, world: int, check: Callable[[int], None]) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        check(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the engine, in 2 spawned processes
#: (sharding, engine options) per run; "HYBRID_SHARD/RxS": R replica groups of S-process shard groups.
RUNS = [
    ("FULL_SHARD", "decoupled"),
    ("FULL_SHARD", "relative-params"),
    ("FULL_SHARD", "relative-grad-rms"),
    ("FULL_SHARD", "relative-update"),
    ("SHARD_GRAD_OP", "relative-params"),
    ("HYBRID_SHARD/2x1", "relative-params"),
    ("HYBRID_SHARD/1x2", "relative-update"),
]


def _wrap_for(model: nn.Module, sharding: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import ShardingStrategy

    name, _, dims = sharding.partition("/")
    kwargs: dict[str, Any] = {"sharding_strategy": ShardingStrategy[name]}
    if dims:
        replicas, shards = map(int, dims.split("x"))
        kwargs["device_mesh"] = init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))
    return _wrap(model, **kwargs)


def _train(rank: int, sharding: str, mode: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    options = MODES[mode]
    expected_params, history = reference(options)
    torch.manual_seed(0)
    fsdp = _wrap_for(Model(), sharding)
    optimizer = torch.optim.AdamW(lwd.build_param_groups(fsdp, lwd.presets.standard(WD)), lr=LR, weight_decay=0.0)
    engine = lwd.WeightDecay(optimizer, module=fsdp, **options)
    assert engine.sharded
    sharded = not sharding.endswith("x1")  # 1-process shards: every rank holds the tensors whole
    for step, (x, y) in enumerate(_batches()):
        world = torch.distributed.get_world_size()
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)  # each rank its part of the global batch
        optimizer.zero_grad()
        nn.functional.mse_loss(fsdp(x[rows]), y[rows]).backward()
        if not sharded:
            # FSDP1 runs 1-process shards as NO_SHARD: it divides each gradient by the world size but never adds
            # them up over the replicas. Add them up here, as it does for the 2-process shards of "1x2".
            for p in fsdp.parameters():
                torch.distributed.all_reduce(cast(Tensor, p.grad))
        engine.track_updates = step % 2 == 1  # the update norms on steps 1 and 3, the diagnostics on step 3
        engine.track_diagnostics = step == 3
        with CountCollectives() as in_step:
            optimizer.step()
        with CountCollectives() as in_metrics:
            metrics = engine.metrics(grad_norm=True, diagnostics=True)
        # the collectives: one all_reduce per group and measure, over the shard group only; none without shards
        relative = options["mode"] == "relative"
        tracked = 2 * int(engine.track_updates) + 2 * 4 * int(engine.track_diagnostics)  # 4 norms per angle
        per_step = (int(relative) + tracked) if sharded else 0
        assert in_step.calls == ({"all_reduce": per_step} if per_step else {}), (sharding, mode, step, in_step.calls)
        assert in_metrics.calls == ({"all_reduce": 4} if sharded else {}), (sharding, mode, in_metrics.calls)
        for key, value in history[step].items():
            if key.endswith("update_norm") and not engine.track_updates:
                assert key not in metrics
                continue
            if key.endswith(("update_ratio", "angular_update")) and not engine.track_diagnostics:
                continue
            rel = 1e-4 if key.endswith(("update_ratio", "angular_update")) else 2e-5  # (float32 angles)
            assert math.isclose(metrics[key], value, rel_tol=rel, abs_tol=1e-7), (sharding, mode, step, key)
    with FullyShardedDataParallel.summon_full_params(fsdp):
        full = {_canonical(n): p.detach().clone() for n, p in fsdp.named_parameters()}
    for name, value in expected_params.items():
        torch.testing.assert_close(full[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    engine.remove()


def worker(rank: int, port: int, world: int = WORLD, runs: list[tuple[str, str]] | None = None) -> None:
    """In one of the ``world`` processes started by ``torch.multiprocessing.spawn``: the plan's checks (for 2
    processes), then each run of ``runs`` (default ``RUNS``)."""

    def check(rank: int) -> None:
        if world == WORLD:
            _check_plan(rank)
        for sharding, mode in RUNS if runs is None else runs:
            _train(rank, sharding, mode)

    _run(rank, port, world, check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
