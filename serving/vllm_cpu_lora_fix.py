"""A vLLM plugin that keeps base-model requests free of other requests' adapters on CPU.

vLLM marks each token that takes no LoRA with the index -1. Its GPU kernels skip such
tokens; the PyTorch ops its CPU backend uses instead (vllm/lora/ops/torch_ops, in vLLM
0.32) gather `weights[indices]`, and -1 selects the last adapter slot. So a base-model
request batched beside a tuned model's (with `max_loras` 1, whenever both are in flight)
was answered with that tuned model's adapter applied: another organization's model,
silently (vllm-project/vllm#48421 and #49656, open upstream). Measured here before this
plugin: 7 of 20 concurrent base + tuned pairs gave a base answer other than the base
model's own (tests/e2e/test_tenancy.py checks it).

The fix mirrors the GPU kernels: only the rows whose index is a slot are computed and
written; a batch whose rows all take an adapter runs vLLM's op unchanged. vLLM loads
`vllm.general_plugins` entry points (pyproject.toml) in each of its processes, the engine
core and its workers included, before the model runner imports these ops.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
# Where vLLM 0.32 holds these ops by name: the module that defines them (its sgmv_* ops
# call them from there), the package that re-exports them and the CPU punica wrapper.
OP_HOLDERS = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)


def only_lora_rows(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op(inputs, weights, output, indices, ...)`, row by row, for the rows whose index
    is ≥ 0; rows marked -1 are left as they are."""
    if getattr(op, "ftaas_only_lora_rows", False):
        return op

    @functools.wraps(op)
    def fixed(
        inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any
    ) -> Any:
        valid = indices >= 0
        if bool(valid.all()) or inputs.shape[0] != indices.shape[0]:
            return op(inputs, weights, output, indices, *args, **kwargs)
        rows = valid.nonzero().squeeze(1)
        if rows.numel() == 0:
            return None  # no row takes an adapter
        part = output[rows]  # a copy (advanced indexing), written back below
        op(inputs[rows], weights, part, indices[rows], *args, **kwargs)
        output[rows] = part
        return None

    fixed.ftaas_only_lora_rows = True  # type: ignore[attr-defined]
    return fixed


def register() -> None:
    """The plugin's entry point: patch the ops wherever they are held (idempotent). vLLM
    calls it unguarded at every engine start, so a vLLM that moved these modules gets a
    warning, not an engine that cannot start (tests/serving/ checks the installed one)."""
    import importlib
    import logging

    try:
        ops = importlib.import_module(OP_HOLDERS[0])
        for name in PATCHED_OPS:
            fixed = only_lora_rows(getattr(ops, name))
            for holder in OP_HOLDERS:
                module = sys.modules.get(holder) or importlib.import_module(holder)
                if hasattr(module, name):
                    setattr(module, name, fixed)
    except (ImportError, AttributeError):
        logging.getLogger("ftaas").warning(
            "vLLM's CPU LoRA ops are not where vLLM 0.32 held them: not patched "
            "(serving/vllm_cpu_lora_fix.py)",
            exc_info=True,
        )
