"""Direct preference optimisation (DPO, Rafailov et al. 2023), as OpenAI's `dpo` method.

A unit is a preference pair: the input conversation followed by the preferred answer, and
the same input followed by the non-preferred one, each learned only on its answer. The two
sequences of a pair always share a packed forward pass (several pairs share a row, each
sequence attending only to itself). With policy log-probabilities π and reference ones ρ
of each answer (summed over its tokens):

    loss = −log σ(β · ((π_chosen − ρ_chosen) − (π_rejected − ρ_rejected)))

averaged over the step's pairs. The reference policy is the starting model: the base model
with the adapter switched off or, when training on top of a tuned model, its adapter as it
was before the first step. Its log-probabilities never change, so they are computed once,
before training, with no second copy of any weights, and kept in every checkpoint.

Reported as TRL does: `loss`, `reward_accuracy` (TRL's rewards/accuracies: the share of
pairs whose chosen reward β(π − ρ) beats the rejected one's), `reward_margin`
(rewards/margins), `chosen_reward` and `rejected_reward` (rewards/chosen, .../rejected).

Two variants, both well defined in TRL and offered by Together:
- `rpo_alpha` (0.2 by default, as Llama 3's DPO; 0 gives plain DPO): adds α × the mean
  token loss of the step's preferred answers (RPO, Pang et al. 2024; TRL's loss_type
  "sft" with that weight), reported as `sft_loss`;
- `normalize_logratios_by_length` (off by default): divides each answer's log-ratio by
  its token count before the difference (TRL's `sigmoid_norm` loss), so long answers do
  not dominate.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.data.batching import PackedBatch, plan_grouped
from training.data.schema import PreferenceExample
from training.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_preference
from training.data.validation import read_examples
from training.run import ForwardPass, Tally, TrainingRun
from training.token_logps import packed_token_logps


def _answers_of(rows: ForwardPass) -> list[tuple[Pair, bool]]:
    """(pair, is it the preferred answer) of each sequence of a pass, in span order."""
    answers = []
    for row in rows:
        for sequence in row:
            assert isinstance(sequence, Answer) and sequence.pair is not None
            answers.append((sequence.pair, sequence.chosen))
    return answers


@dataclasses.dataclass(eq=False)
class Answer(TokenizedExample):
    """One answer of a pair, as a packed sequence that knows its pair."""

    pair: Pair | None = None
    chosen: bool = True


@dataclasses.dataclass(eq=False)
class Pair:
    chosen: Answer
    rejected: Answer
    # The reference policy's log-probabilities of the two answers, once computed.
    reference: tuple[float, float] | None = None

    @classmethod
    def of(cls, chosen: TokenizedExample, rejected: TokenizedExample) -> Pair:
        pair = cls(
            Answer(chosen.input_ids, chosen.labels, chosen.truncated, chosen=True),
            Answer(rejected.input_ids, rejected.labels, rejected.truncated, chosen=False),
        )
        pair.chosen.pair = pair.rejected.pair = pair
        return pair


@dataclasses.dataclass
class PairCounts(Tally):
    loss_sum: float = 0.0
    n_pairs: int = 0
    n_correct: int = 0
    margin_sum: float = 0.0
    chosen_reward_sum: float = 0.0
    rejected_reward_sum: float = 0.0
    chosen_nll_sum: float = 0.0
    n_chosen_tokens: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_pairs, 1)

    def metrics(self) -> dict[str, float]:
        pairs = max(self.n_pairs, 1)
        return {
            "loss": self.loss,
            "reward_accuracy": self.n_correct / pairs,
            "reward_margin": self.margin_sum / pairs,
            "chosen_reward": self.chosen_reward_sum / pairs,
            "rejected_reward": self.rejected_reward_sum / pairs,
            "sft_loss": self.chosen_nll_sum / max(self.n_chosen_tokens, 1),
        }


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """The whole step's pairs and preferred-answer tokens (every worker divides by them)."""

    n_pairs: int
    n_chosen_tokens: int


def sequence_logps(model: Any, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed sequence, in span order: the summed log-probability of its target tokens,
    and how many there are."""
    labels = batch.labels
    token_logps = packed_token_logps(model, batch).logps
    # Which sequence each position belongs to (-1: padding), to sum per sequence at once.
    owner = torch.full(labels.shape, -1, dtype=torch.long)
    sequence = 0
    for row, spans in enumerate(batch.spans):
        for start, end in spans:
            owner[row, start:end] = sequence
            sequence += 1
    owner = owner.to(labels.device)
    scored = (owner >= 0) & (labels != IGNORE_INDEX)
    logps = token_logps.new_zeros(sequence).index_add(0, owner[scored], token_logps[scored])
    counts = torch.zeros(sequence, dtype=torch.long, device=labels.device)
    counts = counts.index_add(0, owner[scored], torch.ones_like(owner[scored]))
    return logps, counts


def load_pairs(
    path: str | Path, data_format: str, tokenizer: Any, max_length: int
) -> tuple[list[Pair], int]:
    """The file's pairs whose two answers both keep a token within max_length, and how
    many lost one (they are left out)."""
    pairs = []
    for example in read_examples(str(path), data_format):  # type: ignore[arg-type]
        assert isinstance(example, PreferenceExample)
        pairs.append(Pair.of(*tokenize_preference(example, tokenizer, max_length)))
    kept = [p for p in pairs if p.chosen.n_target_tokens and p.rejected.n_target_tokens]
    return kept, len(pairs) - len(kept)


class DpoRun(TrainingRun[Pair]):
    unit_name = "pair"

    def load_units(self, path: Path, data_format: str) -> tuple[list[Pair], int]:
        return load_pairs(path, data_format, self.tokenizer, self.spec.max_length)

    def sequences(self, unit: Pair) -> list[TokenizedExample]:
        return [unit.chosen, unit.rejected]

    def plan(self, units: Sequence[Pair]) -> list[ForwardPass]:
        return plan_grouped([self.sequences(p) for p in units], self.spec.micro_batch_tokens)

    def normalizer(self, batch: Sequence[Pair]) -> StepCounts:
        return StepCounts(len(batch), max(sum(p.chosen.n_target_tokens for p in batch), 1))

    def new_tally(self) -> PairCounts:
        return PairCounts()

    def forward(
        self, model: Any, rows: ForwardPass, normalizer: StepCounts
    ) -> tuple[torch.Tensor, PairCounts]:
        logps, n_tokens = sequence_logps(model, self.batch(rows))
        owners = _answers_of(rows)
        index = {(id(pair), chosen): i for i, (pair, chosen) in enumerate(owners)}
        pairs = list({id(pair): pair for pair, _ in owners}.values())
        chosen_at = torch.tensor([index[(id(p), True)] for p in pairs], device=logps.device)
        rejected_at = torch.tensor([index[(id(p), False)] for p in pairs], device=logps.device)
        reference = torch.tensor([p.reference for p in pairs], device=logps.device)
        chosen_ratio = logps[chosen_at] - reference[:, 0]
        rejected_ratio = logps[rejected_at] - reference[:, 1]
        hp = self.hp
        if hp.normalize_logratios_by_length:
            delta = chosen_ratio / n_tokens[chosen_at] - rejected_ratio / n_tokens[rejected_at]
        else:
            delta = chosen_ratio - rejected_ratio
        pair_losses = -F.logsigmoid(hp.beta * delta)
        chosen_nll = -logps[chosen_at].sum()
        loss = pair_losses.sum() / normalizer.n_pairs
        if hp.rpo_alpha:
            loss = loss + hp.rpo_alpha * chosen_nll / normalizer.n_chosen_tokens
        chosen_reward = (hp.beta * chosen_ratio).detach()
        rejected_reward = (hp.beta * rejected_ratio).detach()
        counts = PairCounts(
            loss_sum=pair_losses.sum().item(),
            n_pairs=len(pairs),
            n_correct=int((chosen_reward > rejected_reward).sum().item()),
            margin_sum=(chosen_reward - rejected_reward).sum().item(),
            chosen_reward_sum=chosen_reward.sum().item(),
            rejected_reward_sum=rejected_reward.sum().item(),
            chosen_nll_sum=chosen_nll.item(),
            n_chosen_tokens=int(n_tokens[chosen_at].sum().item()),
        )
        return loss, counts

    # --- the reference policy
    def begin(self) -> None:
        """The reference log-probabilities of every training and validation pair, before
        the first step, each worker computing its share."""
        pairs = self.train_units + self.valid_units
        values = torch.zeros(len(pairs), 2, dtype=torch.float64)
        mine = list(range(self.workers.rank, len(pairs), self.workers.world_size))
        model = self.model
        was_training = model.training
        model.eval()  # no dropout: the reference is one fixed function
        with torch.no_grad(), self._reference_policy():
            by_pair = {id(pairs[i]): i for i in mine}
            for rows in self.plan([pairs[i] for i in mine]):
                logps, _ = sequence_logps(model, self.batch(rows))
                for (pair, chosen), value in zip(_answers_of(rows), logps.tolist(), strict=True):
                    values[by_pair[id(pair)], 0 if chosen else 1] = value
        model.train(was_training)
        self._set_reference(self.workers.sum_tensor(values).tolist())

    def _reference_policy(self) -> contextlib.AbstractContextManager[Any]:
        """A new adapter is switched off; a starting adapter is still as it started."""
        if self.spec.start_adapter:
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    def _set_reference(self, values: list[list[float]]) -> None:
        pairs = self.train_units + self.valid_units
        for pair, (chosen, rejected) in zip(pairs, values, strict=True):
            pair.reference = (chosen, rejected)

    def recipe_state(self) -> dict[str, Any]:
        return {"reference": [p.reference for p in self.train_units + self.valid_units]}

    def restore(self, state: dict[str, Any]) -> None:
        values = state.get("reference")
        if values is None or len(values) != len(self.train_units) + len(self.valid_units):
            raise RuntimeError("the checkpoint holds no reference log-probabilities to resume")
        self._set_reference(values)
