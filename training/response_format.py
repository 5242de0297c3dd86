"""A reinforcement job's `response_format` (OpenAI's guide puts it at
`method.reinforcement.response_format`): the shape every sampled answer must have.

OpenAI's three kinds: `text` (no constraint), `json_object` (any JSON object) and
`json_schema` (`{"name", "schema", "strict"?, "description"?}`). The model is checked by the
API at job creation (this module imports neither torch nor xgrammar at its top); the
trainer turns it into a grammar that masks the logits while it samples
(training/sampling.py), with xgrammar, the structured-output engine vLLM itself uses, so
training answers are shaped as the served model's answers are when a client asks for the
same `response_format`. The grader then reads each answer as `{{sample.output_json}}`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The schema, serialised: a bound on what a job carries and the trainer compiles.
MAX_SCHEMA_BYTES = 64 * 1024


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Annotated[str, Field(max_length=4096)] | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(schema))
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"the schema is {size} bytes, more than {MAX_SCHEMA_BYTES}")
        return schema


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`type: json_schema` needs `json_schema`")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError("`json_schema` is for `type: json_schema` only")
        return self

    def as_dict(self) -> dict[str, Any]:
        """As OpenAI spells it (`schema`), for the job and the trainer's spec."""
        return self.model_dump(by_alias=True, exclude_none=True)


def compile_grammar(
    response_format: dict[str, Any], tokenizer: Any, vocab_size: int, stop_token_ids: list[int]
) -> Any:
    """The xgrammar grammar answers must follow, compiled for this tokenizer; None for
    `text`. A schema xgrammar cannot express raises ValueError naming the field."""
    shape = ResponseFormat.model_validate(response_format)
    if shape.type == "text":
        return None
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
    )
    compiler = xgr.GrammarCompiler(info)
    if shape.json_schema is None:
        return compiler.compile_builtin_json_grammar()
    try:
        # No free whitespace between tokens: a model could otherwise spend its whole answer
        # budget on spaces that every JSON parser accepts.
        return compiler.compile_json_schema(
            json.dumps(shape.json_schema.json_schema),
            any_whitespace=False,
            strict_mode=shape.json_schema.strict is True,
        )
    except RuntimeError as error:
        raise ValueError(
            f"method.reinforcement.response_format.json_schema.schema: {error}"
        ) from None
