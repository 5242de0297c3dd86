"""Isolation on every route: organization B tries every route of the app's own route table
on organization A's objects (files, uploads, jobs, events, checkpoints, models, checkpoint
models, adapters, keys, secrets), and gets what it gets for an object that does not exist:
the same status and error code, with nothing of A's in the answer; lists hold none of A's.

A route added later without a case here fails `test_every_route_has_an_attempt`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.config import Settings
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client
from training.progress import Checkpoint, Metrics, ProgressLog, Started, Succeeded

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
ADMIN_A = {"Authorization": "Bearer admin-a-000000000000000000"}
ADMIN_B = {"Authorization": "Bearer admin-b-000000000000000000"}


@dataclass
class Objects:
    """Organization A's things, and look-alikes that do not exist."""

    file: str
    upload: str
    job: str
    model: str
    checkpoint_model: str
    key: str
    webhook: str


MISSING = Objects(
    file="file-000000000000000000000000",
    upload="upload_000000000000000000000000",
    job="ftjob-000000000000000000000000",
    model="ft:ftaas-tiny:org-a::zzzzzzzz",
    checkpoint_model="ft:ftaas-tiny:org-a::zzzzzzzz:ckpt-step-2",
    key="key_000000000000000000000000",
    webhook="whep_000000000000000000000000",
)


@dataclass
class Attempt:
    """One request with the ids of `objects`: (method, path, keyword arguments)."""

    request: Callable[[Objects], tuple[str, str, dict[str, Any]]]
    headers: dict[str, str]
    lists: str | None = None  # a listing: the JSON key that must hold none of A's ids


def chat(model_of: Callable[[Objects], str], kind: str) -> Callable[[Objects], tuple]:
    def request(o: Objects) -> tuple[str, str, dict[str, Any]]:
        body: dict[str, Any] = {"model": model_of(o), "max_tokens": 2}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        return "POST", path, {"json": body}

    return request


def judged_by(model: str) -> tuple[str, str, dict[str, Any]]:
    """A run whose score_model grader asks `model` to judge."""
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": model,
        "input": [{"role": "user", "content": "{{sample.output_text}}"}],
    }
    body = {"grader": grader, "model_sample": "x"}
    return "POST", "/v1/fine_tuning/alpha/graders/run", {"json": body}


def part(o: Objects) -> tuple[str, str, dict[str, Any]]:
    return "POST", f"/v1/uploads/{o.upload}/parts", {"files": {"data": ("p", b"{}\n")}}


# route (method, path template) → the attempts on it
ATTEMPTS: dict[tuple[str, str], list[Attempt]] = {
    ("POST", "/v1/files"): [],  # makes B's own file: refers to nothing of A's
    ("GET", "/v1/files"): [Attempt(lambda o: ("GET", "/v1/files", {}), B, lists="data")],
    ("GET", "/v1/files/{file_id}"): [Attempt(lambda o: ("GET", f"/v1/files/{o.file}", {}), B)],
    ("DELETE", "/v1/files/{file_id}"): [
        Attempt(lambda o: ("DELETE", f"/v1/files/{o.file}", {}), B)
    ],
    ("GET", "/v1/files/{file_id}/content"): [
        Attempt(lambda o: ("GET", f"/v1/files/{o.file}/content", {}), B)
    ],
    ("POST", "/v1/uploads"): [],  # B's own upload
    ("POST", "/v1/uploads/{upload_id}/parts"): [Attempt(part, B)],
    ("POST", "/v1/uploads/{upload_id}/complete"): [
        Attempt(
            lambda o: ("POST", f"/v1/uploads/{o.upload}/complete", {"json": {"part_ids": ["p"]}}),
            B,
        )
    ],
    ("POST", "/v1/uploads/{upload_id}/cancel"): [
        Attempt(lambda o: ("POST", f"/v1/uploads/{o.upload}/cancel", {}), B)
    ],
    ("POST", "/v1/fine_tuning/jobs"): [
        Attempt(  # A's file as B's training file
            lambda o: (
                "POST",
                "/v1/fine_tuning/jobs",
                {"json": {"model": "ftaas-tiny", "training_file": o.file}},
            ),
            B,
        ),
        Attempt(  # on top of A's tuned model
            lambda o: (
                "POST",
                "/v1/fine_tuning/jobs",
                {"json": {"model": o.model, "training_file": "file-ownedbyb"}},
            ),
            B,
        ),
        Attempt(  # on top of A's checkpoint
            lambda o: (
                "POST",
                "/v1/fine_tuning/jobs",
                {"json": {"model": o.checkpoint_model, "training_file": "file-ownedbyb"}},
            ),
            B,
        ),
    ],
    ("GET", "/v1/fine_tuning/jobs"): [
        Attempt(lambda o: ("GET", "/v1/fine_tuning/jobs", {}), B, lists="data")
    ],
    **{
        (method, f"/v1/fine_tuning/jobs/{{job_id}}{tail}"): [
            Attempt(lambda o, m=method, t=tail: (m, f"/v1/fine_tuning/jobs/{o.job}{t}", {}), B)
        ]
        for method, tail in [
            ("GET", ""),
            ("POST", "/cancel"),
            ("POST", "/pause"),
            ("POST", "/resume"),
            ("GET", "/events"),
            ("GET", "/checkpoints"),
        ]
    },
    ("GET", "/v1/models"): [Attempt(lambda o: ("GET", "/v1/models", {}), B, lists="data")],
    ("POST", "/v1/models"): [
        Attempt(  # A's archive as B's adapter
            lambda o: (
                "POST",
                "/v1/models",
                {"json": {"base_model": "ftaas-tiny", "adapter_file": o.file}},
            ),
            B,
        )
    ],
    **{
        (method, template): [
            Attempt(lambda o, m=method, t=tail: (m, f"/v1/models/{o.model}{t}", {}), B),
            Attempt(lambda o, m=method, t=tail: (m, f"/v1/models/{o.checkpoint_model}{t}", {}), B),
        ]
        for method, template, tail in [
            ("GET", "/v1/models/{model:path}/adapter", "/adapter"),
            ("GET", "/v1/models/{model:path}", ""),
            ("DELETE", "/v1/models/{model:path}", ""),
        ]
    },
    ("POST", "/v1/chat/completions"): [
        Attempt(chat(lambda o: o.model, "chat"), B),
        Attempt(chat(lambda o: o.checkpoint_model, "chat"), B),
    ],
    ("POST", "/v1/completions"): [
        Attempt(chat(lambda o: o.model, "completion"), B),
        Attempt(chat(lambda o: o.checkpoint_model, "completion"), B),
    ],
    ("GET", "/v1/organization/api_keys"): [
        Attempt(lambda o: ("GET", "/v1/organization/api_keys", {}), ADMIN_B, lists="data")
    ],
    ("POST", "/v1/organization/api_keys"): [],  # makes B's own key
    ("GET", "/v1/organization/api_keys/{key_id}"): [
        Attempt(lambda o: ("GET", f"/v1/organization/api_keys/{o.key}", {}), ADMIN_B)
    ],
    ("DELETE", "/v1/organization/api_keys/{key_id}"): [
        Attempt(lambda o: ("DELETE", f"/v1/organization/api_keys/{o.key}", {}), ADMIN_B)
    ],
    # B's own W&B key, never A's: B has none, so it reads none and deletes none.
    ("GET", "/v1/organization/integrations/wandb"): [
        Attempt(lambda o: ("GET", "/v1/organization/integrations/wandb", {}), ADMIN_B)
    ],
    ("DELETE", "/v1/organization/integrations/wandb"): [
        Attempt(lambda o: ("DELETE", "/v1/organization/integrations/wandb", {}), ADMIN_B)
    ],
    ("PUT", "/v1/organization/integrations/wandb"): [],  # sets B's own
    ("GET", "/v1/organization/webhooks"): [
        Attempt(lambda o: ("GET", "/v1/organization/webhooks", {}), ADMIN_B, lists="data")
    ],
    ("POST", "/v1/organization/webhooks"): [],  # registers B's own
    # Graders hold nothing: a run grades what its request carries, no tenant's object;
    # but a model grader names a judge model, and A's tuned models are not B's judges.
    ("POST", "/v1/fine_tuning/alpha/graders/run"): [
        Attempt(lambda o: judged_by(o.model), B),
        Attempt(lambda o: judged_by(o.checkpoint_model), B),
    ],
    ("POST", "/v1/fine_tuning/alpha/graders/validate"): [],
    **{
        (method, template): [
            Attempt(
                lambda o, m=method, t=tail: (m, f"/v1/organization/webhooks/{o.webhook}{t}", {}),
                ADMIN_B,
            )
        ]
        for method, template, tail in [
            ("GET", "/v1/organization/webhooks/{webhook_id}", ""),
            ("DELETE", "/v1/organization/webhooks/{webhook_id}", ""),
            ("GET", "/v1/organization/webhooks/{webhook_id}/deliveries", "/deliveries"),
        ]
    },
    ("GET", "/health"): [],  # nobody's
    # The console's page and files: the same for everyone, no organization's data (the
    # page reads that through the routes above, with the signed-in key).
    ("GET", "/console"): [],
    ("GET", "/console/{name}"): [],
    # Every organization's models are named there: no tenant's key opens it.
    ("GET", "/metrics"): [
        Attempt(lambda o: ("GET", "/metrics", {}), B),
        Attempt(lambda o: ("GET", "/metrics", {}), ADMIN_B),
    ],
}


def routes(client: TestClient) -> set[tuple[str, str]]:
    return {
        (method, route.path)
        for route in client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, APIRoute)
        for method in route.methods
    }


@pytest.fixture
def world(settings: Settings, parts: dict) -> tuple[TestClient, Objects]:
    keyed = Settings(
        home=settings.home,
        database_url=settings.database_url,
        serving_enabled=False,
        api_keys="key-a:org-a,key-b:org-b",
        admin_keys="admin-a-000000000000000000:org-a,admin-b-000000000000000000:org-b",
    )
    client = api_client(keyed, parts)
    # A's webhook (a public address: registered without a request), told of A's job's end.
    webhook = client.post(
        "/v1/organization/webhooks", json={"url": "https://93.184.216.34/hook"}, headers=ADMIN_A
    ).json()
    file = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", memorisation_jsonl())},
        data={"purpose": "fine-tune"},
        headers=A,
    ).json()["id"]
    upload = client.post(
        "/v1/uploads",
        json={
            "bytes": 10,
            "filename": "u.jsonl",
            "purpose": "fine-tune",
            "mime_type": "text/jsonl",
        },
        headers=A,
    ).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs", json={"model": "ftaas-tiny", "training_file": file}, headers=A
    ).json()["id"]
    reconciler = parts["reconciler"]
    reconciler.tick(), reconciler.tick()  # validated, running
    output = reconciler.db.session
    with output() as session:
        from service.db import JobRow

        output_dir = session.get(JobRow, job).output_dir
    log = ProgressLog(parts["blobs"], output_dir)
    log.write(Started(total_steps=2, n_examples=12, trained_tokens=100))
    log.write(Metrics(step=2, total_steps=2, train_loss=0.5))
    log.write(Checkpoint(step=2, epoch=1, path=f"{output_dir}/checkpoints/step-000002"))
    log.write(Succeeded(adapter_dir=f"{output_dir}/adapter"))
    parts["launcher"].end(job)
    reconciler.tick()
    done = client.get(f"/v1/fine_tuning/jobs/{job}", headers=A).json()
    assert done["status"] == "succeeded", done
    checkpoint = client.get(f"/v1/fine_tuning/jobs/{job}/checkpoints", headers=A).json()
    key = client.post("/v1/organization/api_keys", json={"name": "a"}, headers=ADMIN_A).json()
    client.put("/v1/organization/integrations/wandb", json={"api_key": "w" * 40}, headers=ADMIN_A)
    # B's own file, which the "on top of A's model" attempts name.
    client.post(
        "/v1/files",
        files={"file": ("t.jsonl", io.BytesIO(memorisation_jsonl()))},
        data={"purpose": "fine-tune"},
        headers=B,
    )
    objects = Objects(
        file=file,
        upload=upload,
        job=job,
        model=done["fine_tuned_model"],
        checkpoint_model=checkpoint["data"][0]["fine_tuned_model_checkpoint"],
        key=key["id"],
        webhook=webhook["id"],
    )
    return client, objects


def test_every_route_has_an_attempt(world: tuple[TestClient, Objects]):
    client, _ = world
    missing = routes(client) - set(ATTEMPTS)
    assert not missing, f"routes without an isolation attempt: {sorted(missing)}"


def test_organization_b_finds_nothing_of_organization_a(world: tuple[TestClient, Objects]):
    client, a = world
    missing = MISSING
    matrix = []
    for route, attempts in sorted(ATTEMPTS.items()):
        for attempt in attempts:
            method, path, kwargs = attempt.request(a)
            on_a = client.request(method, path, headers=attempt.headers, **kwargs)
            text = on_a.text
            for own in (a.file, a.upload, a.job, a.model, a.checkpoint_model, a.key, a.webhook,
                        "93.184.216.34", "w" * 40):  # fmt: skip
                if own not in path and own not in json.dumps(kwargs.get("json", {})):
                    assert own not in text, (route, own, text)
            if attempt.lists:
                assert on_a.status_code == 200, (route, text)
                matrix.append((route, on_a.status_code, "empty of A's"))
                continue
            m_method, m_path, m_kwargs = attempt.request(missing)
            on_missing = client.request(m_method, m_path, headers=attempt.headers, **m_kwargs)
            assert on_a.status_code == on_missing.status_code, (route, text, on_missing.text)
            # 403: a route no tenant's key opens (/metrics).
            assert on_a.status_code in (400, 403, 404), (route, text)
            error = on_a.json()["error"]
            assert error["code"] == on_missing.json()["error"]["code"], (route, text)
            assert error["param"] == on_missing.json()["error"]["param"], (route, text)
            matrix.append((route, on_a.status_code, error["code"]))
    print("\nroute · B's attempt on A's object · answer")
    for (method, path), status, code in matrix:
        print(f"{method:6} {path:48} {status} {code}")

    # And A still has everything.
    assert client.get(f"/v1/files/{a.file}", headers=A).status_code == 200
    assert client.get(f"/v1/models/{a.model}", headers=A).status_code == 200
    assert client.get(f"/v1/fine_tuning/jobs/{a.job}", headers=A).json()["status"] == "succeeded"
    assert client.get(f"/v1/organization/api_keys/{a.key}", headers=ADMIN_A).status_code == 200
    assert client.get("/v1/organization/integrations/wandb", headers=ADMIN_A).status_code == 200
    deliveries = client.get(f"/v1/organization/webhooks/{a.webhook}/deliveries", headers=ADMIN_A)
    assert [d["event"]["job_id"] for d in deliveries.json()["data"]] == [a.job]
