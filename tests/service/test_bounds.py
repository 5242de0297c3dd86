"""Every input is bounded: JSON bodies are capped while they stream, unbounded JSON
fields are bounded as OpenAI bounds them, an upload's parts cannot exceed what it
declared, and what crashes or abandoned uploads leave behind is swept."""

from __future__ import annotations

import os
import time

import pytest
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from service.db import UploadRow
from service.housekeeping import Housekeeping
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client
from tests.service.test_api import assert_envelope


@pytest.fixture
def small_bodies(settings, parts) -> TestClient:  # type: ignore[no-untyped-def]
    settings.max_request_bytes = 4096
    return api_client(settings, parts)


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/fine_tuning/jobs", "/v1/uploads"]
)
def test_a_json_body_over_the_cap_is_refused_while_it_streams(small_bodies: TestClient, path: str):
    big = b'{"model": "ftaas-tiny", "prompt": "' + b"x" * 200_000 + b'"}'
    declared = small_bodies.post(path, content=big, headers={"content-type": "application/json"})
    assert assert_envelope(declared, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    streamed = small_bodies.post(
        path, content=chunks(), headers={"content-type": "application/json"}
    )
    assert assert_envelope(streamed, 413)["code"] == "request_too_large"
    assert small_bodies.get("/health").status_code == 200


def test_deeply_nested_json_is_a_400_not_a_500(client: TestClient):
    nested = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = client.post("/v1/chat/completions", content=nested)
    assert answer.status_code == 400, answer.text


@pytest.mark.parametrize(
    ("integrations", "param"),
    [
        ([{"type": "wandb", "wandb": {"project": "p"}}] * 6, "integrations"),
        ([{"type": "wandb", "wandb": {"project": "p", "tags": ["t"] * 51}}], "integrations"),
        ([{"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}], "integrations"),
        ([{"type": "wandb", "wandb": {}}], "integrations"),
        ([{"type": "other"}], "integrations"),
    ],
)
def test_integrations_are_bounded_as_openai_bounds_them(sdk: OpenAI, integrations, param):
    training = sdk.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
    with pytest.raises(BadRequestError) as refused:
        sdk.fine_tuning.jobs.create(
            model="ftaas-tiny", training_file=training.id, integrations=integrations
        )
    assert str(refused.value.body["param"]).startswith(param)  # type: ignore[index]


def test_target_modules_are_bounded(sdk: OpenAI):
    training = sdk.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
    with pytest.raises(BadRequestError) as refused:
        sdk.fine_tuning.jobs.create(
            model="ftaas-tiny",
            training_file=training.id,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"target_modules": ["q_proj"] * 65}},
            },
        )
    assert "target_modules" in str(refused.value.body["param"])  # type: ignore[index]


def test_upload_expiry_is_bounded_as_openai_bounds_it(sdk: OpenAI):
    fields = {"bytes": 10, "filename": "a.jsonl", "mime_type": "application/jsonl"}
    with pytest.raises(BadRequestError):
        sdk.uploads.create(
            purpose="fine-tune",
            **fields,
            extra_body={"expires_after": {"anchor": "created_at", "seconds": 10**9}},
        )
    sdk.uploads.create(
        purpose="fine-tune",
        **fields,
        extra_body={"expires_after": {"anchor": "created_at", "seconds": 7200}},
    )


def test_parts_may_not_exceed_what_the_upload_declared(sdk: OpenAI, settings):
    upload = sdk.uploads.create(
        bytes=100, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    with pytest.raises(BadRequestError) as too_big:
        sdk.uploads.parts.create(upload_id=upload.id, data=b"x" * 101)
    assert too_big.value.body["param"] == "data"  # type: ignore[index]
    sdk.uploads.parts.create(upload_id=upload.id, data=b"x" * 60)
    with pytest.raises(BadRequestError, match="40 left"):
        sdk.uploads.parts.create(upload_id=upload.id, data=b"x" * 50)
    sdk.uploads.parts.create(upload_id=upload.id, data=b"x" * 40)
    uploads = (settings.home / "blobs" / "uploads").rglob("*")
    stored = sum(p.stat().st_size for p in uploads if p.is_file())
    assert stored == 100  # refused parts leave nothing behind


def test_housekeeping_sweeps_expired_uploads_orphans_and_partial_writes(
    sdk: OpenAI, parts, settings
):
    upload = sdk.uploads.create(
        bytes=100, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    sdk.uploads.parts.create(upload_id=upload.id, data=b"x" * 50)
    kept = sdk.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
    blobs_root = settings.home / "blobs"
    orphan, partial, fresh = (
        blobs_root / "files" / n for n in ("file-orphan", "x.partial", "file-new")
    )
    for path in (orphan, partial, fresh):
        path.write_bytes(b"left behind")
    hour_ago = time.time() - 3700
    for path in [orphan, partial, *(blobs_root / "files").glob("file-*")]:
        if path != fresh:
            os.utime(path, (hour_ago, hour_ago))
    with parts["db"].session() as session:
        session.get(UploadRow, upload.id).expires_at = int(time.time()) - 1  # type: ignore[union-attr]

    report = Housekeeping(parts["db"], parts["blobs"]).sweep()

    assert report.expired_uploads == 1 and report.removed_blobs == 2
    assert not orphan.exists() and not partial.exists() and fresh.exists()
    assert sdk.files.content(kept.id).content == memorisation_jsonl()  # named by a row: kept
    assert not (blobs_root / "uploads" / upload.id).exists()
    with parts["db"].session() as session:
        assert session.get(UploadRow, upload.id).status == "expired"  # type: ignore[union-attr]
