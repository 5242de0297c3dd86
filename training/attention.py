"""Attention for packed rows that costs what the examples cost, not what the row costs.

transformers turns packed `position_ids` into one dense block-diagonal mask per row, and
SDPA then computes every masked-out block: a row's attention costs its width squared.
This implementation runs causal SDPA on each example's own span instead (Σ lengths²),
through transformers' attention-function registry; the spans come with the batch.
Batches without spans (generation, evaluation outside the trainer) get transformers'
own SDPA, which is exact for unpadded rows. On GPUs with flash-attention installed its
varlen kernel does the same job natively, and this is not used: the trainer then packs a
forward pass into a single row (`one_row`), the one shape in which transformers reads
packed sequences from `position_ids` and hands their boundaries to the kernel.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

SEGMENTED_SDPA = "ftaas_segmented_sdpa"
Spans = list[list[tuple[int, int]]]  # per row: [start, end) of each example


def segmented_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    spans: Spans | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # Grouped-query attention (fewer key/value heads): SDPA shares the heads itself, so no
    # expanded copy of the keys and values is made, nor kept for the backward pass.
    grouped = key.shape[1] != query.shape[1]
    dropout_p = dropout if module.training else 0.0
    attend = (
        CpuFlashAttention.apply
        if cpu_flash_backward_in_float32(query, dropout_p)
        else functools.partial(_sdpa, enable_gqa=grouped)
    )
    rows = []
    for row, row_spans in enumerate(spans):
        pieces = [
            attend(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                dropout_p,
                scaling,
            )
            for start, end in row_spans
        ]
        used = row_spans[-1][1] if row_spans else 0
        if used < query.shape[2]:  # padding attends to nothing; its outputs are never scored
            pieces.append(query.new_zeros(1, query.shape[1], query.shape[2] - used, query.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
    )


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def cpu_flash_backward_in_float32(query: torch.Tensor, dropout_p: float) -> bool:
    """Whether CpuFlashAttention serves this call: 16-bit inputs on a CPU, a pass that
    will be differentiated, no dropout (its mask would have to be replayed)."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.requires_grad
        and torch.is_grad_enabled()
        and dropout_p == 0.0
        and _CPU_FLASH is not None
        and _CPU_FLASH_BACKWARD is not None
    )


class CpuFlashAttention(torch.autograd.Function):
    """Causal flash attention on a CPU, forward in the inputs' 16-bit dtype and backward in
    float32. torch's CPU flash kernel is fast forward in bf16 but 2.5-13x slower backward
    than in float32 (per example of 64-150 tokens, 9 query and 3 key/value heads: 1.2 vs
    0.3 ms, 3.0 vs 1.1 ms), and the backward pass was a fifth of a checkpointed SmolLM2
    step. Only the 16-bit inputs, output and log-sum-exp are kept for backward, as SDPA
    keeps; their float32 copies live only while one example's gradients are computed, which
    are also more exact than the bf16 kernel's. The kernel shares key/value heads among
    query heads itself (grouped-query attention)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dropout_p: float,
        scale: float | None,
    ) -> torch.Tensor:
        assert _CPU_FLASH is not None and dropout_p == 0.0
        out, logsumexp = _CPU_FLASH(query, key, value, 0.0, True, scale=scale)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        assert _CPU_FLASH_BACKWARD is not None
        query, key, value, out, logsumexp = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grads = _CPU_FLASH_BACKWARD(
                grad_out.float(),
                query.float(),
                key.float(),
                value.float(),
                out.float(),
                logsumexp,
                0.0,
                True,
                scale=ctx.scale,
            )
        grad_query, grad_key, grad_value = (g.to(query.dtype) for g in grads)
        return grad_query, grad_key, grad_value, None, None


FLASH_ATTENTION = "flash_attention_2"


def packed_attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation for training on packed rows: flash attention's varlen
    kernel where it runs (a CUDA device, 16-bit weights, the package installed), else
    segmented SDPA."""
    if (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return FLASH_ATTENTION
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa)
    return SEGMENTED_SDPA


def one_row(model: Any) -> bool:
    """Whether `model` wants each forward pass as one packed row (flash attention)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == FLASH_ATTENTION
