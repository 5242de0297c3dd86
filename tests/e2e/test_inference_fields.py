"""Hardened inference on the real engine: every answer is made with the organization's
cache salt (vLLM takes it), sizes are bounded, vLLM's other fields and a client's own salt
are refused by name, and media URLs are not fetched."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

from tests.e2e.conftest import wait_for_serving

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    client = server.client()
    wait_for_serving(client, "ftaas-tiny")
    return client


def test_the_engine_answers_salted_bounded_requests(client):
    reply = client.chat.completions.create(
        model="ftaas-tiny", messages=HI, n=8, max_tokens=2, temperature=1,
        extra_body={"top_k": 5},
    )  # fmt: skip
    assert len(reply.choices) == 8  # FTAAS_MAX_CHOICES
    stream = client.completions.create(model="ftaas-tiny", prompt="The", max_tokens=3, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    several = client.completions.create(model="ftaas-tiny", prompt=["A", "B"], max_tokens=2)
    assert sorted(c.index for c in several.choices) == [0, 1]


def test_sizes_past_their_bound_are_refused_and_the_server_stays_up(client):
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="ftaas-tiny", messages=HI, n=9, max_tokens=2)
    assert refused.value.body["param"] == "n"  # type: ignore[index]
    # 20,000 prompts in one small body would be 20,000 generations on the shared engine.
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model="ftaas-tiny", prompt=["a"] * 20_000, max_tokens=1)
    assert refused.value.body["param"] == "prompt"  # type: ignore[index]
    assert client.completions.create(model="ftaas-tiny", prompt="The", max_tokens=2).choices


@pytest.mark.parametrize(
    "extra", [{"cache_salt": "mine"}, {"guided_regex": "a+"}, {"request_id": "x"}]
)
def test_fields_beyond_openais_are_refused_by_name(client, extra):
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="ftaas-tiny", messages=HI, extra_body=extra)
    assert refused.value.body["param"] == next(iter(extra))  # type: ignore[index]


def test_media_urls_are_not_fetched(client):
    image = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(
            model="ftaas-tiny", messages=[{"role": "user", "content": [image]}]
        )
    assert refused.value.body["param"] == "messages[0].content[0].image_url"  # type: ignore[index]
