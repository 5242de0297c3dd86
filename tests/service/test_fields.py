"""What a chat or completions request may ask of a shared engine (service/chat/fields.py)."""

from __future__ import annotations

import pytest

from service.chat.fields import cache_salt, harden
from service.config import Settings
from service.errors import InvalidRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def settings(**values) -> Settings:
    return Settings(home="/tmp/unused", **values)


def refusal(kind: str, body: dict, **values) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        harden(kind, body, "org-a", settings(**values))
    return raised.value


def test_openais_fields_and_safe_extensions_pass_and_the_cache_is_salted_per_organization():
    body = {**CHAT, "temperature": 0, "stream": True, "top_k": 5, "tools": [], "seed": 1}
    hardened = harden("chat", body, "org-a", settings())
    assert {k: hardened[k] for k in body} == body
    assert hardened["cache_salt"] == cache_salt("org-a") != cache_salt("org-b")
    completion = {"model": "m", "prompt": "p", "echo": True, "logprobs": 0, "suffix": "s"}
    assert harden("completion", completion, "org-a", settings())["echo"] is True


def test_other_fields_and_a_clients_own_cache_salt_are_refused_by_name():
    for field in ("guided_regex", "request_id", "priority", "vllm_xargs"):
        error = refusal("chat", {**CHAT, field: "x"})
        assert error.param == field and "Unrecognized request argument" in str(error)
    assert refusal("chat", {**CHAT, "cache_salt": "mine"}).param == "cache_salt"
    assert refusal("completion", {"model": "m", "prompt": "p", "messages": []}).param == "messages"


def test_output_tokens_are_clamped_to_the_configured_limit():
    body = {**CHAT, "n": 4, "max_tokens": 10**6, "max_completion_tokens": 10**6,
            "top_logprobs": 20}  # fmt: skip
    hardened = harden("chat", body, "org-a", settings(max_choices=4, max_output_tokens=256))
    assert (hardened["n"], hardened["max_tokens"], hardened["max_completion_tokens"]) == (
        4, 256, 256,
    )  # fmt: skip
    assert hardened["top_logprobs"] == 20


@pytest.mark.parametrize(
    ("kind", "field", "value", "limit"),
    [("chat", "n", 5, 4), ("completion", "best_of", 5, 4), ("chat", "top_logprobs", 21, 20),
     ("completion", "logprobs", 6, 5)],
)  # fmt: skip
def test_sizes_past_their_bound_are_refused_as_openai_does(kind, field, value, limit):
    body = {**CHAT} if kind == "chat" else {"model": "m", "prompt": "p"}
    error = refusal(kind, {**body, field: value}, max_choices=4)
    assert error.param == field
    assert f"Expected a value <= {limit}, but got {value} instead" in str(error)


def test_a_completion_may_send_a_bounded_number_of_prompts():
    def prompts(prompt: object) -> dict:
        return {"model": "m", "prompt": prompt}

    for fine in ("p", ["a"] * 3, [1, 2, 3] * 1000, [[1, 2]] * 3):
        harden("completion", prompts(fine), "org-a", settings(max_prompts=3))
    for too_many in (["a"] * 4, [[1]] * 4, ["a"] * 500_000):
        error = refusal("completion", prompts(too_many), max_prompts=3)
        assert error.param == "prompt" and "maximum length 3" in str(error)


def test_media_is_fetched_only_from_allowed_domains():
    def with_image(url: str) -> dict:
        part = {"type": "image_url", "image_url": {"url": url}}
        return {**CHAT, "messages": [{"role": "user", "content": [part]}]}

    error = refusal("chat", with_image("http://169.254.169.254/latest/meta-data"))
    assert error.param == "messages[0].content[0].image_url"
    allowed = settings(allowed_media_domains="images.example.com")
    harden("chat", with_image("https://images.example.com/cat.png"), "org-a", allowed)
    harden("chat", with_image("data:image/png;base64,AAAA"), "org-a", settings())


def test_tools_without_a_tool_call_parser_are_answered_in_text_not_refused():
    from service.chat.fields import tool_choice_for

    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {**CHAT, "tools": tools}
    assert tool_choice_for(body, can_choose_tools=False)["tool_choice"] == "none"
    assert "tool_choice" not in tool_choice_for(body, can_choose_tools=True)
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "f"}}}
    assert tool_choice_for(named, can_choose_tools=False) == named
    assert tool_choice_for({**body, "tool_choice": "required"}, False)["tool_choice"] == "required"
    assert tool_choice_for(CHAT, can_choose_tools=False) == CHAT
