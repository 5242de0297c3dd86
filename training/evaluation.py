"""Whether a job helped, which OpenAI's jobs do not say: its validation examples scored on the
model it starts from (the base, or the tuned model it trains on top of) before the first step,
and on the tuned model after the last.

Loss and token accuracy come from the run's own full validation. Where the examples have
reference answers (supervised chat or prompt/completion: the last assistant turn), greedy
generations of both models on up to MAX_GENERATED examples are also scored against them:
exact match, whether the answer contains the reference, and a character similarity
(difflib's ratio, 0-1). The figures are `full_valid_*` metrics, as the run's own are.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.data.tokenize import IGNORE_INDEX, TokenizedExample

MAX_GENERATED = 8
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    reference: str
    reference_tokens: int


def samples(units: Sequence[Any], tokenizer: Any, limit: int = MAX_GENERATED) -> list[Sample]:
    """The first `limit` validation examples with a reference answer: the last span of
    learned tokens is the answer, everything before it the prompt."""
    found: list[Sample] = []
    for unit in units:
        if len(found) >= limit:
            break
        if not isinstance(unit, TokenizedExample):
            continue  # a preference pair, or raw text: no single reference answer
        end = max(
            (i + 1 for i, label in enumerate(unit.labels) if label != IGNORE_INDEX), default=0
        )
        start = end
        while start > 0 and unit.labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start == end or start == 0:
            continue
        answer = unit.input_ids[start:end]
        reference = tokenizer.decode(answer, skip_special_tokens=True).strip()
        if reference:
            found.append(Sample(unit.input_ids[:start], reference, len(answer)))
    return found


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, chosen: Sequence[Sample], device: torch.device
) -> list[str]:
    """Greedy answers, each ending at the tokenizer's end of turn (or twice the reference's
    length, plus a little)."""
    was_training = model.training
    model.eval()
    answers = []
    for sample in chosen:
        ids = torch.tensor([sample.prompt_ids], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=min(MAX_NEW_TOKENS, 2 * sample.reference_tokens + 8),
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def score(answers: Sequence[str], chosen: Sequence[Sample]) -> dict[str, float]:
    if not chosen:
        return {}
    pairs = list(zip(answers, (s.reference for s in chosen), strict=True))
    return {
        "full_valid_exact_match": sum(a == r for a, r in pairs) / len(pairs),
        "full_valid_contains": sum(r.lower() in a.lower() for a, r in pairs) / len(pairs),
        "full_valid_similarity": sum(difflib.SequenceMatcher(None, a, r).ratio() for a, r in pairs)
        / len(pairs),
        "full_valid_generated": float(len(pairs)),
    }
