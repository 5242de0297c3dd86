"""Answers sampled from the policy as it is now, for reinforcement fine-tuning.

`PolicySampler` generates with the training model itself (transformers' `generate` on the
LoRA model, in the trainer's process): no second copy of the weights, no weight sync, and
the sampling distribution is exactly the one the loss differentiates. A step's groups are
one `generate` call (`num_return_sequences`, prompts left-padded and masked). A job's
`response_format` becomes a grammar (training/response_format.py) that masks the logits
at every sampled token, so each answer has that shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Completion:
    """One sampled answer: its tokens (the end-of-turn token included when it ended),
    its text (special tokens left out), and whether it ended on its own."""

    token_ids: list[int]
    text: str
    finished: bool


@dataclass(frozen=True)
class SampleRequest:
    """A prompt's group: `n` answers of at most `max_new_tokens`."""

    prompt_ids: Sequence[int]
    n: int
    max_new_tokens: int


class Sampler(Protocol):
    def sample(
        self, prompt_ids: Sequence[int], n: int, max_new_tokens: int, temperature: float | None
    ) -> list[Completion]:
        """`n` answers to one prompt; greedy when `temperature` is None."""
        ...


def sample_many(
    sampler: Sampler, requests: Sequence[SampleRequest], temperature: float | None
) -> list[list[Completion]]:
    """Every group of a step, at once where the sampler batches them (the serving engine,
    training/serve_sampler.py), else one prompt after another."""
    batched = getattr(sampler, "sample_many", None)
    if batched is not None:
        return list(batched(requests, temperature))
    return [sampler.sample(r.prompt_ids, r.n, r.max_new_tokens, temperature) for r in requests]


def stop_tokens(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the tokenizer's end of sequence and the model's
    generation config's (an instruct model's end of turn)."""
    found = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found.update(configured if isinstance(configured, list) else [configured])
    return {token for token in found if token is not None}


class PolicySampler:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        response_format: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.stops = stop_tokens(model, tokenizer)
        self.grammar = None
        if response_format is not None:
            from training.response_format import compile_grammar

            # The logits' width (the embedding may be padded past the tokenizer's size).
            vocab_size = model.get_output_embeddings().weight.shape[0]
            self.grammar = compile_grammar(
                response_format, tokenizer, vocab_size, sorted(self.stops)
            )

    def sample(
        self, prompt_ids: Sequence[int], n: int, max_new_tokens: int, temperature: float | None
    ) -> list[Completion]:
        return self._generate([prompt_ids], n, max_new_tokens, temperature)[0]

    def sample_many(
        self, requests: Sequence[SampleRequest], temperature: float | None
    ) -> list[list[Completion]]:
        """The step's groups in one `generate` where they ask alike (the same `n` and
        budget: the usual case), prompts left-padded; else one call per group."""
        if len({(r.n, r.max_new_tokens) for r in requests}) != 1:
            return [self.sample(r.prompt_ids, r.n, r.max_new_tokens, temperature) for r in requests]
        first = requests[0]
        return self._generate(
            [r.prompt_ids for r in requests], first.n, first.max_new_tokens, temperature
        )

    @torch.no_grad()
    def _generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        temperature: float | None,
    ) -> list[list[Completion]]:
        model = self.model
        was_training = model.training
        model.eval()
        pad = self.tokenizer.pad_token_id or min(self.stops)
        width = max(len(p) for p in prompts)
        # Left padding, masked: every answer starts right after its own prompt.
        ids = torch.tensor(
            [[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            if temperature is not None
            else {"do_sample": False}
        )
        if self.grammar is not None:
            from xgrammar.contrib.hf import LogitsProcessor

            # One per call: it follows each of the call's answers token by token.
            sampling["logits_processor"] = [LogitsProcessor(self.grammar)]
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                eos_token_id=sorted(self.stops),
                pad_token_id=pad,
                use_cache=True,
                **sampling,
            )
        finally:
            model.train(was_training)
        answers = [self._completion(row[width:].tolist()) for row in out]
        # generate returns each prompt's `n` answers together, prompts in order.
        return [answers[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _completion(self, generated: list[int]) -> Completion:
        end = next((i for i, token in enumerate(generated) if token in self.stops), None)
        tokens = generated if end is None else generated[: end + 1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(tokens, text, end is not None)
