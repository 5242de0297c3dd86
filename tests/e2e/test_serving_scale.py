"""Serving at scale on the real stack: two replicas of ftaas-tiny's vLLM engine under Ray
Serve, with limits small enough to reach (tests/e2e/conftest.py E2E_SERVING: per replica
one adapter per batch, two in host memory, two registered; four requests in flight and
four queued). Everything is observed as a user or an operator would: answers through the
SDK, and GET /metrics read with Prometheus' own parser."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from openai import APITimeoutError, AsyncOpenAI, OpenAI, RateLimitError
from openai.types import Model
from prometheus_client.parser import text_string_to_metric_families

from tests.adapters import archive, random_adapter
from tests.conftest import peft_greedy
from tests.e2e.conftest import METRICS_KEY, REAL, RunningServer, greedy, wait_for_serving

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

QUESTION = "What is the capital of France?"
# A whole answer takes the real model several seconds on two cores.
HANGING_UP: dict[str, Any] = {
    "model": REAL,
    "prompt": "Once upon a time",
    "max_tokens": 100,
    "extra_body": {"min_tokens": 100},
}
# Replicas post their state every 0.5 s (serving/deployment.py STATS_INTERVAL_S).
SETTLE_S = 1.2

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    client = server.client()
    wait_for_serving(client, "ftaas-tiny")
    return client


def scrape(server: RunningServer, settle: bool = False) -> Samples:
    if settle:
        time.sleep(SETTLE_S)
    request = urllib.request.Request(
        f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    parsed: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def by_replica(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for (sample, sample_labels), value in samples.items():
        as_dict = dict(sample_labels)
        if sample == name and labels.items() <= as_dict.items():
            found[as_dict["replica"]] = found.get(as_dict["replica"], 0) + value
    return found


@pytest.fixture(scope="module")
def adapters(client: OpenAI, tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Six tuned models (random adapters, imported): more than the two replicas can hold."""
    made = {}
    for seed in range(6):
        folder = random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed)
        upload = client.files.create(file=("a.tar.gz", archive(folder)), purpose="user_data")
        model = client.post(
            "/models",
            body={"base_model": "ftaas-tiny", "adapter_file": upload.id, "suffix": f"r{seed}"},
            cast_to=Model,
        )
        made[model.id] = folder
    return made


def run_together(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def whole_characters(text: str) -> str:
    """vLLM holds back a last token that ends inside a UTF-8 character; transformers'
    decode shows it as U+FFFD. Random adapters say such things."""
    return text.rstrip("\ufffd")


def test_metrics_parse_and_move_with_traffic(server: RunningServer, client: OpenAI):
    before = scrape(server)
    greedy(client, "ftaas-tiny", QUESTION)
    streamed = client.chat.completions.create(
        model="ftaas-tiny", messages=[{"role": "user", "content": QUESTION}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    after = scrape(server, settle=True)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    base = {"base_model": "ftaas-tiny", "model": "ftaas-tiny"}
    assert moved("ftaas_requests_total", **base, kind="chat", status="200") == 2
    assert moved("ftaas_request_duration_seconds_count", **base) == 2
    assert moved("ftaas_time_to_first_token_seconds_count", **base) == 1  # the streamed one
    assert moved("ftaas_generated_tokens_total", **base) > 0
    assert moved("ftaas_prompt_tokens_total", **base) > 0
    assert len(by_replica(after, "ftaas_serving_engine_requests", base_model="ftaas-tiny")) == 2
    assert total(after, "ftaas_serving_requests_in_flight") == 0
    assert ("ftaas_fine_tuning_jobs", (("status", "queued"),)) in after
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.base_url}/metrics")
    assert refused.value.code == 401


def test_more_adapters_than_slots_answer_as_transformers_peft_after_reloads(
    server: RunningServer, client: OpenAI, adapters: dict[str, Path], tiny_model_dir: Path
):
    expected = {
        model: whole_characters(peft_greedy(folder, tiny_model_dir, QUESTION))
        for model, folder in adapters.items()
    }
    assert len(set(expected.values())) > 1  # the adapters do change the answers
    before = scrape(server)
    for _ in range(2):
        for model in adapters:
            assert whole_characters(greedy(client, model, QUESTION)) == expected[model], model
    after = scrape(server, settle=True)
    registry = {"name": "ftaas_adapter_cache_events_total", "tier": "registry"}

    def moved(event: str) -> float:
        name = registry["name"]
        return total(after, name, tier="registry", event=event) - total(
            before, name, tier="registry", event=event
        )

    # Six adapters over 2 × 2 registrations: some were evicted, and loaded again when asked.
    assert moved("eviction") > 0
    assert moved("load") > len(adapters)


def test_a_second_request_for_an_adapter_goes_where_it_is_loaded(
    server: RunningServer, client: OpenAI, adapters: dict[str, Path]
):
    model = next(iter(adapters))
    greedy(client, model, QUESTION)  # registered on some replica (or already there)
    before = scrape(server, settle=True)  # and the routers have heard where
    for _ in range(8):
        greedy(client, model, QUESTION)
    after = scrape(server, settle=True)
    name = "ftaas_adapter_cache_events_total"
    hits_then = by_replica(before, name, base_model="ftaas-tiny", tier="registry", event="hit")
    hits = {
        r: v - hits_then.get(r, 0)
        for r, v in by_replica(
            after, name, base_model="ftaas-tiny", tier="registry", event="hit"
        ).items()
    }
    loads = total(after, name, tier="registry", event="load") - total(
        before, name, tier="registry", event="load"
    )
    assert loads == 0, "the adapter was loaded again somewhere"
    assert sorted(hits.values()) == [0, 8], hits  # every request on the replica holding it


def test_a_client_that_hangs_up_stops_its_generation(server: RunningServer, client: OpenAI):
    # On the real model: ftaas-tiny decodes faster than its chunks travel, so its answers
    # are whole in the engine before a client could hang up.
    wait_for_serving(client, REAL, timeout=600)
    real = {"base_model": REAL}

    def generated() -> float:
        return total(scrape(server), "ftaas_serving_engine_generated_tokens_total", **real)

    def idle(settle: bool = False) -> bool:
        return total(scrape(server, settle), "ftaas_serving_engine_requests", **real) == 0

    def settled_generated() -> float:
        """Tokens generated once the engines hold no request (twice in a row, a settle
        apart: a request may be on its way to them)."""
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the engines kept generating"
            before = generated()
            if idle() and idle(settle=True) and generated() == before:
                return before
            time.sleep(0.2)

    def hung_up() -> tuple[float, float]:
        """Requests the server counted, and those of them counted as 499."""
        samples = scrape(server, settle=True)
        return total(samples, "ftaas_requests_total", **real), total(
            samples, "ftaas_requests_total", **real, status="499"
        )

    # Streaming: the client reads one chunk and closes the stream.
    start, (counted, closed) = settled_generated(), hung_up()
    stream = client.completions.create(**HANGING_UP, stream=True)
    next(iter(stream))
    stream.close()
    assert settled_generated() - start < HANGING_UP["max_tokens"] / 2
    assert hung_up() == (counted + 1, closed + 1)  # counted, as 499

    # Not streaming: clients give up waiting. The engines drop their requests at once, a
    # small part of the way into the answers.
    def ask(impatient: OpenAI) -> None:
        with contextlib.suppress(APITimeoutError):
            impatient.completions.create(**HANGING_UP)

    impatient = server.client(timeout=0.5)
    start, (counted, closed) = settled_generated(), hung_up()
    run_together([threading.Thread(target=ask, args=(impatient,)) for _ in range(4)])
    assert settled_generated() - start < 4 * HANGING_UP["max_tokens"] / 2
    # Each one the server saw (a client may give up before its request is read) is a 499.
    now_counted, now_closed = hung_up()
    assert 1 <= now_closed - closed == now_counted - counted <= 4


def test_a_full_serving_queue_answers_429_with_retry_after_and_stays_up(
    server: RunningServer, client: OpenAI
):
    rejected_before = total(scrape(server), "ftaas_serving_rejected_requests_total")

    async def burst() -> list[str]:
        overloaded = AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key=server.client().api_key, max_retries=0
        )

        async def one() -> str:
            try:
                await overloaded.completions.create(model="ftaas-tiny", prompt="hi", max_tokens=200)
                return "answered"
            except RateLimitError as error:
                assert error.code == "engine_overloaded"
                assert int(error.response.headers["retry-after"]) >= 1
                return "429"

        return await asyncio.gather(*[one() for _ in range(30)])

    outcomes = Counter(asyncio.run(burst()))
    assert outcomes["answered"] >= 4 and outcomes["429"] >= 1, outcomes
    assert sum(outcomes.values()) == 30  # nothing else: no 500, no hang
    rejected = total(scrape(server), "ftaas_serving_rejected_requests_total") - rejected_before
    assert rejected == outcomes["429"]
    assert greedy(client, "ftaas-tiny", QUESTION) is not None  # and it still answers
