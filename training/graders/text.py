"""The graders that run in the trainer's own process: string_check and text_similarity.

Tokens for bleu, gleu and meteor: lower-cased words and punctuation marks (a regular
expression, since NLTK's punkt tokenizer needs a corpus download). ROUGE uses
rouge-score's own tokenizer (with Porter stemming) and reports the F-measure.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from training.graders.schemas import StringOperation

_WORDS = re.compile(r"\w+|[^\w\s]")


def string_check(operation: StringOperation, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())


def _tokens(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


class _NoWordNet:
    """Stands in for NLTK's WordNet reader, which needs a corpus this server cannot
    download: METEOR's synonym stage then matches nothing, its exact and Porter-stem
    stages run as NLTK has them."""

    def synsets(self, _word: str) -> list[Any]:
        return []


def _rouge_key(metric: str) -> str:
    """rouge-score's name of a metric: rouge_1 -> rouge1, rouge_l -> rougeL."""
    return "rouge" + metric.removeprefix("rouge_").upper()


@cache
def _rouge_scorer(key: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([key], use_stemmer=True)


def text_similarity(metric: str, text: str, reference: str) -> float:
    """A score in [0, 1] (1: the same text)."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        # rapidfuzz's normalized Indel similarity, reported as OpenAI does on 0..1.
        return float(fuzz.ratio(text, reference)) / 100.0
    if metric == "bleu":
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        hypothesis, references = _tokens(text), [_tokens(reference)]
        if not hypothesis:
            return 0.0
        # Smoothing (Chen and Cherry's method 1) keeps an answer with no matching 4-gram
        # from scoring exactly 0; answers shorter than 4 words weigh only the n-gram
        # orders they have (NLTK's auto_reweigh), so a one-word exact answer scores 1.
        smoothing = SmoothingFunction().method1
        return float(
            sentence_bleu(references, hypothesis, smoothing_function=smoothing, auto_reweigh=True)
        )
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([_tokens(reference)], _tokens(text)))
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([_tokens(reference)], _tokens(text), wordnet=_NoWordNet()))
    if metric.startswith("rouge_"):
        key = _rouge_key(metric)
        return float(_rouge_scorer(key).score(reference, text)[key].fmeasure)
    raise ValueError(f"unknown evaluation_metric {metric!r}")
