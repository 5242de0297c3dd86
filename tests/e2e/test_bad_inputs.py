"""The corpus of bad inputs (tests/e2e/bad_inputs/cases.json), sent to the live server.

Each case is one request and what a user must get back: the HTTP status and, for
errors, OpenAI's envelope with its type and `param`; for an upload, the file's `error`
status with details that name the line and field; for a job, its failure code. The
server must still be healthy after all of them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import TERMINAL, RunningServer

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).parent / "bad_inputs"
CASES: list[dict[str, Any]] = json.loads((CORPUS / "cases.json").read_text())
FIXTURE_FILES = {  # placeholder → (file, purpose)
    "$good_file": ("good.jsonl", "fine-tune"),
    "$three_file": ("three_examples.jsonl", "fine-tune"),
    "$dpo_file": ("dpo_rows.jsonl", "fine-tune"),
    "$text_file": ("text_rows.jsonl", "fine-tune"),
    "$error_file": ("not_json_line_3.jsonl", "fine-tune"),
    "$assistants_file": ("good.jsonl", "assistants"),
}


@pytest.fixture(scope="module")
def http(server: RunningServer) -> httpx.Client:
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": "Bearer test-key"}, timeout=60
    )


@pytest.fixture(scope="module")
def placeholders(http: httpx.Client) -> dict[str, str]:
    ids = {}
    for name, (file, purpose) in FIXTURE_FILES.items():
        content = (CORPUS / "files" / file).read_bytes()
        reply = http.post("/v1/files", files={"file": (file, content)}, data={"purpose": purpose})
        ids[name] = reply.raise_for_status().json()["id"]
    return ids


def _substitute(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, dict):
        return {k: _substitute(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, ids) for v in value]
    return value


def send(http: httpx.Client, request: dict[str, Any], ids: dict[str, str]) -> httpx.Response:
    kwargs: dict[str, Any] = {"params": request.get("query")}
    if "json" in request:
        kwargs["json"] = _substitute(request["json"], ids)
    elif "body" in request:
        kwargs["content"] = request["body"].encode()
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif "upload" in request or "form" in request:
        form = dict(request.get("form", {}))
        if "purpose" in request:
            form["purpose"] = request["purpose"]
        kwargs["data"] = form
        if "upload" in request:
            content = (CORPUS / "files" / request["upload"]).read_bytes()
            kwargs["files"] = {"file": (request["filename"], content)}
        else:  # httpx sends a form as multipart only when it has files
            kwargs["files"] = {"other": ("x.txt", b"x")}
    return http.request(request["method"], request["path"], **kwargs)


def _wait_terminal(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def check(http: httpx.Client, case: dict[str, Any], ids: dict[str, str]) -> list[str]:
    """What is wrong with the server's answer to `case` (nothing, when it behaves)."""
    try:
        reply = send(http, case["request"], ids)
    except httpx.HTTPError as error:
        return [f"no answer: {error!r}"]
    expect, problems = case["expect"], []
    if reply.status_code != expect["status"]:
        return [f"status {reply.status_code}, expected {expect['status']}: {reply.text[:300]}"]
    body = reply.json()
    if expect["status"] >= 400:
        error = body.get("error")
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            return [f"not OpenAI's error envelope: {reply.text[:300]}"]
        if error["type"] != expect["type"]:
            problems.append(f"type {error['type']!r}, expected {expect['type']!r}")
        if error["param"] != expect["param"]:
            problems.append(f"param {error['param']!r}, expected {expect['param']!r}")
        if not error["message"]:
            problems.append("empty message")
    if "expect_file" in case:
        file = http.get(f"/v1/files/{body['id']}").json()
        if file["status"] != case["expect_file"]["status"]:
            problems.append(f"file status {file['status']!r}")
        missing = [
            d for d in case["expect_file"]["details"] if d not in (file["status_details"] or "")
        ]
        if missing:
            problems.append(f"status_details {file['status_details']!r} lacks {missing}")
    if "expect_job" in case:
        job, wanted = _wait_terminal(http, body["id"]), case["expect_job"]
        got = (job["status"], (job["error"] or {}).get("code"), (job["error"] or {}).get("param"))
        if got != (wanted["status"], wanted["code"], wanted["param"]):
            problems.append(f"job ended {got}, expected {tuple(wanted.values())}: {job['error']}")
    return problems


def test_every_bad_input_is_refused_clearly(
    server: RunningServer, http: httpx.Client, placeholders: dict[str, str]
):
    failures = {}
    for case in CASES:
        problems = check(http, case, placeholders)
        if problems:
            failures[case["name"]] = problems
    print(f"\nbad-input corpus: {len(CASES)} cases, {len(CASES) - len(failures)} as expected")
    assert not failures, json.dumps(failures, indent=1)
    assert http.get("/health").status_code == 200
