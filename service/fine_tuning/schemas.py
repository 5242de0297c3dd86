"""Wire shapes of /v1/fine_tuning: the request we accept and the objects we return.

Responses reuse the official SDK's models; the job adds what OpenAI's live API returns
beyond its published enum (`paused`) and fields (`user_provided_suffix`).
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.fine_tuning.naming import SUFFIX_PATTERN
from training.hyperparameters import (
    DpoHyperparameters,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
)
from training.methods import METHODS, TrainingMethod
from training.response_format import ResponseFormat

MAX_METADATA_PAIRS = 16
# OpenAI's bounds on integrations: at most 5, W&B tags at most 50 of 64 characters.
MAX_INTEGRATIONS = 5
T = TypeVar("T")


class WandbSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(min_length=1, max_length=128)
    name: Annotated[str, Field(max_length=128)] | None = None
    entity: Annotated[str, Field(max_length=128)] | None = None
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=50
    )


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: WandbSettings


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class ReinforcementMethod(BaseModel):
    """OpenAI's `method.reinforcement`: the grader (checked by training/graders, whose
    errors name the field) and the hyperparameters. `response_format`, which OpenAI's
    guide shows here, shapes every answer the trainer samples (training/response_format.py)."""

    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters = Field(
        default_factory=ReinforcementHyperparameters
    )
    response_format: ResponseFormat | None = None


class Method(BaseModel):
    """OpenAI's `method`, plus ftaas's `continued_pretraining` (raw text, the supervised
    hyperparameters). Only the object of the chosen type may be given."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement", "continued_pretraining"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    continued_pretraining: SupervisedMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _only_its_own_settings(self) -> Method:
        for other in set(type(self).model_fields) - {"type"}:
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"`{other}` settings were given for a `{self.type}` method")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("a `reinforcement` method needs `reinforcement.grader`")
        return self

    def hyperparameters(self) -> SupervisedHyperparameters:
        settings = getattr(self, self.type)
        if settings is not None:
            return settings.hyperparameters  # type: ignore[no-any-return]
        method = METHODS.get(self.type)  # type: ignore[arg-type]
        return method.hyperparameters() if method else SupervisedHyperparameters()


class CreateFineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: Annotated[str, Field(pattern=SUFFIX_PATTERN)] | None = None
    seed: Annotated[int, Field(ge=0, le=2_147_483_647)] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    integrations: list[Integration] | None = Field(default=None, max_length=MAX_INTEGRATIONS)
    hyperparameters: SupervisedHyperparameters | None = Field(
        default=None, description="deprecated: use method.supervised.hyperparameters"
    )
    method: Method | None = None

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > MAX_METADATA_PAIRS:
                raise ValueError(f"at most {MAX_METADATA_PAIRS} metadata pairs")
            if any(len(key) > 64 for key in value):
                raise ValueError("metadata keys are at most 64 characters")
        return value

    @property
    def method_type(self) -> TrainingMethod:
        return self.method.type if self.method else "supervised"  # type: ignore[return-value]

    def method_hyperparameters(self) -> SupervisedHyperparameters:
        if self.method is not None and (self.method.type != "supervised" or self.method.supervised):
            return self.method.hyperparameters()
        return self.hyperparameters or SupervisedHyperparameters()

    @property
    def hyperparameters_param(self) -> str:
        """Where the request's hyperparameters are, as an error's `param` names them."""
        if self.method is not None and getattr(self.method, self.method.type, None) is not None:
            return f"method.{self.method.type}.hyperparameters"
        return "hyperparameters"


class JobMethod(BaseModel):
    """The job's `method` echo; the SDK's own type does not know ftaas's methods."""

    model_config = ConfigDict(extra="allow")
    type: str


class FineTuningJobObject(FineTuningJob):
    status: Literal[  # type: ignore[assignment]
        "validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"
    ]
    method: JobMethod | None = None  # type: ignore[assignment]
    user_provided_suffix: str | None = None
    # As the request gave them (unset fields absent): OpenAI's schema types `tags` as an
    # array, never null, which the SDK's own type would send.
    integrations: list[dict[str, Any]] | None = None  # type: ignore[assignment]


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class JobList(ListPage[FineTuningJobObject]):
    pass


class EventList(ListPage[FineTuningJobEvent]):
    pass


class CheckpointList(ListPage[FineTuningJobCheckpoint]):
    first_id: str | None = None
    last_id: str | None = None
