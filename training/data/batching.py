"""Padding-free batches: examples packed end to end into rows, each attending only to itself.

A row concatenates whole examples; `position_ids` restart at 0 for each one, which is how
transformers recognises packed sequences and gives each its own causal block (no
attention crosses an example boundary, with SDPA, eager or flash attention alike). Labels
are shifted inside each example before packing, so the last token of one example is never
asked to predict the first token of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass
class PackedBatch:
    """One forward pass: rows of packed examples, shape [rows, longest row]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    spans: list[list[tuple[int, int]]]  # per row: [start, end) of each example

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.position_ids.to(device),
            self.spans,
        )


def next_token_labels(example: TokenizedExample) -> list[int]:
    """labels[i] is what position i must predict: the example's label at i + 1."""
    return [*example.labels[1:], IGNORE_INDEX]


def pack_rows(
    examples: Sequence[TokenizedExample], row_tokens: int
) -> list[list[TokenizedExample]]:
    """First-fit decreasing: few rows, none over `row_tokens` (a longer example rides alone).

    Deterministic for a given input order, so every data-parallel worker plans alike."""
    return pack_groups([[example] for example in examples], row_tokens)


def _length(group: Sequence[TokenizedExample]) -> int:
    return sum(len(example.input_ids) for example in group)


def pack_groups(
    groups: Sequence[Sequence[TokenizedExample]], row_tokens: int
) -> list[list[TokenizedExample]]:
    """`pack_rows` for groups of sequences that must share a row (a preference pair's two
    answers): a group is never split."""
    order = sorted(range(len(groups)), key=lambda i: -_length(groups[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = _length(groups[index])
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(row_tokens - length)
    return [[example for i in sorted(row) for example in groups[i]] for row in rows]


def plan_micro_batches(
    examples: Sequence[TokenizedExample], batch_tokens: int
) -> list[list[list[TokenizedExample]]]:
    """Forward passes of single examples (see `plan_grouped`)."""
    return plan_grouped([[example] for example in examples], batch_tokens)


def plan_grouped(
    groups: Sequence[Sequence[TokenizedExample]], batch_tokens: int
) -> list[list[list[TokenizedExample]]]:
    """Pack into rows as wide as the longest group, then stack rows into forward passes
    of at most `batch_tokens` (rows × widest row), so one pass does as much work as
    memory allows.

    Why that width: linear layers cost the same for any row shape, but a packed row's
    attention grows with its width squared (the block-diagonal mask is still computed as
    a dense one by SDPA on CPU); the longest group needs its width anyway."""
    row_tokens = max((_length(group) for group in groups), default=1)
    rows = pack_groups(groups, row_tokens)
    rows.sort(key=lambda row: -_length(row))
    batches: list[list[list[TokenizedExample]]] = []
    for row in rows:
        width = _length(row)
        if batches:
            current = batches[-1]
            longest = _length(current[0])  # rows come longest first
            if (len(current) + 1) * max(longest, width) <= batch_tokens:
                current.append(row)
                continue
        batches.append([row])
    return batches


def collate(rows: Sequence[Sequence[TokenizedExample]]) -> PackedBatch:
    """Right-pads rows to the longest; padding is ignored by the loss and, its positions
    restarting at 0, is a sequence of its own that no real token attends to."""
    packed = []
    spans: list[list[tuple[int, int]]] = []
    for row in rows:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        spans.append([])
        for example in row:
            spans[-1].append((len(input_ids), len(input_ids) + len(example.input_ids)))
            input_ids += example.input_ids
            labels += next_token_labels(example)
            positions += range(len(example.input_ids))
        packed.append((input_ids, labels, positions))
    width = max(len(ids) for ids, _, _ in packed)
    pad = [width - len(ids) for ids, _, _ in packed]
    return PackedBatch(
        torch.tensor([ids + [0] * n for (ids, _, _), n in zip(packed, pad, strict=True)]),
        torch.tensor(
            [lab + [IGNORE_INDEX] * n for (_, lab, _), n in zip(packed, pad, strict=True)]
        ),
        torch.tensor([pos + list(range(n)) for (_, _, pos), n in zip(packed, pad, strict=True)]),
        spans,
    )


def as_one_row(rows: Sequence[Sequence[TokenizedExample]]) -> list[list[TokenizedExample]]:
    """The same examples as a single packed row (for flash attention's varlen kernel,
    which needs no rectangle: no padding at all)."""
    return [[example for row in rows for example in row]]
