from service.config import Settings
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client


def upload(client, content: bytes, name: str = "train.jsonl"):
    return client.post("/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"})


def assert_envelope(response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    return error


def test_upload_is_processed_and_listed(client):
    created = upload(client, memorisation_jsonl()).json()
    assert created["status"] == "processed" and created["object"] == "file"
    page = client.get("/v1/files").json()
    assert page["data"][0]["id"] == created["id"] and page["has_more"] is False
    content = client.get(f"/v1/files/{created['id']}/content")
    assert content.content == memorisation_jsonl()


def test_a_bad_file_reaches_error_with_its_line(client):
    created = upload(client, memorisation_jsonl() + b"{oops\n").json()
    assert created["status"] == "error"
    assert "line 13" in created["status_details"]


def test_only_jsonl_and_bounded_uploads_are_accepted(client):
    assert_envelope(upload(client, b"x", name="train.csv"), 400, "file")
    assert_envelope(upload(client, b"x" * 20_000), 400, "file")


def test_job_creation_echoes_the_request_and_emits_events(client):
    file_id = upload(client, memorisation_jsonl()).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "ftaas-tiny",
            "training_file": file_id,
            "suffix": "demo",
            "metadata": {"team": "a"},
        },
    ).json()
    assert job["status"] == "validating_files"
    assert job["error"] is None and job["fine_tuned_model"] is None
    assert job["hyperparameters"] == {
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
        "n_epochs": "auto",
    }
    assert job["user_provided_suffix"] == "demo"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["message"].startswith("Validating training file")
    assert client.get("/v1/fine_tuning/jobs?metadata[team]=a").json()["data"][0]["id"] == job["id"]
    assert client.get("/v1/fine_tuning/jobs?metadata[team]=b").json()["data"] == []


def supervised(**hyperparameters) -> dict:
    return {"method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}


def test_lora_knobs_are_accepted_and_echoed(client):
    file_id = upload(client, memorisation_jsonl()).json()["id"]
    knobs = {"lora_r": 8, "lora_dropout": 0.1, "use_rslora": True, "target_modules": ["q_proj"]}
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "ftaas-tiny", "training_file": file_id, **supervised(**knobs)},
    ).json()
    echoed = job["method"]["supervised"]["hyperparameters"]
    assert {k: echoed[k] for k in knobs} == knobs
    assert set(job["hyperparameters"]) == {"n_epochs", "batch_size", "learning_rate_multiplier"}


def test_each_method_is_echoed_with_its_own_hyperparameters(client):
    file_id = upload(client, memorisation_jsonl()).json()["id"]
    for method, extra in (("dpo", {"beta": 0.5}), ("continued_pretraining", {})):
        body = {"type": method, method: {"hyperparameters": {"n_epochs": 2, **extra}}}
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "ftaas-tiny", "training_file": file_id, "method": body},
        ).json()
        assert job["method"]["type"] == method
        echoed = job["method"][method]["hyperparameters"]
        assert echoed["n_epochs"] == 2 and job["hyperparameters"]["n_epochs"] == 2
        assert ("beta" in echoed) == (method == "dpo")
        assert echoed.get("beta", 0.5) == 0.5


def test_bad_job_parameters_are_400_with_the_param(client):
    file_id = upload(client, memorisation_jsonl()).json()["id"]
    cases = [
        ({"model": "nope", "training_file": file_id}, "model"),
        ({"model": "ftaas-tiny", "training_file": "file-missing"}, "training_file"),
        ({"model": "ftaas-tiny", "training_file": file_id, "suffix": "a:b"}, "suffix"),
        (
            {"model": "ftaas-tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 99}},
            "hyperparameters.n_epochs.int",
        ),
        (  # a reinforcement job needs its grader
            {"model": "ftaas-tiny", "training_file": file_id, "method": {"type": "reinforcement"}},
            "method",
        ),
        (  # OpenAI's range for beta is (0, 2]
            {
                "model": "ftaas-tiny",
                "training_file": file_id,
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}},
            },
            "method.dpo.hyperparameters.beta",
        ),
        (  # the settings of another method than the one named
            {
                "model": "ftaas-tiny",
                "training_file": file_id,
                "method": {"type": "dpo", "supervised": {"hyperparameters": {}}},
            },
            "method",
        ),
        (  # OpenAI's deprecated top-level hyperparameters are supervised ones
            {
                "model": "ftaas-tiny",
                "training_file": file_id,
                "hyperparameters": {"n_epochs": 2},
                "method": {"type": "dpo"},
            },
            "hyperparameters",
        ),
        (  # a tuned model of another organization, or none
            {"model": "ft:ftaas-tiny:other::abcdefgh", "training_file": file_id},
            "model",
        ),
        (  # ftaas-tiny's engine serves ranks up to 16
            {"model": "ftaas-tiny", "training_file": file_id, **supervised(lora_r=32)},
            "method.supervised.hyperparameters.lora_r",
        ),
        (
            {"model": "ftaas-tiny", "training_file": file_id, **supervised(use_dora=True)},
            "method.supervised.hyperparameters.use_dora",
        ),
        (
            {
                "model": "ftaas-tiny",
                "training_file": file_id,
                **supervised(target_modules=["lm_head"]),
            },
            "method.supervised.hyperparameters.target_modules",
        ),
        (  # early stopping watches the validation loss: none, nothing to watch
            {
                "model": "ftaas-tiny",
                "training_file": file_id,
                **supervised(early_stopping_patience=2),
            },
            "method.supervised.hyperparameters.early_stopping_patience",
        ),
    ]
    for body, param in cases:
        error = assert_envelope(client.post("/v1/fine_tuning/jobs", json=body), 400)
        assert error["param"].startswith(param.split(".int")[0]), (body, error)


def test_unknown_ids_are_404_and_terminal_jobs_cannot_be_cancelled(client, parts):
    assert_envelope(client.get("/v1/files/file-nope"), 404)
    assert_envelope(client.get("/v1/fine_tuning/jobs/ftjob-nope"), 404)
    assert_envelope(client.get("/v1/models/ft:ftaas-tiny:local::nope"), 404, "model")
    file_id = upload(client, memorisation_jsonl()).json()["id"]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "ftaas-tiny", "training_file": file_id}
    ).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert_envelope(again, 409)
    assert again.headers["x-should-retry"] == "false"


def test_too_few_examples_fail_the_job_with_a_code(client, parts):
    few = b"".join(memorisation_jsonl().splitlines(keepends=True)[:3])
    file_id = upload(client, few).json()["id"]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "ftaas-tiny", "training_file": file_id}
    ).json()["id"]
    assert not parts["reconciler"].tick().errors
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_n_examples"
    assert job["error"]["param"] == "training_file"
    assert "3 example(s)" in job["error"]["message"]


def test_tenants_never_see_each_others_files(tmp_path, parts):
    settings = Settings(home=tmp_path, api_keys="key-a:org-a,key-b:org-b", serving_enabled=False)
    client = api_client(settings, parts)
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    created = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", memorisation_jsonl())},
        data={"purpose": "fine-tune"},
        headers=a,
    ).json()
    assert client.get(f"/v1/files/{created['id']}", headers=a).status_code == 200
    assert_envelope(client.get(f"/v1/files/{created['id']}", headers=b), 404)
    assert client.get("/v1/files", headers=b).json()["data"] == []
    assert_envelope(client.get("/v1/files"), 401)
    assert_envelope(client.get("/v1/files", headers={"Authorization": "Bearer wrong"}), 401)


def test_oversized_bodies_are_refused_as_they_stream(tmp_path, parts):
    settings = Settings(home=tmp_path, serving_enabled=False, max_upload_bytes=100_000)
    client = api_client(settings, parts)
    declared = upload(client, b"x" * 300_000)  # Content-Length says too much: nothing read
    assert assert_envelope(declared, 400, "file")["code"] == "file_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(50):
            yield b"x" * 10_000

    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    streamed = client.post("/v1/files", content=chunks(), headers=headers)
    assert assert_envelope(streamed, 400, "file")["code"] == "file_too_large"
    assert client.get("/health").status_code == 200


def test_a_chat_on_a_server_that_serves_nothing_is_a_503_and_starts_no_ray(client):
    import ray

    for stream in (False, True):
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "ftaas-tiny", "messages": [{"role": "user", "content": "hi"}]}
            | ({"stream": True} if stream else {}),
        )
        error = assert_envelope(answer, 503, "model")
        assert error["code"] == "serving_disabled"
    # Serve's handle would have started a Ray of its own in the API process.
    assert not ray.is_initialized()
