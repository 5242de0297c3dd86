"""Each target token's log-probability under the model, without the full logits.

Every recipe's loss is built from one quantity: log p(label | prefix) at each target
position (SFT and continued pre-training sum its negative; DPO sums it per answer; GRPO
takes ratios of it). The plain way to get it materialises the logits of the whole pass in
float32, [tokens, vocabulary], and autograd keeps them, their log-softmax and their
gradient: on a real vocabulary (SmolLM2 49,152; Llama 3 and Qwen 128k) that is most of a
step's memory and much of its time, which is where Liger's and Unsloth's fused losses and
cut-cross-entropy get their gains.

Here the model's forward stops at the last hidden states (its output projection returns
its input for the pass), and `LinearTokenLogps` projects those of the positions that have
a label (a prompt's have none: in chat data a third of the tokens or more), a chunk of
rows at a time: for each chunk it computes the logits, the label's log-probability,
whether the argmax is the label, and, when a gradient is wanted, the gradient of the
log-probability with respect to the chunk's hidden states (W[label] - softmax · W), then
drops the logits. Backward only scales that stored gradient by the incoming one. Peak
extra memory is one chunk's logits (`chunk_rows`) plus the hidden states' gradient. The
values and gradients are those of the plain computation
(tests/training/test_token_logps.py); the output projection must be frozen (it is under
LoRA unless a job targets it, and then the plain path is taken).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from training.data.batching import PackedBatch
from training.data.tokenize import IGNORE_INDEX
from training.lora import adapter_precision

# Logits computed at once, by device type, and the fewest rows a chunk takes. Each chunk
# reads the whole output projection (SmolLM2's 56 MB, a 128k vocabulary's 0.25-1 GB), so a
# chunk of few rows spends its time reading it. A GPU takes 2^24 float32 values (64 MB,
# small next to its memory): 341 rows of SmolLM2's vocabulary, 130 of a 128k one. A CPU
# takes 2^22 (16 MB) but at least 128 rows: on SmolLM2 (85 rows at 2^22) the same speed as
# 2^24 and 80-90 MB less peak memory with checkpointing, on a 128k vocabulary (32 rows at
# 2^22) 13 % slower than 2^24, which the floor avoids (bench/train_throughput.py,
# ftaas-ckpt, llama-128k).
CHUNK_LOGITS = {"cuda": 2**24, "cpu": 2**22}
CHUNK_MIN_ROWS = 128

# Architectures whose causal-LM forward is exactly `lm_head(last hidden states)`, with no
# scaling or soft-capping after it (Gemma 2's softcap, Cohere's logit_scale, Granite's
# logits_scaling would be skipped): the chunked path is exact for these, the plain path
# serves the rest.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "smollm3"}
)


@dataclasses.dataclass
class TokenLogps:
    """Per position of the batch ([rows, length]): the label's log-probability (0 where
    there is no label) and whether the model's top token is the label."""

    logps: torch.Tensor
    correct: torch.Tensor


class LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden · Wᵀ)[label] per row, a chunk of rows at a time (see the module)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.size(0)
        logps = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        correct = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # Only the rows with a label are projected (a prompt's rows have none): their
        # log-probability is 0 and they get no gradient, as in the plain computation.
        labelled = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        for start in range(0, labelled.numel(), rows):
            index = labelled[start : start + rows]
            label = labels[index]
            target = label.unsqueeze(1)
            # (The hidden states may be float32 over a bf16 head: norms kept in float32, as
            # TRL's trainer leaves them.)
            logits = F.linear(hidden[index].to(weight.dtype), weight).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            del logits
            logps[index] = log_probs.gather(1, target).squeeze(1)
            correct[index] = log_probs.argmax(-1) == label
            if grad_hidden is not None:
                # d log p[label] / d logits = onehot(label) - softmax; through the
                # projection: (onehot - softmax) · W, in the weights' precision as autograd
                # would do it for the plain logits.
                probs = log_probs.exp_()
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                grad_hidden[index] = -(probs.to(weight.dtype) @ weight).to(hidden.dtype)
            del log_probs
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        ctx.mark_non_differentiable(correct)
        return logps, correct

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logps: torch.Tensor, _grad_correct: Any
    ) -> tuple[torch.Tensor | None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return grad_hidden * grad_logps.unsqueeze(1).to(grad_hidden.dtype), None, None, None


def _output_projection(model: Any) -> torch.nn.Linear | None:
    """The model's frozen, bias-free output projection, when the chunked path is exact for it."""
    inner = model.module if hasattr(model, "module") else model  # DDP
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None  # e.g. a LoRA on lm_head: the plain path differentiates it
    return head


@contextlib.contextmanager
def _hidden_states_out(head: torch.nn.Linear) -> Iterator[None]:
    """The model's forward returns its last hidden states as `logits` (through DDP's
    forward too, so gradients are still synchronised)."""
    head.forward = lambda hidden: hidden  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def _forward(model: Any, batch: PackedBatch) -> Any:
    with adapter_precision(model):
        return model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            spans=batch.spans,  # read by training.attention; other implementations ignore it
            use_cache=False,
        )


def packed_logits(model: Any, batch: PackedBatch) -> torch.Tensor:
    """The model's logits (float32) for a packed batch, each sequence seeing only itself:
    the plain computation."""
    return _forward(model, batch).logits.float()  # type: ignore[no-any-return]


def chunk_rows(vocabulary: int, device: torch.device, chunk_logits: int | None = None) -> int:
    """Rows of logits a chunk takes: `chunk_logits` values, else the device's default
    (`CHUNK_LOGITS`, at least `CHUNK_MIN_ROWS` rows)."""
    if chunk_logits is not None:
        return max(1, chunk_logits // vocabulary)
    return max(CHUNK_MIN_ROWS, CHUNK_LOGITS.get(device.type, CHUNK_LOGITS["cuda"]) // vocabulary)


def packed_token_logps(
    model: Any, batch: PackedBatch, chunk_logits: int | None = None
) -> TokenLogps:
    """Each target token's log-probability for a packed batch, each sequence seeing only
    itself (training.attention)."""
    labels = batch.labels
    head = _output_projection(model)
    if head is None:
        logits = packed_logits(model, batch)
        log_probs = -F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(labels)
        correct = (logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)
        return TokenLogps(log_probs, correct)
    with _hidden_states_out(head):
        hidden = _forward(model, batch).logits
    rows = chunk_rows(head.weight.size(0), hidden.device, chunk_logits)
    logps, correct = LinearTokenLogps.apply(
        hidden.reshape(-1, hidden.size(-1)), head.weight, labels.reshape(-1), rows
    )
    return TokenLogps(logps.view_as(labels), correct.view_as(labels))
