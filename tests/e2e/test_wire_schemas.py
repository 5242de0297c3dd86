"""Every answer of the running server validates against OpenAI's published OpenAPI document
(tests/openapi/), as clients generated from it (Go, Java, .NET, a team's own) read them:
files, uploads, jobs of every method and status the session made (this module runs last of
the e2e tier, so the jobs of the tests before it are there too), their events and
checkpoints, models, chat (plain, with log-probabilities, with tools, streamed),
completions (plain and streamed) and errors. ftaas's documented extensions are allowed
where the schema is open (README, "Where ftaas differs from OpenAI's schemas")."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.adapters import archive, random_adapter
from tests.conftest import memorisation_jsonl, preference_jsonl, story_jsonl
from tests.e2e.conftest import API_KEY, RunningServer, wait_for_serving
from tests.openapi.schemas import component, operation_schema, problems

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

HI = [{"role": "user", "content": "hi"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


# Where ftaas differs from the document on purpose (README, "Where ftaas differs from
# OpenAI's schemas"): problems that name these are not failures.
DELIBERATE = (
    re.compile(r"(^|/)status: 'paused' is not one of"),
    re.compile(r"(^|/)method/type: 'continued_pretraining' is not one of"),
    # A multi grader's `graders` is a map of named graders (OpenAI's RFT guide); the
    # document types it as one grader, so no branch of its grader union matches.
    re.compile(r"(^|/)method/reinforcement/grader/type: 'multi' is not one of"),
)
# OpenAI's own completions stream sends `finish_reason: null` until the last chunk; the
# document types its stream events as whole answers, whose `finish_reason` is never null.
UNFINISHED_CHUNK = (re.compile(r"^choices/\d+/finish_reason: None is not "),)


class Checked:
    """Answers checked so far, and what broke their schemas."""

    def __init__(self) -> None:
        self.count, self.failed = 0, 0
        self.failures: list[str] = []

    def __call__(
        self, what: str, schema: dict[str, Any], answer: Any, allowed: tuple[re.Pattern, ...] = ()
    ) -> Any:
        found = [
            p
            for p in problems(schema, answer)
            if not any(d.search(p) for d in (*DELIBERATE, *allowed))
        ]
        self.count, self.failed = self.count + 1, self.failed + bool(found)
        self.failures += [f"{what}: {problem}" for problem in found]
        return answer


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    wait_for_serving(server.client(), "ftaas-tiny")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=f"{server.base_url}/v1", headers=headers, timeout=120) as client:
        yield client


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    events = [line.removeprefix("data: ") for line in response.text.splitlines()]
    return [json.loads(e) for e in events if e.startswith("{")]


def wait_status(http: httpx.Client, job_id: str, wanted: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        job = ok(http.get(f"/fine_tuning/jobs/{job_id}"))
        if job["status"] in wanted:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


def test_every_answer_validates_against_openais_schemas(
    http: httpx.Client, tiny_model_dir: Path, tmp_path: Path
):
    check = Checked()
    jobs_path = "/fine_tuning/jobs/{fine_tuning_job_id}"

    # Files and uploads.
    training = check(
        "POST /files",
        operation_schema("post", "/files"),
        ok(http.post("/files", files={"file": ("t.jsonl", memorisation_jsonl())},
                     data={"purpose": "fine-tune"})),
    )  # fmt: skip
    check("GET /files", operation_schema("get", "/files"), ok(http.get("/files")))
    check("GET /files/{id}", operation_schema("get", "/files/{file_id}"),
          ok(http.get(f"/files/{training['id']}")))  # fmt: skip
    spare = ok(http.post("/files", files={"file": ("s.jsonl", memorisation_jsonl())},
                         data={"purpose": "fine-tune"}))  # fmt: skip
    check("DELETE /files/{id}", operation_schema("delete", "/files/{file_id}"),
          ok(http.delete(f"/files/{spare['id']}")))  # fmt: skip
    content = memorisation_jsonl()
    create = {"filename": "u.jsonl", "purpose": "fine-tune", "bytes": len(content),
              "mime_type": "text/jsonl"}  # fmt: skip
    upload = check("POST /uploads", operation_schema("post", "/uploads"),
                   ok(http.post("/uploads", json=create)))  # fmt: skip
    part = check(
        "POST /uploads/{id}/parts",
        operation_schema("post", "/uploads/{upload_id}/parts"),
        ok(http.post(f"/uploads/{upload['id']}/parts", files={"data": ("p", content)})),
    )
    check(
        "POST /uploads/{id}/complete",
        operation_schema("post", "/uploads/{upload_id}/complete"),
        ok(http.post(f"/uploads/{upload['id']}/complete", json={"part_ids": [part["id"]]})),
    )
    other = ok(http.post("/uploads", json=create))
    check("POST /uploads/{id}/cancel", operation_schema("post", "/uploads/{upload_id}/cancel"),
          ok(http.post(f"/uploads/{other['id']}/cancel")))  # fmt: skip

    # A job taken through create, pause, resume and cancel.
    body = {
        "model": "ftaas-tiny",
        "training_file": training["id"],
        "method": {"type": "supervised",
                   "supervised": {"hyperparameters": {"n_epochs": 20, "batch_size": 1}}},
        "integrations": [{"type": "wandb", "wandb": {"project": "ftaas-tests"}}],
    }  # fmt: skip
    job = check("POST /fine_tuning/jobs", operation_schema("post", "/fine_tuning/jobs"),
                ok(http.post("/fine_tuning/jobs", json=body)))  # fmt: skip
    check("GET (running)", operation_schema("get", jobs_path),
          wait_status(http, job["id"], {"running"}))  # fmt: skip
    check("POST .../pause", operation_schema("post", f"{jobs_path}/pause"),
          ok(http.post(f"/fine_tuning/jobs/{job['id']}/pause")))  # fmt: skip
    check("GET (paused)", operation_schema("get", jobs_path),
          wait_status(http, job["id"], {"paused"}))  # fmt: skip
    check("POST .../resume", operation_schema("post", f"{jobs_path}/resume"),
          ok(http.post(f"/fine_tuning/jobs/{job['id']}/resume")))  # fmt: skip
    check("POST .../cancel", operation_schema("post", f"{jobs_path}/cancel"),
          ok(http.post(f"/fine_tuning/jobs/{job['id']}/cancel")))  # fmt: skip

    # A job of each other method, created and cancelled.
    for method, content in (("dpo", preference_jsonl()), ("continued_pretraining", story_jsonl())):
        data = ok(http.post("/files", files={"file": (f"{method}.jsonl", content)},
                            data={"purpose": "fine-tune"}))  # fmt: skip
        other_job = check(
            f"POST /fine_tuning/jobs ({method})",
            operation_schema("post", "/fine_tuning/jobs"),
            ok(http.post("/fine_tuning/jobs", json={"model": "ftaas-tiny",
                         "training_file": data["id"], "method": {"type": method}})),
        )  # fmt: skip
        ok(http.post(f"/fine_tuning/jobs/{other_job['id']}/cancel"))

    # Every job the session made (every method and status a user can see), with its
    # events and checkpoints.
    listed = check("GET /fine_tuning/jobs", operation_schema("get", "/fine_tuning/jobs"),
                   ok(http.get("/fine_tuning/jobs", params={"limit": 100})))  # fmt: skip
    methods, statuses = set(), set()
    for each in listed["data"]:
        methods.add(each["method"]["type"])
        statuses.add(each["status"])
        path = f"/fine_tuning/jobs/{each['id']}"
        check(f"GET {path}", operation_schema("get", jobs_path), ok(http.get(path)))
        check(f"GET {path}/events", operation_schema("get", f"{jobs_path}/events"),
              ok(http.get(f"{path}/events", params={"limit": 100})))  # fmt: skip
        check(f"GET {path}/checkpoints", operation_schema("get", f"{jobs_path}/checkpoints"),
              ok(http.get(f"{path}/checkpoints")))  # fmt: skip
    assert {"supervised", "dpo", "continued_pretraining"} <= methods, methods
    print(f"\njobs checked: methods {sorted(methods)}, statuses {sorted(statuses)}")

    # Models: listed, each retrieved, an imported one deleted.
    folder = random_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    adapter = ok(http.post("/files", files={"file": ("a.tar.gz", archive(folder))},
                           data={"purpose": "user_data"}))  # fmt: skip
    imported = ok(http.post("/models", json={"base_model": "ftaas-tiny",
                                             "adapter_file": adapter["id"]}))  # fmt: skip
    models = check("GET /models", operation_schema("get", "/models"), ok(http.get("/models")))
    for model in models["data"]:
        check(f"GET /models/{model['id']}", operation_schema("get", "/models/{model}"),
              ok(http.get(f"/models/{model['id']}")))  # fmt: skip

    # Chat and completions, as vLLM answers them through ftaas.
    chat = operation_schema("post", "/chat/completions")
    for what, extra in (
        ("plain", {}),
        ("with logprobs", {"logprobs": True, "top_logprobs": 2}),
        ("with tools", {"tools": [TOOL]}),
        ("n=2, a tuned model", {"n": 2, "model": imported["id"]}),
    ):
        request = {"model": "ftaas-tiny", "messages": HI, "max_tokens": 4, **extra}
        check(f"chat {what}", chat, ok(http.post("/chat/completions", json=request)))
    streamed = {"model": "ftaas-tiny", "messages": HI, "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
    for chunk in sse(http.post("/chat/completions", json=streamed)):
        check("chat chunk", component("CreateChatCompletionStreamResponse"), chunk)
    completion = {"model": "ftaas-tiny", "prompt": "The", "max_tokens": 4}
    check("completion", operation_schema("post", "/completions"),
          ok(http.post("/completions", json=completion)))  # fmt: skip
    check("completion with logprobs", operation_schema("post", "/completions"),
          ok(http.post("/completions", json={**completion, "logprobs": 2})))  # fmt: skip
    for chunk in sse(http.post("/completions", json={**completion, "stream": True})):
        check("completion chunk", component("CreateCompletionResponse"), chunk, UNFINISHED_CHUNK)
    check("DELETE /models/{id}", operation_schema("delete", "/models/{model}"),
          ok(http.delete(f"/models/{imported['id']}")))  # fmt: skip

    # Errors: OpenAI's envelope, whatever went wrong.
    for what, response in (
        ("404", http.get("/files/file-nope")),
        ("400", http.post("/fine_tuning/jobs", json={"model": "ftaas-tiny"})),
        ("400 from the engine", http.post("/chat/completions",
                                          json={"model": "ftaas-tiny", "messages": []})),
        ("401", http.get("/models", headers={"Authorization": "Bearer wrong"})),
    ):  # fmt: skip
        assert response.status_code >= 400, (what, response.text)
        check(f"error {what}", component("ErrorResponse"), response.json())

    print(f"\nOpenAI's schemas: {check.count - check.failed} of {check.count} answers validate")
    assert check.failures == [], "\n".join(check.failures)
