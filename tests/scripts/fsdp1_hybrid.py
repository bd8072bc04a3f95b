"""HYBRID_SHARD with real replicas of real shards: 4 CPU processes, 2 replica groups of 2-process shard groups.

Usage: python tests/scripts/fsdp1_hybrid.py

The suite's multi-process tests use 2 processes, where hybrid sharding has either replicas of
1-process shards or a single replica; this script runs the checks of ``tests.fsdp1_helpers`` (engine
against the single-process reference, and the collectives counted: the reductions go over each
2-process shard group, never over the replicas) on a 2x2 layout, in 4 processes over gloo. It
prints ``fsdp1_hybrid OK`` and exits 0, or fails with the traceback of the process that failed.
"""

import torch

from tests.fsdp1_helpers import free_port, worker

RUNS = [
    ("HYBRID_SHARD/2x2", "decoupled"),
    ("HYBRID_SHARD/2x2", "relative-update"),
    ("_HYBRID_SHARD_ZERO2/2x2", "relative-params"),
]

if __name__ == "__main__":
    torch.multiprocessing.spawn(worker, args=(free_port(), 4, RUNS), nprocs=4, join=True)
    print(f"fsdp1_hybrid OK: {len(RUNS)} runs on 4 processes")
