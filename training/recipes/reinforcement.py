"""Reinforcement fine-tuning (OpenAI's `reinforcement` method): GRPO, with the job's grader
as the reward.

A unit is a prompt: a conversation ending with the user's turn, plus the row's other keys,
which the grader reads as `{{item.*}}`. One step takes `batch_size` prompts. For each, the
policy as it is now samples `group_size` answers (training/sampling.py); the grader scores
every answer (training/graders: a grader's failure scores 0 and is counted, never fails
the job); an answer's advantage is its reward minus its group's mean, divided by the
group's standard deviation (TRL's `scale_rewards="group"`), so a group whose answers all
score alike teaches nothing. The loss is PPO's clipped objective on every answer token,

    −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A),   ρ = π(token) / π_sampled(token),

summed over the step's answer tokens and divided by their number (TRL's default loss,
`dapo`; `loss_type="dr_grpo"` divides by answers × max_completion_tokens instead). One
optimizer step follows each sampling round (TRL's `num_iterations=1`), so ρ is 1 in value
and the gradient is the policy gradient A·∇log π; the clip matters once rounds are reused.
An optional KL penalty to the base model (`kl_coefficient`, 0 by default as in TRL) uses
the k3 estimator, with the adapter switched off for the reference.

Reported per step as OpenAI does: `train_reward_mean` (the step's answers), and at every
`eval_interval` steps `valid_reward_mean` over the whole validation set (greedy answers,
or `eval_samples` sampled ones); besides, the answers' length, how many were cut at
`max_completion_tokens`, the grader's error rate, the share of groups with no signal, and
the time spent sampling, grading and training.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.data.batching import plan_micro_batches
from training.data.schema import ReinforcementExample
from training.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_prompt
from training.data.validation import read_examples
from training.graders import (
    Graders,
    PythonSandbox,
    SandboxLimits,
    SandboxUnavailable,
    parse_grader,
    sample_from_text,
)
from training.graders.schemas import Grader, MultiGrader
from training.progress import Notice
from training.run import ForwardPass, Tally, TrainingRun
from training.sampling import (
    Completion,
    PolicySampler,
    Sampler,
    SampleRequest,
    sample_many,
    stop_tokens,
)
from training.serve_judge import ServeJudge
from training.serve_sampler import ServingSampler
from training.spec import KEEP_CHECKPOINTS, TrainingSpec
from training.storage import is_remote
from training.token_logps import packed_token_logps

logger = logging.getLogger(__name__)

# Added to a group's standard deviation before dividing (TRL's value).
ADVANTAGE_EPSILON = 1e-4


@dataclasses.dataclass(eq=False)
class Prompt:
    """A prompt to answer: its tokens, and the row as the grader reads it."""

    prompt_ids: list[int]
    item: dict[str, Any]


@dataclasses.dataclass(eq=False)
class Rollout(TokenizedExample):
    """A sampled answer after its prompt, learned on the answer's tokens, with its
    advantage."""

    advantage: float = 0.0


@dataclasses.dataclass
class RewardTally(Tally):
    loss_sum: float = 0.0
    n_tokens: int = 0  # answer tokens the loss was taken on
    kl_sum: float = 0.0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    n_answers: int = 0
    n_cut: int = 0  # answers that reached max_completion_tokens without ending
    answer_tokens: int = 0
    n_grader_errors: int = 0
    n_groups: int = 0
    n_flat_groups: int = 0  # every answer scored alike: no advantage, nothing learned
    sampling_s: float = 0.0
    grading_s: float = 0.0
    n_workers: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_tokens, 1)

    def metrics(self) -> dict[str, float]:
        answers = max(self.n_answers, 1)
        mean = self.reward_sum / answers
        values = {
            "reward_mean": mean,
            "reward_std": math.sqrt(max(self.reward_sq_sum / answers - mean * mean, 0.0)),
            "completion_tokens_mean": self.answer_tokens / answers,
            "truncated_ratio": self.n_cut / answers,
            "grader_error_rate": self.n_grader_errors / answers,
        }
        if self.n_tokens:  # a training step's, not a validation's
            values |= {
                "loss": self.loss,
                "frac_reward_zero_std": self.n_flat_groups / max(self.n_groups, 1),
                "sampling_seconds": self.sampling_s / max(self.n_workers, 1),
                "grading_seconds": self.grading_s / max(self.n_workers, 1),
            }
            if self.kl_sum:
                values["kl"] = self.kl_sum / self.n_tokens
        return values


def tally_for(sub_graders: Sequence[str]) -> type[RewardTally]:
    """RewardTally, plus each sub-grader's reward sum for a `multi` grader, reported as
    `<name>_reward_mean` (OpenAI's per-grader scores)."""
    if not sub_graders:
        return RewardTally
    names = list(sub_graders)

    def metrics(self: RewardTally) -> dict[str, float]:
        values = RewardTally.metrics(self)
        for index, name in enumerate(names):
            values[f"{name}_reward_mean"] = getattr(self, f"sub_{index}") / max(self.n_answers, 1)
        return values

    fields = [(f"sub_{index}", float, 0.0) for index in range(len(names))]
    tally = dataclasses.make_dataclass(
        "GradersTally", fields, bases=(RewardTally,), namespace={"metrics": metrics}
    )
    tally.sub_graders = names  # type: ignore[attr-defined]
    return tally


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """Each reward's distance from its group's mean, in the group's standard deviations
    (unbiased, as torch.std and TRL)."""
    values = torch.tensor(rewards, dtype=torch.float64)
    std = values.std().item() if len(rewards) > 1 else 0.0
    return ((values - values.mean()) / (std + ADVANTAGE_EPSILON)).tolist()


class ReinforcementRun(TrainingRun[Prompt]):
    unit_name = "prompt"

    def __init__(self, *args: Any, sampler: Sampler | None = None, **kwargs: Any):
        self._sampler = sampler
        super().__init__(*args, **kwargs)
        if self.spec.grader is None:
            raise ValueError("a reinforcement job needs a grader")
        self.grader: Grader = parse_grader(self.spec.grader)
        self.tally_class = tally_for(
            sorted(self.grader.graders) if isinstance(self.grader, MultiGrader) else []
        )
        self.graders = Graders(
            judge=ServeJudge(self.spec.judges) if self.spec.judges else None,
            sandbox=_sandbox(self.spec, self.grader, self.scratch),
        )
        self.normalize_by = "tokens" if self.hp.loss_type == "dapo" else "answers"
        if self.reporter and self.spec.rollouts == "serving":
            self.reporter.progress.write(
                Notice(
                    message=f"Answers are sampled by the serving engine of "
                    f"{self.spec.base_model}, with the weights of each step"
                )
            )

    @property
    def sampler(self) -> Sampler:
        if self._sampler is None:
            if self.spec.rollouts == "serving":
                self._sampler = ServingSampler(
                    self.unwrapped,
                    stop_tokens(self.unwrapped, self.tokenizer),
                    self.store,
                    base_model=self.spec.base_model,
                    output_key=self.spec.output_key,
                    rank=self.workers.rank,
                    scratch=self.scratch,
                    version=lambda: self.position.step,
                    response_format=self.spec.response_format,
                    seed=self.spec.seed,
                )
            else:
                self._sampler = PolicySampler(
                    self.unwrapped, self.tokenizer, self.device, self.spec.response_format
                )
        return self._sampler

    def close(self) -> None:
        close_sampler = getattr(self._sampler, "close", None)
        if close_sampler is not None:  # the serving sampler's published weights
            close_sampler()
        super().close()

    # --- units
    def load_units(self, path: Path, data_format: str) -> tuple[list[Prompt], int]:
        examples = read_examples(str(path), "reinforcement")
        prompts, dropped = [], 0
        for example in examples:
            assert isinstance(example, ReinforcementExample)
            ids = tokenize_prompt(example, self.tokenizer)
            if len(ids) >= self.spec.max_length:  # no room left for an answer
                dropped += 1
                continue
            prompts.append(Prompt(ids, example.item))
        return prompts, dropped

    def sequences(self, unit: Prompt) -> list[TokenizedExample]:
        return [TokenizedExample(unit.prompt_ids, [IGNORE_INDEX] * len(unit.prompt_ids))]

    def plan(self, units: Sequence[Any]) -> list[ForwardPass]:
        return plan_micro_batches(units, self.spec.micro_batch_tokens)

    def normalizer(self, batch: Sequence[Any]) -> float:
        raise NotImplementedError("known only once the step's answers are sampled")

    def new_tally(self) -> RewardTally:
        # Before __init__ has parsed the grader (the base loop may ask): the plain one.
        return getattr(self, "tally_class", RewardTally)()

    # --- a step: sample, grade, then learn
    def train_step(self, batch: Sequence[Prompt]) -> Tally:
        workers, hp = self.workers, self.hp
        mine = workers.share(batch)
        rollouts, tally = self._roll_out(mine)
        tally.n_workers = 1
        counts = torch.tensor(
            [float(sum(r.n_target_tokens for r in rollouts)), float(len(rollouts))],
            dtype=torch.float64,
        )
        n_tokens, n_answers = workers.sum_tensor(counts).tolist()
        normalizer = (
            max(n_tokens, 1.0)
            if self.normalize_by == "tokens"
            else max(n_answers * hp.max_completion_tokens, 1.0)
        )
        if rollouts:
            tally.add(self.optimize(rollouts, normalizer))  # type: ignore[arg-type]
        else:  # no prompt of its own: a zero-weight pass, to join the all-reduce
            filler = batch[0].prompt_ids
            self.optimize([Rollout(filler, [IGNORE_INDEX, *filler[1:]])], normalizer, 0.0)
        return workers.sum(tally)

    def _roll_out(self, prompts: Sequence[Prompt]) -> tuple[list[Rollout], RewardTally]:
        tally, rollouts = self.new_tally(), []
        groups = self._sample(prompts, self.hp.group_size, self.hp.temperature, tally)
        for prompt, answers, rewards in zip(
            prompts, groups, self._grade(prompts, groups, tally), strict=True
        ):
            tally.n_groups += 1
            tally.n_flat_groups += int(max(rewards) - min(rewards) < 1e-9)
            for answer, advantage in zip(answers, group_advantages(rewards), strict=True):
                if not answer.token_ids:
                    continue
                ids = prompt.prompt_ids + answer.token_ids
                labels = [IGNORE_INDEX] * len(prompt.prompt_ids) + answer.token_ids
                rollouts.append(Rollout(ids, labels, advantage=advantage))
        return rollouts, tally

    def _sample(
        self,
        prompts: Sequence[Prompt],
        n: int,
        temperature: float | None,
        tally: RewardTally,
    ) -> list[list[Completion]]:
        started = time.monotonic()
        requests = [SampleRequest(p.prompt_ids, n, self._answer_budget(p)) for p in prompts]
        groups = sample_many(self.sampler, requests, temperature)
        tally.sampling_s += time.monotonic() - started
        return groups

    def _answer_budget(self, prompt: Prompt) -> int:
        return max(
            1, min(self.hp.max_completion_tokens, self.spec.max_length - len(prompt.prompt_ids))
        )

    def _grade(
        self,
        prompts: Sequence[Prompt],
        groups: Sequence[Sequence[Completion]],
        tally: RewardTally,
    ) -> list[list[float]]:
        """Every answer of every group scored in one go, so that a model grader's judge
        gets the whole step's questions at once (its engine batches them)."""
        started = time.monotonic()
        pairs = [
            (sample_from_text(answer.text), prompt.item)
            for prompt, answers in zip(prompts, groups, strict=True)
            for answer in answers
        ]
        results = iter(asyncio.run(self.graders.grade_many(self.grader, pairs)))
        tally.grading_s += time.monotonic() - started
        return [
            [self._count(answer, next(results), tally) for answer in answers] for answers in groups
        ]

    def _count(self, answer: Completion, result: Any, tally: RewardTally) -> float:
        """The answer's reward, added to the tally with its length and the grader's parts."""
        reward = float(result.reward) if math.isfinite(result.reward) else 0.0
        tally.reward_sum += reward
        tally.reward_sq_sum += reward * reward
        tally.n_answers += 1
        tally.answer_tokens += len(answer.token_ids)
        tally.n_cut += int(not answer.finished)
        for index, name in enumerate(getattr(tally, "sub_graders", ())):
            setattr(
                tally,
                f"sub_{index}",
                getattr(tally, f"sub_{index}") + result.sub_rewards.get(name, 0.0),
            )
        if result.errors.any:
            tally.n_grader_errors += 1
            if tally.n_grader_errors == 1:  # the step's first, in the trainer's log
                logger.warning("grader error: %s", result.details)
        return reward

    def forward(
        self, model: Any, rows: ForwardPass, normalizer: float
    ) -> tuple[torch.Tensor, RewardTally]:
        batch = self.batch(rows)
        labels = batch.labels
        mask = labels != IGNORE_INDEX
        token_logps = packed_token_logps(model, batch).logps
        advantages = self._token_advantages(rows, batch.spans, labels.shape)
        # Sampled by this very policy, one optimizer step per round: the sampling
        # log-probabilities are the current ones, detached.
        ratio = torch.exp(token_logps - token_logps.detach())
        eps = self.hp.clip_epsilon
        per_token = -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
        kl_sum = 0.0
        if self.hp.kl_coefficient > 0:
            kl = self._kl_to_base(model, batch, token_logps, labels)
            per_token = per_token + self.hp.kl_coefficient * kl
            kl_sum = float((kl * mask).sum().item())
        loss_sum = (per_token * mask).sum()
        tally = self.new_tally()
        tally.loss_sum, tally.n_tokens = float(loss_sum.item()), int(mask.sum().item())
        tally.kl_sum = kl_sum
        return loss_sum / normalizer, tally

    def _token_advantages(
        self, rows: ForwardPass, spans: list[list[tuple[int, int]]], shape: torch.Size
    ) -> torch.Tensor:
        """Each answer's advantage on every position of its packed sequence."""
        advantages = torch.zeros(shape, device=self.device)
        packed = [[r for row in rows for r in row]] if self.one_row else rows
        for row_index, (row, row_spans) in enumerate(zip(packed, spans, strict=True)):
            for sequence, (start, end) in zip(row, row_spans, strict=True):
                assert isinstance(sequence, Rollout)
                advantages[row_index, start:end] = sequence.advantage
        return advantages

    @torch.no_grad()
    def _base_logps(self, model: Any, batch: Any, labels: torch.Tensor) -> torch.Tensor:
        with self.unwrapped.disable_adapter():
            return packed_token_logps(model, batch).logps

    def _kl_to_base(
        self, model: Any, batch: Any, token_logps: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """k3: exp(ref − π) − (ref − π) − 1, per token (non-negative, unbiased)."""
        difference = self._base_logps(model, batch, labels) - token_logps
        return torch.exp(difference) - difference - 1

    # --- validation: the grader's mean reward over the validation prompts
    @torch.no_grad()
    def evaluate(self, units: Sequence[Prompt]) -> Tally:
        tally = self.new_tally()
        samples = self.hp.eval_samples
        temperature = self.hp.temperature if samples > 1 else None
        mine = self.workers.share(units)
        self._grade(mine, self._sample(mine, samples, temperature, tally), tally)
        return self.workers.sum(tally)

    def validation_values(self, step: int, epoch_end: bool) -> dict[str, float]:
        """The whole validation set every `eval_interval` steps and at the last step (as
        OpenAI, `valid_reward_mean` is over the whole set)."""
        if not self.valid_units:
            return {}
        if step % self.hp.eval_interval and step != self.total_steps:
            return {}
        metrics = self.evaluate(self.valid_units).metrics()
        values = {f"valid_{name}": value for name, value in metrics.items()}
        if step == self.total_steps:  # also the tuned model's figures: not measured again
            values |= {f"full_valid_{name}": value for name, value in metrics.items()}
        return values

    # --- checkpoints: at each validation, the three best kept (and the newest)
    def _report_step(
        self, tally: Tally, started: float, steps_at_start: int, epoch_end: bool
    ) -> None:
        super()._report_step(tally, started, steps_at_start, epoch_end)
        reward = self.last_metrics.get("valid_reward_mean")
        if reward is not None:
            self.position.checkpoint_rewards[self.position.step] = reward
            self.checkpoint(self._best_and_newest)

    def _best_and_newest(self, steps: list[int]) -> set[int]:
        """As OpenAI: the KEEP_CHECKPOINTS with the best `valid_reward_mean` (the later of
        equals); and the newest, which a resumed or restarted run continues from."""
        rewards = self.position.checkpoint_rewards
        ranked = sorted((s for s in steps if s in rewards), key=lambda s: (-rewards[s], -s))
        return {*ranked[:KEEP_CHECKPOINTS], *steps[-1:]}

    def _end_epoch(self) -> bool:
        if self.valid_units:  # checkpoints come with validations instead
            return False
        return super()._end_epoch()

    def _generation_scores(self) -> dict[str, float]:
        return {}  # the grader's reward is the score (evaluate)


def _sandbox(spec: TrainingSpec, grader: Grader, scratch: Path) -> PythonSandbox | None:
    """Where the grader has python graders, their sandbox, with the server's settings;
    None when it has none, or when no sandbox can be made here (the API refuses such
    jobs where it knows; here they score 0 with a server error, counted)."""
    if '"type":"python"' not in grader.model_dump_json():
        return None
    store = spec.storage_url.removeprefix("file://")
    hidden = [scratch, *([] if is_remote(store) else [Path(store)])]
    sandbox = PythonSandbox(
        spec.python_grader_sandbox,
        SandboxLimits(timeout_s=spec.python_grader_timeout_s),
        hidden=hidden,
    )
    try:
        sandbox.check()
    except SandboxUnavailable:
        logger.warning("python graders cannot run here: no sandbox", exc_info=True)
        return None
    return sandbox
