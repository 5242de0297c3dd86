"""The trainers' C allocator (training/allocator.py): Ray's jemalloc, preloaded into a
process started with `allocator_env`, which then trains as before."""

from __future__ import annotations

import os
import subprocess
import sys

from training.allocator import allocator_env

# A process that reports whether jemalloc is mapped into it, after a small backward pass.
CHILD = """
import torch
w = torch.randn(64, 64, requires_grad=True)
(torch.randn(32, 64) @ w).square().sum().backward()
assert w.grad is not None and bool(torch.isfinite(w.grad).all())
print(any("libjemalloc" in line for line in open("/proc/self/maps")))
"""


def mapped_jemalloc(env: dict[str, str]) -> bool:
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=base | env, capture_output=True, text=True, check=True
    )
    assert "cannot be preloaded" not in done.stderr, done.stderr
    return done.stdout.strip() == "True"


def test_a_process_started_with_the_jemalloc_env_allocates_with_it_and_trains():
    env = allocator_env("jemalloc")
    assert env, "Ray's wheel ships libjemalloc.so"
    assert mapped_jemalloc(env)


def test_system_leaves_glibcs_allocator():
    assert allocator_env("system") == {}
    assert not mapped_jemalloc(allocator_env("system"))
