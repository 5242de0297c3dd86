"""Continued pre-training: the language-model loss on every token of raw text.

The training file holds `{"text": "..."}` lines (documents). Each document is tokenized
whole (with the tokenizer's begin- and end-of-text tokens) and cut into blocks of at most
`max_length` tokens; blocks are the units, packed into forward passes like supervised
examples, each attending only to itself, so no document leaks into another. Everything
else (loss normalisation, validation, checkpoints, pause and resume) is the supervised
recipe's, but for "auto" epochs: raw text takes more passes to learn than answers do
(MIN_TARGET_BLOCKS, in the method table).
"""

from __future__ import annotations

from pathlib import Path

from training.data.schema import TextExample
from training.data.tokenize import TokenizedExample, tokenize_text
from training.data.validation import read_examples
from training.recipes.supervised import SupervisedRun, keep_learnable


class ContinuedPretrainingRun(SupervisedRun):
    unit_name = "block"

    def load_units(self, path: Path, data_format: str) -> tuple[list[TokenizedExample], int]:
        documents = read_examples(str(path), data_format)  # type: ignore[arg-type]
        blocks = []
        for document in documents:
            assert isinstance(document, TextExample)
            blocks += tokenize_text(document, self.tokenizer, self.spec.max_length)
        return keep_learnable(blocks)
