from training.data.batching import next_token_labels
from training.data.schema import ChatExample, PromptCompletionExample
from training.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example


def learned_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def chat(*messages) -> ChatExample:
    return ChatExample.model_validate({"messages": list(messages)})


def test_only_assistant_tokens_are_learned(tiny_tokenizer):
    example = tokenize_example(
        chat(
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the code?"},
            {"role": "assistant", "content": "pineapple"},
        ),
        tiny_tokenizer,
        512,
    )
    assert learned_text(tiny_tokenizer, example) == "pineapple<|im_end|>\n"
    assert len(example.input_ids) == len(example.labels)


def test_weight_zero_turns_are_context_and_every_weighted_turn_is_learned(tiny_tokenizer):
    example = tokenize_example(
        chat(
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "wrong answer", "weight": 0},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "second"},
        ),
        tiny_tokenizer,
        512,
    )
    learned = learned_text(tiny_tokenizer, example)
    assert "wrong answer" not in learned
    assert learned == "first<|im_end|>\nsecond<|im_end|>\n"


def test_long_examples_are_truncated_from_the_end(tiny_tokenizer):
    example = tokenize_example(
        chat({"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}),
        tiny_tokenizer,
        64,
    )
    assert example.truncated and len(example.input_ids) == 64


def test_prompt_completion_learns_the_completion_and_eos(tiny_tokenizer):
    example = tokenize_example(
        PromptCompletionExample(prompt="The code is", completion=" pineapple"),
        tiny_tokenizer,
        512,
    )
    assert learned_text(tiny_tokenizer, example) == " pineapple<|im_end|>"


TOOL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "<call>{{ call['function']['name'] }}({{ call['function']['arguments'] }})</call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_legacy_function_call_is_learned_as_the_call_it_is(tiny_tokenizer):
    tiny_tokenizer.chat_template, original = TOOL_TEMPLATE, tiny_tokenizer.chat_template
    try:
        example = ChatExample.model_validate(
            {
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "role": "assistant",
                        "function_call": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    },
                    {"role": "function", "name": "weather", "content": "sunny"},
                    {"role": "assistant", "content": "Sunny."},
                ],
                "functions": [{"name": "weather", "parameters": {"type": "object"}}],
            }
        )
        learned = learned_text(tiny_tokenizer, tokenize_example(example, tiny_tokenizer, 512))
    finally:
        tiny_tokenizer.chat_template = original
    assert '<call>weather({"city": "Paris"})</call>' in learned.replace(" ", " ")
    assert "Sunny." in learned and "sunny" not in learned


def test_the_loss_normaliser_counts_exactly_the_labels_some_position_predicts():
    """Review L15: the first label is shifted away (no position predicts it), so it is not
    counted, even where it is a target (a text example with no prompt)."""
    for labels in ([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8], [5, IGNORE_INDEX, 7]):
        example = TokenizedExample(input_ids=[5, 6, 7, 8][: len(labels)], labels=labels)
        predicted = [label for label in next_token_labels(example) if label != IGNORE_INDEX]
        assert example.n_target_tokens == len(predicted)
