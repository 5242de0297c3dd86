"""Attention for packed rows that costs what the examples cost, not what the row costs.

transformers turns packed `position_ids` into one dense block-diagonal mask per row, and
SDPA then computes every masked-out block: a row's attention costs its width squared.
This implementation runs causal SDPA on each example's own span instead (Σ lengths²),
through transformers' attention-function registry; the spans come with the batch.
Batches without spans (generation, evaluation outside the trainer) get transformers'
own SDPA, which is exact for unpadded rows. On a CPU the spans run through torch's flash
kernel as one autograd node (PackedCpuAttention). On GPUs with flash-attention installed its
varlen kernel does the same job natively, and this is not used: the trainer then packs a
forward pass into a single row (`one_row`), the one shape in which transformers reads
packed sequences from `position_ids` and hands their boundaries to the kernel.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
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
    dropout_p = dropout if module.training else 0.0
    if packed_cpu_attention_serves(query, dropout_p):
        attended = PackedCpuAttention.apply(query, key, value, spans, scaling)
        return attended.transpose(1, 2).contiguous(), None
    # Grouped-query attention (fewer key/value heads): SDPA shares the heads itself, so no
    # expanded copy of the keys and values is made, nor kept for the backward pass.
    grouped = key.shape[1] != query.shape[1]
    rows = []
    for row, row_spans in enumerate(spans):
        pieces = [
            F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                is_causal=True,
                dropout_p=dropout_p,
                scale=scaling,
                enable_gqa=grouped,
            )
            for start, end in row_spans
        ]
        used = row_spans[-1][1] if row_spans else 0
        if used < query.shape[2]:  # padding attends to nothing; its outputs are never scored
            pieces.append(query.new_zeros(1, query.shape[1], query.shape[2] - used, query.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def packed_cpu_attention_serves(query: torch.Tensor, dropout_p: float) -> bool:
    """Whether PackedCpuAttention serves this call: a CPU tensor, no dropout (its mask
    would have to be replayed), torch's CPU flash kernels at hand."""
    return (
        query.device.type == "cpu"
        and dropout_p == 0.0
        and _CPU_FLASH is not None
        and _CPU_FLASH_BACKWARD is not None
    )


class PackedCpuAttention(torch.autograd.Function):
    """Causal attention of each example of a packed batch on its own span, on a CPU, as one
    autograd node: torch's CPU flash kernel per span, forward in the inputs' dtype, backward
    in float32, gradients written into one tensor per input.

    Per-example SDPA calls on slices cost more than their kernels: each example's gradient
    came back as a zero-filled batch-sized tensor that autograd then added up (8 fills and
    8 adds a layer for each of query, key and value at batch size 8), and the outputs were
    concatenated. And in bf16 torch's CPU flash kernel is fast forward but 2.5-13x slower
    backward than in float32 (per example of 64-150 tokens, 9 query and 3 key/value heads:
    1.2 vs 0.3 ms, 3.0 vs 1.1 ms), which was a fifth of a checkpointed SmolLM2 step. Only
    the inputs, the output and the log-sum-exp are kept for backward, as SDPA keeps; their
    float32 copies live while one example's gradients are computed, and those gradients are
    closer to float32's than the bf16 kernel's. The kernel shares key/value heads among
    query heads itself (grouped-query attention). Padding positions attend to nothing:
    their outputs and gradients are zero."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        spans: Spans,
        scale: float | None,
    ) -> torch.Tensor:
        assert _CPU_FLASH is not None
        out = torch.zeros_like(query)
        logsumexp = query.new_zeros(query.shape[:3], dtype=torch.float32)
        for row, start, end in _pieces(spans):
            piece, piece_logsumexp = _CPU_FLASH(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                0.0,
                True,
                scale=scale,
            )
            out[row : row + 1, :, start:end] = piece
            logsumexp[row : row + 1, :, start:end] = piece_logsumexp
        ctx.save_for_backward(query, key, value, out, logsumexp)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        assert _CPU_FLASH_BACKWARD is not None
        query, key, value, out, logsumexp = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (query, key, value)]
        with torch.autocast("cpu", enabled=False):
            for row, start, end in _pieces(ctx.spans):
                where = (slice(row, row + 1), slice(None), slice(start, end))
                pieces = _CPU_FLASH_BACKWARD(
                    grad_out[where].float(),
                    query[where].float(),
                    key[where].float(),
                    value[where].float(),
                    out[where].float(),
                    logsumexp[where],
                    0.0,
                    True,
                    scale=ctx.scale,
                )
                for grad, piece in zip(grads, pieces, strict=True):
                    grad[where] = piece
        return grads[0], grads[1], grads[2], None, None


def _pieces(spans: Spans) -> Iterator[tuple[int, int, int]]:
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            if end > start:
                yield row, start, end


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
