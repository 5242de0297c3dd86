"""OpenAI's grader objects, defined once for the API (validate, run, job creation) and the
trainer (rewards). Fields and bounds follow openai-python's `types/graders/*` and the
graders guide (shared/reference/openai-rft-and-webhooks.md, section 1.3).

Pydantic only: importable without torch, vLLM or the service.
"""

from __future__ import annotations

import ast
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The guide's limit on a python grader's source ("code < 256 kB").
MAX_PYTHON_SOURCE_BYTES = 256 * 1024

StringOperation = Literal["eq", "ne", "like", "ilike"]
SimilarityMetric = Literal[
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
]


class _Grader(BaseModel):
    # `pass_threshold` is an evals field the guide shows on graders: accepted, ignored.
    model_config = ConfigDict(extra="forbid")

    name: str
    pass_threshold: float | None = Field(default=None, exclude=True)


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: StringOperation


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: SimilarityMetric

    @field_validator("evaluation_metric")
    @classmethod
    def _not_cosine(cls, metric: str) -> str:
        if metric == "cosine":
            raise ValueError(
                "the `cosine` metric is only available for evals at OpenAI (it embeds with "
                "text-embedding-3-large) and not for graders: choose fuzzy_match, bleu, gleu, "
                "meteor, rouge_1..rouge_5 or rouge_l"
            )
        return metric


class PythonGrader(_Grader):
    type: Literal["python"]
    source: str
    image_tag: str | None = None

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, source: str) -> str:
        if len(source.encode()) > MAX_PYTHON_SOURCE_BYTES:
            raise ValueError(f"the source must be at most {MAX_PYTHON_SOURCE_BYTES} bytes")
        # Parsed, never run, here: the code runs only in the sandbox.
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
            raise ValueError(f"the source does not parse: {error}") from None
        grades = [
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "grade"
        ]
        if not grades:
            raise ValueError("the source must define grade(sample, item) at its top level")
        args = grades[-1].args
        positional = len(args.posonlyargs) + len(args.args)
        if positional != 2 or args.vararg or args.kwonlyargs or args.kwarg:
            raise ValueError("grade must take exactly two arguments: grade(sample, item)")
        return source


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text"]
    text: str


class OutputText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["output_text"]
    text: str


class InputImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_image"]
    image_url: str
    detail: str | None = None


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


ContentPart = Annotated[
    InputText | OutputText | InputImage | InputAudio, Field(discriminator="type")
]


class GraderMessage(BaseModel):
    """One message of a model grader's prompt; its text may hold templates."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant", "system", "developer"]
    content: str | ContentPart | list[ContentPart]
    type: Literal["message"] | None = None


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int | None = None
    top_p: float | None = Field(default=None, ge=0, le=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    # OpenAI's spelling, with an s.
    max_completions_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )


class ScoreModelGrader(_Grader):
    type: Literal["score_model"]
    model: str = Field(min_length=1)
    input: list[GraderMessage] = Field(min_length=1)
    range: list[float] | None = Field(default=None, min_length=2, max_length=2)
    sampling_params: SamplingParams | None = None

    @field_validator("range")
    @classmethod
    def _ordered(cls, bounds: list[float] | None) -> list[float] | None:
        if bounds is not None and bounds[0] >= bounds[1]:
            raise ValueError("range must be [min, max] with min < max")
        return bounds

    @property
    def bounds(self) -> tuple[float, float]:
        low, high = self.range or (0.0, 1.0)
        return low, high


class LabelModelGrader(_Grader):
    type: Literal["label_model"]
    model: str = Field(min_length=1)
    input: list[GraderMessage] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _passing_are_labels(self) -> LabelModelGrader:
        unknown = sorted(set(self.passing_labels) - set(self.labels))
        if unknown:
            raise ValueError(f"passing_labels {unknown} are not among labels")
        return self


SubGrader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader,
    Field(discriminator="type"),
]


class MultiGrader(_Grader):
    """Sub-graders by name, combined by `calculate_output` (training/graders/formula.py).

    The guides send `graders` as a dict; OpenAI's OpenAPI example sends a list and the
    SDK types one grader: a list or a single grader is keyed by each sub-grader's name."""

    type: Literal["multi"]
    graders: dict[str, SubGrader] = Field(min_length=1)
    calculate_output: str = Field(min_length=1)

    @field_validator("graders", mode="before")
    @classmethod
    def _keyed_by_name(cls, graders: Any) -> Any:
        if isinstance(graders, dict) and isinstance(graders.get("type"), str):
            graders = [graders]  # one grader object, as the SDK types it
        if not isinstance(graders, list):
            return graders
        keyed: dict[str, Any] = {}
        for index, grader in enumerate(graders):
            name = grader.get("name") if isinstance(grader, dict) else None
            if not isinstance(name, str) or not name:
                raise ValueError(f"graders[{index}] needs a name to be referred to by")
            if name in keyed:
                raise ValueError(f"two graders are named {name!r}")
            keyed[name] = grader
        return keyed

    @field_validator("calculate_output")
    @classmethod
    def _formula_names_graders(cls, formula: str, info: ValidationInfo) -> str:
        from training.graders.formula import parse_formula

        graders = info.data.get("graders")
        if graders is not None:  # else graders' own error is reported
            parse_formula(formula, set(graders))  # raises FormulaError, a ValueError
        return formula


# What a job's `method.reinforcement.grader` and the grader endpoints accept: label_model
# only inside multi.
Grader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | MultiGrader,
    Field(discriminator="type"),
]
AnyGrader = (
    StringCheckGrader
    | TextSimilarityGrader
    | PythonGrader
    | ScoreModelGrader
    | LabelModelGrader
    | MultiGrader
)
