"""The native (C) memory of the processes that train: their allocator, and the bounds of
oneDNN's caches. Both are fixed when a process starts, by its environment, so they are
given as environment variables for the trainers' runtime_env (Ray execs each worker with
its env_vars): `native_memory_env`.

**jemalloc, the copy Ray ships.** On a CPU every tensor is a C `malloc`. glibc's allocator
keeps the blocks a training step frees in its heaps rather than giving them back, and a
step frees and asks again for blocks of ever-changing sizes (each batch's packed length
differs): on SmolLM2 with gradient checkpointing a step's live tensors peak about 270 MB
above the model while the process grows by 750 MB. jemalloc reuses and returns such blocks
by size class; over the same runs the peak resident set is 13-27 % lower, at the same
speed or faster (bench/train_throughput.py, rows `ftaas` and `ftaas-system`). Ray builds
and ships jemalloc in its own wheel (`ray/core/libjemalloc.so`, for its raylet and GCS), so
every node with Ray has it. The library's path is this installation's; a node whose Ray
lives elsewhere (another image) has the dynamic linker say it cannot preload it and trains
with glibc's allocator.

**oneDNN's caches, bounded.** On a CPU, torch computes bf16 matmuls with oneDNN, which
builds a primitive for each shape (a matmul of 1,093 tokens by 576 × 1,536 is a shape) and
keeps it, with the buffers sized for it, in two caches of 1,024 entries each: oneDNN's own
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and the one of ideep, torch's oneDNN layer
(`LRU_CACHE_CAPACITY`). Packed batches have a new length nearly every step, so each step
adds a new set of primitives (37 on SmolLM2 for a forward and backward pass) that are never
used again: a SmolLM2 trainer grew by about 50 MB a step, for hundreds of steps until the
caches are full. A step reuses its own primitives across the model's layers, which needs
oneDNN's cache to hold one step's set (64 entries were too few on SmolLM2 and halved the
speed; 128 and more ran at full speed), and ideep's ran at full speed with as few as 8
entries. Bounded at 256 and 16 entries, a SmolLM2 trainer stops growing after its
first steps, at the same speed (48 examples: peak 1.48 → 1.15-1.22 GB with checkpointing,
1.98 → 1.88 GB without). A value set in the service's own environment is passed on instead.
GPUs' matmuls (cuBLAS) have no such caches; the variables change nothing there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Allocator = Literal["jemalloc", "system"]

# Entries of each cache (see above): oneDNN's 4x the 64 that thrashed on SmolLM2 (about 7x
# the 37 primitives one new length builds there); ideep's 2x the 8 that still ran at full
# speed.
PRIMITIVE_CACHE_CAPACITIES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 256, "LRU_CACHE_CAPACITY": 16}


def ray_jemalloc() -> Path | None:
    """Ray's own jemalloc, where its wheel has one."""
    import ray

    path = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    return path if path.is_file() else None


def allocator_env(allocator: Allocator) -> dict[str, str]:
    """The environment variables that give a process started with them `allocator`
    (nothing for `system`: glibc's)."""
    if allocator == "system":
        return {}
    library = ray_jemalloc()
    return {"LD_PRELOAD": str(library)} if library else {}


def primitive_cache_env() -> dict[str, str]:
    """oneDNN's caches bounded (`PRIMITIVE_CACHE_CAPACITIES`), or as this process's own
    environment sets them."""
    return {name: os.environ.get(name, str(n)) for name, n in PRIMITIVE_CACHE_CAPACITIES.items()}


def native_memory_env(allocator: Allocator) -> dict[str, str]:
    """The environment of a process that trains: `allocator`, oneDNN's caches bounded."""
    return allocator_env(allocator) | primitive_cache_env()
