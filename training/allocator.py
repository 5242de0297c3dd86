"""The C memory allocator of the processes that train: jemalloc, the copy Ray ships.

On a CPU every tensor is a C `malloc`. glibc's allocator keeps the blocks a training step
frees in its heaps rather than giving them back, and a step frees and asks again for
blocks of ever-changing sizes (each batch's packed length differs): on SmolLM2 with
gradient checkpointing a step's live tensors peak about 270 MB above the model while the
process grows by 750 MB. jemalloc reuses and returns such blocks by size class; over the
same runs the peak resident set is 13-27 % lower, at the same speed or faster
(bench/train_throughput.py, rows `ftaas` and `ftaas-system`). Ray builds and ships
jemalloc in its own wheel (`ray/core/libjemalloc.so`, for its raylet and GCS), so every
node with Ray has it.

A process reads `LD_PRELOAD` only when it starts, so the variable goes into the
environment of the processes that will train (the trainers' runtime_env: Ray execs each
worker with its env_vars). The library's path is this installation's; a node whose Ray
lives elsewhere (another image) has the dynamic linker say it cannot preload it and trains
with glibc's allocator, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Allocator = Literal["jemalloc", "system"]


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
