"""Examples → token ids and labels, learning only the tokens a user asked to be learned.

For chat examples the base model's own chat template renders the conversation; the
characters each weighted assistant turn adds to the rendering become the targets. Working
on characters (with the tokenizer's offsets) instead of tokenising prefixes separately
keeps the result exact when BPE merges cross a turn boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.data.schema import (
    AssistantMessage,
    ChatExample,
    PreferenceExample,
    PromptCompletionExample,
    ReinforcementExample,
    TextExample,
    content_text,
)

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template does not render a conversation as a sequence of growing prefixes."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_target_tokens(self) -> int:
        """The tokens the loss is taken on: every label but the first, which no position
        predicts (batching.next_token_labels shifts it away)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def _template_messages(example: ChatExample) -> list[dict[str, Any]]:
    """The conversation as chat templates take it. OpenAI's legacy function calling
    (`function_call`, `function` messages) is given to the template as the tool calls it
    became, so that the call is rendered and learned rather than an empty turn."""
    rendered_messages = []
    last_call_id = None
    for number, message in enumerate(example.messages):
        content = content_text(message.content)
        rendered: dict[str, Any] = {"role": message.role, "content": content}
        for key in ("name", "tool_call_id"):
            if getattr(message, key, None) is not None:
                rendered[key] = getattr(message, key)
        if isinstance(message, AssistantMessage) and message.tool_calls:
            rendered["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if isinstance(message, AssistantMessage) and message.function_call is not None:
            last_call_id = f"call_{number}"
            function = message.function_call.model_dump()
            rendered["tool_calls"] = [
                {"id": last_call_id, "type": "function", "function": function}
            ]
        if message.role == "function":
            rendered.update(role="tool", tool_call_id=last_call_id or f"call_{number}")
        rendered_messages.append(rendered)
    return rendered_messages


def _tools(example: ChatExample) -> list[dict[str, Any]] | None:
    if example.tools:
        return [tool.model_dump(exclude_none=True) for tool in example.tools]
    if example.functions:  # legacy: the same definitions, as tools
        return [
            {"type": "function", "function": f.model_dump(exclude_none=True)}
            for f in example.functions
        ]
    return None


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, *, prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=prompt
    )


def _target_spans(example: ChatExample, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    tools = _tools(example)
    messages = _template_messages(example)
    full_text = _render(tokenizer, messages, tools, prompt=False)
    spans = []
    for index, message in enumerate(example.messages):
        if not isinstance(message, AssistantMessage) or message.weight == 0:
            continue
        before = _render(tokenizer, messages[:index], tools, prompt=True)
        through = _render(tokenizer, messages[: index + 1], tools, prompt=False)
        if not (through.startswith(before) and full_text.startswith(through)):
            raise TemplateError(
                "the chat template does not render conversations as growing prefixes, "
                "so assistant turns cannot be located"
            )
        spans.append((len(before), len(through)))
    return full_text, spans


def _label_by_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], max_length: int
) -> TokenizedExample:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (start, _end) in enumerate(encoding["offset_mapping"]):
        if any(low <= start < high for low, high in spans):
            labels[position] = input_ids[position]
    truncated = len(input_ids) > max_length
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated)


def tokenize_chat(example: ChatExample, tokenizer: Any, max_length: int) -> TokenizedExample:
    text, spans = _target_spans(example, tokenizer)
    return _label_by_spans(tokenizer, text, spans, max_length)


def tokenize_prompt_completion(
    example: PromptCompletionExample, tokenizer: Any, max_length: int
) -> TokenizedExample:
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    text = bos + example.prompt + example.completion + eos
    start = len(bos) + len(example.prompt)
    return _label_by_spans(tokenizer, text, [(start, len(text))], max_length)


def tokenize_example(example: Any, tokenizer: Any, max_length: int) -> TokenizedExample:
    if isinstance(example, ChatExample):
        return tokenize_chat(example, tokenizer, max_length)
    if isinstance(example, PromptCompletionExample):
        return tokenize_prompt_completion(example, tokenizer, max_length)
    raise TypeError(f"supervised training cannot use {type(example).__name__} rows")


def tokenize_preference(
    example: PreferenceExample, tokenizer: Any, max_length: int
) -> tuple[TokenizedExample, TokenizedExample]:
    """The preferred and the non-preferred conversation, each learned only on its final
    answer (earlier assistant turns of the input are context, whatever their weight)."""
    context = [
        message.model_copy(update={"weight": 0})
        if isinstance(message, AssistantMessage)
        else message
        for message in example.input.messages
    ]

    def conversation(output: AssistantMessage) -> TokenizedExample:
        chat = ChatExample.model_construct(
            messages=[*context, output.model_copy(update={"weight": 1})],
            tools=example.input.tools,
            functions=None,
            parallel_tool_calls=example.input.parallel_tool_calls,
        )
        return tokenize_chat(chat, tokenizer, max_length)

    return conversation(example.preferred_output[0]), conversation(example.non_preferred_output[0])


def tokenize_prompt(example: ReinforcementExample, tokenizer: Any) -> list[int]:
    """A reinforcement prompt as the model sees it before answering: the conversation
    rendered by the chat template, with the assistant's turn opened (as serving renders a
    chat request)."""
    chat = ChatExample.model_construct(
        messages=example.messages, tools=example.tools, functions=None, parallel_tool_calls=None
    )
    text = _render(tokenizer, _template_messages(chat), _tools(chat), prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_text(example: TextExample, tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """A document as blocks of at most `max_length` tokens that overlap by one: a block's
    first token is the previous block's last, there only as context, so every token after
    the document's first is learned exactly once.

    The text is encoded as the tokenizer encodes any prompt (with its own special tokens,
    as vLLM does for a completions prompt), then ends with the end-of-text token, so the
    model learns where documents stop."""
    ids = list(tokenizer(example.text)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    stride = max(max_length - 1, 1)
    blocks = []
    for start in range(0, max(len(ids) - 1, 1), stride):
        block = ids[start : start + max_length]
        blocks.append(TokenizedExample(block, [IGNORE_INDEX, *block[1:]]))
    return blocks
