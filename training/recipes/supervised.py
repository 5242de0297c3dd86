"""Supervised fine-tuning: learn the assistant turns of conversations (or the completion
of prompt/completion pairs) with the next-token loss.

A unit is one example; a step's loss is the summed token loss divided by the target tokens
of the whole step, so every learned token counts once whatever the packing, the number of
workers or the lengths: a packed step gives exactly the loss of the same examples run one
by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.data.batching import PackedBatch, plan_micro_batches
from training.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from training.data.validation import read_examples
from training.run import ForwardPass, Tally, TrainingRun
from training.token_logps import packed_token_logps


@dataclasses.dataclass
class TokenCounts(Tally):
    loss_sum: float = 0.0
    n_targets: int = 0
    n_correct: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_targets, 1)

    @property
    def accuracy(self) -> float:
        return self.n_correct / max(self.n_targets, 1)

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "mean_token_accuracy": self.accuracy}


def forward_counts(model: Any, batch: PackedBatch) -> tuple[torch.Tensor, TokenCounts]:
    """Summed next-token loss over the batch's target tokens, and its accuracy counts."""
    tokens = packed_token_logps(model, batch)
    loss_sum = -tokens.logps.sum()
    n_targets = int((batch.labels != IGNORE_INDEX).sum().item())
    correct = int(tokens.correct.sum().item())
    return loss_sum, TokenCounts(loss_sum.item(), n_targets, correct)


def keep_learnable(
    tokenized: Sequence[TokenizedExample],
) -> tuple[list[TokenizedExample], int]:
    """The examples that still have a target token, and how many had none."""
    kept = [t for t in tokenized if t.n_target_tokens > 0]
    return kept, len(tokenized) - len(kept)


def load_tokenized(
    path: str | Path, data_format: str, tokenizer: Any, max_length: int
) -> tuple[list[TokenizedExample], int]:
    examples = read_examples(str(path), data_format)  # type: ignore[arg-type]
    return keep_learnable([tokenize_example(e, tokenizer, max_length) for e in examples])


class SupervisedRun(TrainingRun[TokenizedExample]):
    def load_units(self, path: Path, data_format: str) -> tuple[list[TokenizedExample], int]:
        return load_tokenized(path, data_format, self.tokenizer, self.spec.max_length)

    def sequences(self, unit: TokenizedExample) -> list[TokenizedExample]:
        return [unit]

    def plan(self, units: Sequence[TokenizedExample]) -> list[ForwardPass]:
        return plan_micro_batches(units, self.spec.micro_batch_tokens)

    def normalizer(self, batch: Sequence[TokenizedExample]) -> int:
        return max(sum(e.n_target_tokens for e in batch), 1)

    def forward(
        self, model: Any, rows: ForwardPass, normalizer: int
    ) -> tuple[torch.Tensor, TokenCounts]:
        loss_sum, counts = forward_counts(model, self.batch(rows))
        return loss_sum / normalizer, counts

    def new_tally(self) -> TokenCounts:
        return TokenCounts()
