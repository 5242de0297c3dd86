"""The chunked token log-probabilities every recipe's loss is built from: the same values,
top-token flags and LoRA gradients as the plain full-logits computation, while autograd
keeps nothing of the vocabulary's size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from training.data.batching import collate
from training.data.tokenize import IGNORE_INDEX, TokenizedExample
from training.hyperparameters import ResolvedHyperparameters
from training.lora import build_lora_model
from training.token_logps import LinearTokenLogps, packed_logits, packed_token_logps


def lora_model(model_dir: Path, **overrides: Any) -> Any:
    hp = ResolvedHyperparameters(
        n_epochs=1, batch_size=4, learning_rate_multiplier=1.0, learning_rate=1e-3, **overrides
    )
    torch.manual_seed(0)
    model = build_lora_model(str(model_dir), hp, torch.device("cpu"))
    with torch.no_grad():  # a trained-looking adapter, so that it moves the logits
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def packed_batch(vocabulary: int) -> Any:
    """Two packed rows of three conversations, prompts unlearned, lengths uneven."""
    generator = torch.Generator().manual_seed(1)

    def example(length: int, prompt: int) -> TokenizedExample:
        ids = torch.randint(3, vocabulary, (length,), generator=generator).tolist()
        return TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:])

    return collate([[example(23, 9), example(11, 4)], [example(30, 12)]])


def plain_token_logps(model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits = packed_logits(model, batch)
    labels = batch.labels
    logps = -torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(labels)
    return logps, (logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)


def lora_gradients(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_log_probabilities_and_gradients_are_the_plain_ones(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    vocabulary = model.get_output_embeddings().weight.size(0)
    batch = packed_batch(vocabulary)
    # A position-dependent weight, as DPO and GRPO apply per answer and per token.
    weights = torch.rand(batch.labels.shape, generator=torch.Generator().manual_seed(2))

    plain, plain_correct = plain_token_logps(model, batch)
    plain_grads = lora_gradients(model, (plain * weights).sum())
    chunked = packed_token_logps(model, batch, chunk_logits=5 * vocabulary)  # 5 rows a chunk
    chunked_grads = lora_gradients(model, (chunked.logps * weights).sum())

    torch.testing.assert_close(chunked.logps, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.correct, plain_correct)
    assert (chunked.logps[batch.labels == IGNORE_INDEX] == 0).all()
    assert set(chunked_grads) == set(plain_grads) and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5)


def test_autograd_keeps_nothing_the_size_of_the_vocabulary(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    vocabulary = model.get_output_embeddings().weight.size(0)
    batch = packed_batch(vocabulary)
    tokens = batch.labels.numel()

    def largest_vocabulary_tensor(compute: Any) -> int:
        """The most elements of any tensor autograd saves whose last size is the vocabulary."""
        seen: list[int] = []

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() > 0 and tensor.size(-1) == vocabulary:
                seen.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            compute()
        return max(seen, default=0)

    assert largest_vocabulary_tensor(lambda: plain_token_logps(model, batch)) >= tokens * vocabulary
    assert largest_vocabulary_tensor(lambda: packed_token_logps(model, batch)) == 0


def test_without_gradients_the_values_are_the_same(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    batch = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        plain, _ = plain_token_logps(model, batch)
        chunked = packed_token_logps(model, batch, chunk_logits=7 * model.config.vocab_size)
    assert not chunked.logps.requires_grad
    torch.testing.assert_close(chunked.logps, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "lm_head"]])
def test_a_lora_on_the_output_projection_takes_the_plain_path_and_learns_it(
    tiny_model_dir, targets
):
    model = lora_model(tiny_model_dir, target_modules=targets)
    batch = packed_batch(model.config.vocab_size)
    plain, _ = plain_token_logps(model, batch)
    chunked = packed_token_logps(model, batch)
    torch.testing.assert_close(chunked.logps, plain)
    grads = lora_gradients(model, -chunked.logps.sum())
    assert any("lm_head" in name and grad.abs().sum() > 0 for name, grad in grads.items())


def test_float32_hidden_states_over_a_bf16_head_are_projected_in_the_heads_precision():
    """A bf16 model whose last norm stays in float32 (as TRL's trainer leaves it) hands
    float32 hidden states to a bf16 output projection."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 16, generator=generator, requires_grad=True)
    weight = torch.randn(32, 16, generator=generator).bfloat16()
    labels = torch.tensor([3, IGNORE_INDEX, 7, 0, 31])
    logps, _ = LinearTokenLogps.apply(hidden, weight, labels, 2)
    expected = torch.log_softmax(F.linear(hidden.detach().bfloat16(), weight).float(), dim=-1)
    valid = labels != IGNORE_INDEX
    torch.testing.assert_close(logps[valid], expected[valid, labels[valid]])
    logps.sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32
