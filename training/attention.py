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
    rows = []
    for row, row_spans in enumerate(spans):
        pieces = [
            F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                is_causal=True,
                dropout_p=dropout if module.training else 0.0,
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
