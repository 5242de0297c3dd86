"""The grader endpoints' wire shapes (openai-python `types/fine_tuning/alpha/*`). The
grader itself is parsed by training/graders (one schema, shared with the trainer), so
that a bad field comes back named as the user wrote it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from training.graders import GradeResult

GRADER_DESCRIPTION = (
    "A grader: string_check, text_similarity, python, score_model or multi "
    "(training/graders/schemas.py)"
)


class ValidateGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any] = Field(description=GRADER_DESCRIPTION)


class ValidateGraderResponse(BaseModel):
    grader: dict[str, Any]


class RunGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any] = Field(description=GRADER_DESCRIPTION)
    model_sample: str = Field(description="fills `sample`; `output_json` when it is JSON")
    item: dict[str, Any] | None = Field(default=None, description="fills `item`")


class RunMetadata(BaseModel):
    name: str
    type: str
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None
    sampled_model_name: str | None
    errors: dict[str, Any]
    # ftaas's addition: why a flag is set, in words (OpenAI's flags alone do not say).
    details: str | None = None


class RunGraderResponse(BaseModel):
    reward: float
    metadata: RunMetadata
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]

    @classmethod
    def of(cls, result: GradeResult) -> RunGraderResponse:
        return cls(
            reward=result.reward,
            metadata=RunMetadata(
                name=result.name,
                type=result.type,
                execution_time=result.execution_time,
                scores=dict(result.sub_rewards) or {result.name: result.reward},
                token_usage=result.token_usage,
                sampled_model_name=result.sampled_model_name,
                errors=result.errors.as_dict(),
                details=result.details,
            ),
            sub_rewards=result.sub_rewards,
            model_grader_token_usage_per_model=result.token_usage_per_model,
        )
