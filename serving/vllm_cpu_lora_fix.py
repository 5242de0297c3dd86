"""A vLLM plugin for its CPU LoRA ops: base-model requests free of other requests'
adapters, and one matrix product per adapter instead of a copy of its weights per token.

vLLM marks each token that takes no LoRA with the index -1. Its GPU kernels skip such
tokens; the PyTorch ops its CPU backend uses instead (vllm/lora/ops/torch_ops, in vLLM
0.32) gather `weights[indices]`, and -1 selects the last adapter slot. So a base-model
request batched beside a tuned model's (with `max_loras` 1, whenever both are in flight)
was answered with that tuned model's adapter applied: another organization's model,
silently (vllm-project/vllm#48421 and #49656, open upstream). Measured here before this
plugin: 7 of 20 concurrent base + tuned pairs gave a base answer other than the base
model's own (tests/e2e/test_tenancy.py checks it).

The fix mirrors the GPU kernels: only the rows whose index is a slot are computed and
written.

Speed: vLLM's ops gather `weights[indices]`, a copy of the adapter's matrix for every
token, then multiply token by token; a prompt of a few dozen tokens through SmolLM2's 30
layers copied hundreds of megabytes, and a tuned model's first token took 1.0 s where the
base model's took 0.1 s. Here the tokens of each adapter slot are multiplied by its
matrix at once (`grouped`), the same numbers (tests/serving/ compares them with vLLM's
ops); shapes vLLM's ops treat specially (fewer input rows than indices or output rows)
still go to vLLM's op, restricted to the rows that take an adapter. vLLM loads
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


def lora_products(inputs: Any, weights: Any, indices: Any, dtype: Any) -> tuple[Any | None, Any]:
    """`inputs @ weights[slot].T` for the rows whose index is a slot ≥ 0, one product per
    slot: (those rows, or None for all of them; their outputs in that order)."""
    import torch

    inputs = inputs.to(dtype=dtype)
    first = int(indices[0]) if indices.numel() else -1
    if first >= 0 and bool((indices == first).all()):  # one adapter: the usual batch
        return None, inputs @ _matrix(weights, first, dtype).T
    rows, outputs = [], []
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        these = (indices == slot).nonzero().squeeze(1)
        rows.append(these)
        outputs.append(inputs[these] @ _matrix(weights, slot, dtype).T)
    if not rows:
        empty = torch.empty(0, dtype=torch.long, device=indices.device)
        return empty, inputs.new_empty((0, _matrix(weights, 0, dtype).shape[0]))
    return torch.cat(rows), torch.cat(outputs)


def _matrix(weights: Any, slot: int, dtype: Any) -> Any:
    matrix = weights[slot]
    if matrix.dim() == 3:  # [1, out, in]
        matrix = matrix.squeeze(0)
    return matrix.to(dtype=dtype)


def _write(output: Any, rows: Any | None, columns: slice, values: Any, add: bool) -> None:
    if rows is None:
        if add:
            output[:, columns] += values
        else:
            output[:, columns] = values
    elif rows.numel():
        if add:
            output[rows, columns] += values
        else:
            output[rows, columns] = values


def grouped(name: str, op: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's `name` op computed per adapter slot; `op` (vLLM's, rows with an adapter only)
    for the shapes it treats specially."""
    if getattr(op, "ftaas_grouped", False):
        return op
    fallback = only_lora_rows(op)

    @functools.wraps(op)
    def fast(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kw: Any) -> Any:
        if not (inputs.shape[0] == indices.shape[0] == output.shape[0]):
            return fallback(inputs, weights, output, indices, *args, **kw)
        rows, values = lora_products(inputs, weights, indices, output.dtype)
        if name == "bgmv_shrink":
            scaling = args[0] if args else kw.get("scaling", 1.0)
            _write(output, rows, slice(0, values.shape[1]), scaling * values, add=False)
        elif name == "bgmv_expand":
            add = args[0] if args else kw.get("add_inputs", True)
            width = min(values.shape[1], output.shape[1])
            _write(output, rows, slice(0, width), values[:, :width], add)
        else:  # bgmv_expand_slice
            offset, size = (
                (args[0], args[1]) if len(args) >= 2 else (kw["slice_offset"], kw["slice_size"])
            )
            add = args[2] if len(args) >= 3 else kw.get("add_inputs", True)
            _write(output, rows, slice(offset, offset + size), values, add)
        return None

    fast.ftaas_grouped = True  # type: ignore[attr-defined]
    fast.ftaas_only_lora_rows = True  # type: ignore[attr-defined]
    return fast


def register() -> None:
    """The plugin's entry point: patch the ops wherever they are held (idempotent). vLLM
    calls it unguarded at every engine start, so a vLLM that moved these modules gets a
    warning, not an engine that cannot start (tests/serving/ checks the installed one)."""
    import importlib
    import logging

    try:
        ops = importlib.import_module(OP_HOLDERS[0])
        for name in PATCHED_OPS:
            fixed = grouped(name, getattr(ops, name))
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
