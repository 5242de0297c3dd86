"""The training-data schema: one JSON object per JSONL line, as OpenAI documents it.

Used by the upload route (to accept or refuse a file) and by the trainer (to read it), so
the two can never disagree about what a valid example is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


def content_text(content: Content | None) -> str:
    """The plain text of a message's content (text parts are joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    # OpenAI: 0 means "context only, do not learn this turn"; 1 (the default) means learn it.
    weight: Literal[0, 1] = 1

    @model_validator(mode="after")
    def _has_content_or_call(self) -> AssistantMessage:
        if not content_text(self.content) and not self.tool_calls and not self.function_call:
            raise ValueError("an assistant message needs content, tool_calls or function_call")
        return self


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(_Strict):
    role: Literal["function"]
    content: Content | None = None
    name: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ChatExample(_Strict):
    """A supervised example: a conversation whose weighted assistant turns are learned."""

    messages: list[Message] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    functions: list[FunctionDefinition] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _has_assistant_turn(cls, messages: list[Any]) -> list[Any]:
        if not any(message.role == "assistant" for message in messages):
            raise ValueError("the example has no assistant message to learn from")
        return messages


class PromptCompletionExample(_Strict):
    """The legacy completions format: learn `completion` after `prompt`."""

    prompt: str
    completion: str = Field(min_length=1)


class PreferenceInput(_Strict):
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    parallel_tool_calls: bool | None = None


class PreferenceExample(_Strict):
    """A DPO example; older spec revisions named the outputs `*_completion`."""

    input: PreferenceInput
    preferred_output: list[AssistantMessage] = Field(min_length=1, max_length=1)
    non_preferred_output: list[AssistantMessage] = Field(min_length=1, max_length=1)

    @model_validator(mode="before")
    @classmethod
    def _accept_old_key_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for old, new in (
                ("preferred_completion", "preferred_output"),
                ("non_preferred_completion", "non_preferred_output"),
            ):
                if old in data and new not in data:
                    data[new] = data.pop(old)
        return data


class TextExample(_Strict):
    """A document for continued pre-training: every token of `text` is learned."""

    text: str = Field(min_length=1)


class ReinforcementExample(BaseModel):
    """A reinforcement fine-tuning prompt: a conversation that ends with the user's turn
    (the model answers it, the job's grader scores the answer). Every other key is the
    grader's to read as `{{item.KEY}}`; `messages` and `tools` are the reserved ones."""

    model_config = ConfigDict(extra="allow")

    messages: list[Message] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages: list[Any]) -> list[Any]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's: the model answers it")
        return messages

    @property
    def item(self) -> dict[str, Any]:
        """The row as graders see it (`{{item.*}}`): every key, the reserved ones too."""
        return self.model_dump(mode="json", exclude_none=True)


DataFormat = Literal["chat", "prompt_completion", "preference", "text", "reinforcement"]

EXAMPLE_MODELS: dict[DataFormat, type[BaseModel]] = {
    "chat": ChatExample,
    "prompt_completion": PromptCompletionExample,
    "preference": PreferenceExample,
    "text": TextExample,
    "reinforcement": ReinforcementExample,
}


def detect_format(row: dict[str, Any]) -> DataFormat:
    """Which format a row claims to be, from its keys (the validator then checks it)."""
    if "input" in row or "preferred_output" in row or "preferred_completion" in row:
        return "preference"
    if "prompt" in row and "messages" not in row:
        return "prompt_completion"
    if "text" in row and "messages" not in row:
        return "text"
    messages = row.get("messages") or []
    # A conversation the user has the last word in is a prompt to answer, unless it is a
    # chat example with a learned turn earlier and nothing for a grader.
    ends_with_user = (
        isinstance(messages, list)
        and len(messages) > 0
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") == "user"
    )
    if ends_with_user and (
        set(row) - CHAT_KEYS
        or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    ):
        return "reinforcement"
    return "chat"


CHAT_KEYS = frozenset(ChatExample.model_fields)
