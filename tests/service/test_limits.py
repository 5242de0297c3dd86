"""Rate limits and quotas per organization, as the official SDK meets them."""

from __future__ import annotations

import io
from types import SimpleNamespace

import openai
import pytest
from openai import OpenAI

from service.config import OrganizationLimits, Settings
from service.organization.limits import Limits, duration
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client


def limited(settings: Settings, parts: dict, **limits: int) -> Settings:
    """The same stores, with these limits for every organization; the services count with
    the returned settings too."""
    changed = Settings(
        home=settings.home,
        database_url=settings.database_url,
        serving_enabled=False,
        api_keys="key-a:org-a,key-b:org-b",
        limits=OrganizationLimits(**limits),
    )
    parts["limits"].settings = changed
    return changed


def sdk_for(client, key: str, statuses: list[int], max_retries: int = 2) -> OpenAI:  # type: ignore[no-untyped-def]
    client.event_hooks["response"] = [lambda response: statuses.append(response.status_code)]
    return OpenAI(
        base_url="http://127.0.0.1/v1", api_key=key, http_client=client, max_retries=max_retries
    )


def test_every_answer_carries_openais_rate_limit_headers(settings: Settings, parts: dict):
    client = api_client(limited(settings, parts, requests_per_minute=100), parts)
    first = client.get("/v1/files", headers={"Authorization": "Bearer key-a"})
    second = client.get("/v1/files", headers={"Authorization": "Bearer key-a"})
    assert first.headers["x-ratelimit-limit-requests"] == "100"
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    assert second.headers["x-ratelimit-remaining-requests"] == "98"
    assert second.headers["x-ratelimit-reset-requests"].endswith("s")


def test_over_the_rate_the_sdk_waits_and_retries(settings: Settings, parts: dict):
    # 60 a minute, one a second. The limiter's clock stands still except for the time the
    # SDK waits, as `retry-after` told it: the test does not race the refill.
    client = api_client(limited(settings, parts, requests_per_minute=60), parts)
    clock = [1_000.0]
    parts["limits"].clock = lambda: clock[0]
    statuses: list[int] = []

    def waited(response) -> None:  # type: ignore[no-untyped-def]
        statuses.append(response.status_code)
        if response.status_code == 429:
            clock[0] += int(response.headers["retry-after"])

    sdk = sdk_for(client, "key-a", statuses)
    for _ in range(60):  # the minute's bucket, emptied
        sdk.files.list()
    statuses.clear()
    client.event_hooks["response"] = [waited]
    sdk.files.list()  # refused, then retried after `retry-after`: the caller sees success
    assert statuses == [429, 200]
    client.event_hooks["response"] = []

    refused = client.get("/v1/files", headers={"Authorization": "Bearer key-a"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Another organization has its own minute.
    assert client.get("/v1/files", headers={"Authorization": "Bearer key-b"}).status_code == 200


def test_files_and_bytes_are_bounded_per_organization(settings: Settings, parts: dict):
    client = api_client(limited(settings, parts, files=2, storage_bytes=5_000), parts)
    statuses: list[int] = []
    sdk = sdk_for(client, "key-a", statuses)
    data = memorisation_jsonl()
    assert len(data) < 2_500
    for _ in range(2):
        sdk.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
    statuses.clear()
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert statuses == [429]  # told not to retry: waiting would not help
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert refused.value.body["code"] == "file_quota_exceeded"  # type: ignore[index]
    assert refused.value.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert len(sdk.files.list().data) == 2  # nothing half-stored

    # Bytes: an upload declaring more than is left is refused before a part arrives.
    sdk_b = sdk_for(client, "key-b", statuses)
    with pytest.raises(openai.RateLimitError) as too_big:
        sdk_b.uploads.create(
            bytes=6_000, filename="big.jsonl", mime_type="text/jsonl", purpose="fine-tune"
        )
    assert too_big.value.body["code"] == "storage_quota_exceeded"  # type: ignore[index]
    pending = sdk_b.uploads.create(
        bytes=4_000, filename="a.jsonl", mime_type="text/jsonl", purpose="fine-tune"
    )
    assert pending.status == "pending"
    with pytest.raises(openai.RateLimitError):  # the pending upload holds its bytes
        sdk_b.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
    sdk_b.uploads.cancel(pending.id)
    sdk_b.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")

    # Deleting frees the room.
    sdk.files.delete(sdk.files.list().data[0].id)
    sdk.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")


def test_jobs_not_yet_finished_are_bounded(settings: Settings, parts: dict):
    client = api_client(limited(settings, parts, active_jobs=2), parts)
    statuses: list[int] = []
    sdk = sdk_for(client, "key-a", statuses)
    file = sdk.files.create(file=("t.jsonl", io.BytesIO(memorisation_jsonl())), purpose="fine-tune")
    jobs = [
        sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file.id) for _ in range(2)
    ]
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file.id)
    assert refused.value.body["code"] == "job_quota_exceeded"  # type: ignore[index]
    sdk.fine_tuning.jobs.cancel(jobs[0].id)
    parts["reconciler"].tick()  # cancelled
    assert sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file.id).status


def test_resuming_a_paused_job_counts_against_the_limit(settings: Settings, parts: dict):
    client = api_client(limited(settings, parts, active_jobs=1), parts)
    sdk = sdk_for(client, "key-a", [])
    file = sdk.files.create(file=("t.jsonl", io.BytesIO(memorisation_jsonl())), purpose="fine-tune")
    first = sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file.id)
    parts["reconciler"].tick()  # queued
    assert sdk.fine_tuning.jobs.pause(first.id).status == "paused"  # not counted now
    sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file.id)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.fine_tuning.jobs.resume(first.id)
    assert refused.value.body["code"] == "job_quota_exceeded"  # type: ignore[index]
    assert sdk.fine_tuning.jobs.retrieve(first.id).status == "paused"


def test_concurrent_inference_slots_are_held_until_released():
    limits = Limits(Settings(limits=OrganizationLimits(concurrent_requests=2)))
    first, second = limits.inference_slot("org-a"), limits.inference_slot("org-a")
    with pytest.raises(Exception) as refused:
        limits.inference_slot("org-a")
    assert getattr(refused.value, "status_code", None) == 429
    assert refused.value.extra_headers["retry-after"] == "1"  # type: ignore[attr-defined]
    limits.inference_slot("org-b")  # another organization's own slots
    first()
    first()  # released twice: counted once
    assert limits.in_flight("org-a") == 1
    third = limits.inference_slot("org-a")
    second(), third()
    assert limits.in_flight("org-a") == 0


def test_per_organization_limits_override_the_defaults():
    settings = Settings(
        limits=OrganizationLimits(files=10), organization_limits={"big": {"files": 1_000}}
    )
    assert settings.limits_of("big").files == 1_000
    assert settings.limits_of("big").requests_per_minute == settings.limits.requests_per_minute
    assert settings.limits_of("small").files == 10
    assert [duration(s) for s in (0.02, 1, 59.5, 360)] == ["20ms", "1s", "1m0s", "6m0s"]


def test_a_mistyped_organization_limit_is_refused_at_start():
    with pytest.raises(ValueError):
        Settings(organization_limits={"big": {"filez": 1}})


def test_several_api_processes_together_admit_the_limit():
    """Rates and concurrency live in each process's memory: with FTAAS_API_PROCESSES=2
    each admits half, so two processes together admit what one would alone."""

    settings = Settings(
        api_processes=2, limits=OrganizationLimits(requests_per_minute=10, concurrent_requests=3)
    )
    processes = [Limits(settings, clock=lambda: 1_000.0) for _ in range(2)]
    admitted = 0
    for process in processes:
        for _ in range(10):
            try:
                process.admit_request(SimpleNamespace(state=SimpleNamespace()), "org-a")
                admitted += 1
            except Exception as refused:
                assert getattr(refused, "status_code", None) == 429
                assert "this API process's share of 10" in str(refused)
    assert admitted == 10
    slots = [process.inference_slot("org-a") for process in processes]  # 1 each (3 // 2)
    for process in processes:
        with pytest.raises(Exception, match="share of 3"):
            process.inference_slot("org-a")
    for release in slots:
        release()
    # A limit below the process count still lets each process answer one at a time.
    tiny = Limits(Settings(api_processes=4, limits=OrganizationLimits(concurrent_requests=2)))
    assert tiny.share(2) == 1
    tiny.inference_slot("org-a")
