"""What grading one sample gives: a reward and the flags OpenAI reports with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ErrorFlags:
    """OpenAI's `metadata.errors`, every flag of the run endpoint's response."""

    formula_parse_error: bool = False
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False
    invalid_variable_error: bool = False
    other_error: bool = False
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    model_grader_server_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_server_error_details: str | None = None

    @property
    def any(self) -> bool:
        return any(value is True for value in asdict(self).values())

    def merge(self, other: ErrorFlags) -> None:
        """A multi grader carries its sub-graders' flags (the first details win)."""
        for name, value in asdict(other).items():
            if value not in (None, False) and getattr(self, name) in (None, False):
                setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GradeResult:
    """One (sample, item) graded: the reward (0 whenever an error flag is set), each
    sub-grader's reward for a multi, and the time and judge tokens it took."""

    name: str
    type: str
    reward: float = 0.0
    errors: ErrorFlags = field(default_factory=ErrorFlags)
    sub_rewards: dict[str, float] = field(default_factory=dict)
    execution_time: float = 0.0
    token_usage_per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    sampled_model_name: str | None = None
    details: str | None = None  # why a flag is set, for people (logs, the API's errors)

    @property
    def token_usage(self) -> int | None:
        if not self.token_usage_per_model:
            return None
        return sum(usage.get("total_tokens", 0) for usage in self.token_usage_per_model.values())

    def add_usage(self, model: str, usage: dict[str, int]) -> None:
        mine = self.token_usage_per_model.setdefault(model, {})
        for key, count in usage.items():
            mine[key] = mine.get(key, 0) + count

    def failed(self, **flags: Any) -> GradeResult:
        """This result scored 0 with `flags` set."""
        self.reward = 0.0
        for name, value in flags.items():
            setattr(self.errors, name, value)
        return self
