"""The native memory of the training processes (training/native_memory.py): Ray's
jemalloc, preloaded into a process started with `native_memory_env`, which then trains as
before; and oneDNN's caches bounded, so that a process whose matmuls change shape at every
step (packed batches) stops growing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from training.lora import cpu_has_bf16
from training.native_memory import (
    PRIMITIVE_CACHE_CAPACITIES,
    allocator_env,
    native_memory_env,
    primitive_cache_env,
)

# A process that reports whether jemalloc is mapped into it, after a small backward pass.
MAPS_JEMALLOC = """
import torch
w = torch.randn(64, 64, requires_grad=True)
(torch.randn(32, 64) @ w).square().sum().backward()
assert w.grad is not None and bool(torch.isfinite(w.grad).all())
print(any("libjemalloc" in line for line in open("/proc/self/maps")))
"""

# A process that trains bf16 layers with a LoRA-like adapter on batches of 60 lengths, one
# new length a step as packed batches have, and prints the bytes jemalloc has allocated
# (mallctl: tensors, oneDNN's primitives and their buffers) after each step, in MB.
TRAINS_ON_NEW_LENGTHS = """
import ctypes
import torch

torch.manual_seed(0)
jemalloc = ctypes.CDLL(None)


def allocated_mb():
    epoch = ctypes.c_uint64(1)
    jemalloc.mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(8))
    value, size = ctypes.c_size_t(0), ctypes.c_size_t(8)
    jemalloc.mallctl(b"stats.allocated", ctypes.byref(value), ctypes.byref(size), None, 0)
    return value.value / 2**20


linear = torch.nn.functional.linear
frozen = [torch.randn(o, i, dtype=torch.bfloat16) for i, o in [(256, 256), (256, 768), (768, 256)]]
adapter = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
for length in range(300, 300 + 60 * 7, 7):
    x = torch.randn(length, 256, dtype=torch.bfloat16, requires_grad=True)
    h = linear(x, frozen[0]) + linear(linear(x, adapter), adapter.t())
    linear(linear(h, frozen[1]).relu(), frozen[2]).float().square().sum().backward()
    print(allocated_mb())
"""


def run_child(code: str, env: dict[str, str]) -> str:
    base = {
        k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", *PRIMITIVE_CACHE_CAPACITIES)
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True
    )
    assert "cannot be preloaded" not in done.stderr, done.stderr
    return done.stdout


def mapped_jemalloc(env: dict[str, str]) -> bool:
    return run_child(MAPS_JEMALLOC, env).strip() == "True"


def test_a_process_started_with_the_jemalloc_env_allocates_with_it_and_trains():
    env = allocator_env("jemalloc")
    assert env, "Ray's wheel ships libjemalloc.so"
    assert mapped_jemalloc(env)
    assert mapped_jemalloc(native_memory_env("jemalloc"))


def test_system_leaves_glibcs_allocator():
    assert allocator_env("system") == {}
    assert not mapped_jemalloc(native_memory_env("system"))


def growth_over_last_steps(env: dict[str, str]) -> float:
    """MB the process grew by over its last 20 steps, each of a new length."""
    allocated = [float(line) for line in run_child(TRAINS_ON_NEW_LENGTHS, env).split()]
    assert len(allocated) == 60
    return allocated[-1] - allocated[-21]


@pytest.mark.skipif(
    not cpu_has_bf16(), reason="on this CPU ftaas trains in float32, without oneDNN's caches"
)
def test_a_trainer_stops_growing_when_every_step_has_a_new_length():
    # Ran once with oneDNN's default caches, as a process without the env would: it grows
    # by some 5 MB a step, a new matmul primitive and its buffers for each new length.
    unbounded = growth_over_last_steps(allocator_env("jemalloc"))
    assert unbounded > 40
    bounded = growth_over_last_steps(native_memory_env("jemalloc"))
    assert bounded < 5, f"grew by {bounded:.0f} MB over 20 steps"


def test_the_services_own_setting_of_a_cache_is_passed_on(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "2048")
    assert primitive_cache_env() == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "2048",
        "LRU_CACHE_CAPACITY": str(PRIMITIVE_CACHE_CAPACITIES["LRU_CACHE_CAPACITY"]),
    }
