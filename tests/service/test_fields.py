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


def test_sizes_are_clamped_to_the_configured_limits():
    body = {**CHAT, "n": 100, "max_tokens": 10**6, "max_completion_tokens": 10**6,
            "top_logprobs": 50}  # fmt: skip
    hardened = harden("chat", body, "org-a", settings(max_choices=4, max_output_tokens=256))
    assert (hardened["n"], hardened["max_tokens"], hardened["max_completion_tokens"]) == (
        4, 256, 256,
    )  # fmt: skip
    assert hardened["top_logprobs"] == 20
    completion = harden("completion", {"model": "m", "prompt": "p", "logprobs": 9, "best_of": 30},
                        "org-a", settings())  # fmt: skip
    assert (completion["logprobs"], completion["best_of"]) == (5, 8)


def test_media_is_fetched_only_from_allowed_domains():
    def with_image(url: str) -> dict:
        part = {"type": "image_url", "image_url": {"url": url}}
        return {**CHAT, "messages": [{"role": "user", "content": [part]}]}

    error = refusal("chat", with_image("http://169.254.169.254/latest/meta-data"))
    assert error.param == "messages[0].content[0].image_url"
    allowed = settings(allowed_media_domains="images.example.com")
    harden("chat", with_image("https://images.example.com/cat.png"), "org-a", allowed)
    harden("chat", with_image("data:image/png;base64,AAAA"), "org-a", settings())
