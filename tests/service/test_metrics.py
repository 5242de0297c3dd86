"""GET /metrics: Prometheus' own parser reads it, it counts what training did, and only the
operator opens it on a server with API keys. What serving puts there (requests, time to
first token, tokens, adapter cache, engine queue) is checked against the real engine in
tests/e2e/test_serving_scale.py."""

from __future__ import annotations

from fastapi.testclient import TestClient
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.service.conftest import api_client
from tests.service.test_reconciler import World


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


def test_metrics_count_jobs_by_status_and_trained_tokens(
    client: TestClient, sdk: OpenAI, parts: dict, settings: Settings
):
    world = World(sdk, parts, settings)
    job_id = world.running()
    world.job()  # a second one, queued behind it (one job runs at a time)
    world.train(job_id, steps=4)  # 100 tokens over 4 steps, all reported
    world.tick()
    scraped = client.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    values = samples(scraped.text)
    assert values[("ftaas_fine_tuning_jobs", (("status", "running"),))] == 1
    assert values[("ftaas_fine_tuning_jobs", (("status", "queued"),))] == 1
    assert values[("ftaas_fine_tuning_jobs", (("status", "failed"),))] == 0
    trained = (
        "ftaas_trained_tokens_total",
        (("base_model", "ftaas-tiny"), ("method", "supervised")),
    )
    assert values[trained] == 100


def test_a_server_with_keys_opens_metrics_only_to_the_metrics_key(settings: Settings, parts):
    keyed = settings.model_copy(update={"api_keys": "key-a:org-a"})
    client = api_client(keyed, parts)
    tenant = {"Authorization": "Bearer key-a"}
    refused = client.get("/metrics", headers=tenant)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "metrics_key_not_set"

    with_key = keyed.model_copy(update={"metrics_key": "scrape-me"})
    client = api_client(with_key, parts)
    assert client.get("/metrics", headers=tenant).status_code == 401
    assert client.get("/metrics").status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert scraped.status_code == 200 and "ftaas_fine_tuning_jobs" in scraped.text


def test_a_step_that_loses_at_commit_counts_its_trained_tokens_once(
    client: TestClient, sdk: OpenAI, parts: dict, settings: Settings
):
    """Review L14: the transaction that read the steps fails at its commit (another writer
    changed the job first), so it rolls back and the next tick reads the same steps."""
    from sqlalchemy.orm.exc import StaleDataError

    world = World(sdk, parts, settings)
    job_id = world.running()
    world.train(job_id, steps=4)
    conflicts: list[bool] = []

    def conflict_at_the_first_commit(session: object) -> None:
        if not conflicts:
            conflicts.append(True)
            raise StaleDataError("the job changed under the step")

    assert world.reconciler.tick(fence=conflict_at_the_first_commit).conflicts == [job_id]
    world.tick()
    trained = (
        "ftaas_trained_tokens_total",
        (("base_model", "ftaas-tiny"), ("method", "supervised")),
    )
    assert samples(client.get("/metrics").text)[trained] == 100
