"""Reinforcement fine-tuning jobs through the API: OpenAI's `method.reinforcement` (a
grader and hyperparameters), refused with a 400 naming the field when the grader does not
validate or cannot run in a job, checked against the files it trains on, and handed to the
trainer in its spec."""

from __future__ import annotations

import json

from service.config import Settings
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client
from tests.service.test_api import assert_envelope, upload
from training.spec import TrainingSpec, spec_key

CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def prompts(n: int = 10) -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}
        for i in range(n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def reinforcement(grader, **hyperparameters) -> dict:
    settings = {"grader": grader, "hyperparameters": hyperparameters}
    return {"method": {"type": "reinforcement", "reinforcement": settings}}


def test_a_reinforcement_job_keeps_its_grader_and_the_trainer_gets_it(client, parts):
    file_id = upload(client, prompts()).json()["id"]
    created = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "ftaas-tiny",
            "training_file": file_id,
            **reinforcement(CHECK, compute_multiplier=2, reasoning_effort="low"),
        },
    )
    assert created.status_code == 200, created.text
    job = created.json()
    method = job["method"]
    assert method["type"] == "reinforcement"
    assert method["reinforcement"]["grader"]["reference"] == "{{item.answer}}"
    echoed = method["reinforcement"]["hyperparameters"]
    assert echoed["compute_multiplier"] == 2 and echoed["reasoning_effort"] == "low"
    assert echoed["eval_interval"] == "auto"

    parts["reconciler"].tick()  # files validated, queued
    parts["reconciler"].tick()  # submitted
    assert parts["launcher"].submitted
    spec = TrainingSpec.load(parts["blobs"], spec_key(f"jobs/{job['id']}/attempt-1"))
    assert spec.method == "reinforcement" and spec.data_format == "reinforcement"
    assert spec.grader is not None and spec.grader["operation"] == "eq"
    assert spec.hyperparameters.group_size == 8  # 4 × compute_multiplier
    resolved = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert resolved["method"]["reinforcement"]["hyperparameters"]["group_size"] == 8


def test_bad_graders_and_settings_are_400_naming_the_field(client):
    file_id = upload(client, prompts()).json()["id"]
    cases = [
        ({**CHECK, "operation": "contains"}, {}, "method.reinforcement.grader.operation"),
        ({**CHECK, "type": "label_model"}, {}, "method.reinforcement.grader"),
        (CHECK, {"compute_multiplier": 11}, "method.reinforcement.hyperparameters"),
        (CHECK, {"eval_samples": 0}, "method.reinforcement.hyperparameters"),
    ]
    for grader, hyperparameters, param in cases:
        response = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "ftaas-tiny",
                "training_file": file_id,
                **reinforcement(grader, **hyperparameters),
            },
        )
        assert_envelope(response, 400)
        assert response.json()["error"]["param"].startswith(param), (param, response.json())
    no_grader = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "ftaas-tiny", "training_file": file_id, "method": {"type": "reinforcement"}},
    )
    assert_envelope(no_grader, 400, "method")


def test_a_reinforcement_job_on_chat_examples_fails_validation_saying_why(client, parts):
    file_id = upload(client, memorisation_jsonl()).json()["id"]
    job_id = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "ftaas-tiny", "training_file": file_id, **reinforcement(CHECK)},
    ).json()["id"]
    parts["reconciler"].tick()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert "reinforcement" in job["error"]["message"] and job["error"]["param"] == "training_file"


def test_a_response_format_is_checked_kept_and_handed_to_the_trainer(client, parts):
    file_id = upload(client, prompts()).json()["id"]
    shape = {
        "type": "json_schema",
        "json_schema": {
            "name": "sum",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
                "additionalProperties": False,
            },
        },
    }

    def create(response_format):
        method = reinforcement({**CHECK, "input": "{{sample.output_json.answer}}"})
        method["method"]["reinforcement"]["response_format"] = response_format
        return client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "ftaas-tiny", "training_file": file_id, **method},
        )

    created = create(shape)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["method"]["reinforcement"]["response_format"] == shape
    parts["reconciler"].tick()
    parts["reconciler"].tick()
    spec = TrainingSpec.load(parts["blobs"], spec_key(f"jobs/{job['id']}/attempt-1"))
    assert spec.response_format == shape

    field = "method.reinforcement.response_format"
    renamed = {**shape["json_schema"], "name": "a name"}
    too_big = {"name": "big", "schema": {"enum": ["x" * 70_000]}}
    cases = [
        ({"type": "xml"}, f"{field}.type"),
        ({"type": "json_schema"}, field),
        ({**shape, "json_schema": renamed}, f"{field}.json_schema.name"),
        ({**shape, "json_schema": too_big}, f"{field}.json_schema.schema"),
    ]
    for response_format, param in cases:
        refused = create(response_format)
        assert_envelope(refused, 400)
        assert refused.json()["error"]["param"].startswith(param), (param, refused.json())


JUDGE = {
    "type": "score_model",
    "name": "judge",
    "model": "ftaas-tiny",
    "input": [{"role": "user", "content": "Score {{sample.output_text}}"}],
}


def test_a_model_graders_judge_is_resolved_for_its_organization_and_given_to_the_trainer(
    settings, parts
):
    # Judges are served models: on a server that serves nothing, a 400 naming the field.
    unserved = api_client(settings, parts)
    file_id = upload(unserved, prompts()).json()["id"]
    refused = unserved.post(
        "/v1/fine_tuning/jobs",
        json={"model": "ftaas-tiny", "training_file": file_id, **reinforcement(JUDGE)},
    )
    assert_envelope(refused, 400, "method.reinforcement.grader.model")
    assert refused.json()["error"]["code"] == "unsupported_grader"

    client = api_client(settings.model_copy(update={"serving_enabled": True}), parts)
    openai_named = {**JUDGE, "name": "openai", "model": "gpt-4o-2024-08-06"}
    multi = {
        "type": "multi",
        "name": "both",
        "graders": {"base": JUDGE, "openai": openai_named},
        "calculate_output": "base + openai",
    }
    created = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "ftaas-tiny", "training_file": file_id, **reinforcement(multi)},
    )
    assert created.status_code == 200, created.text
    job = created.json()
    # The job shows the grader as given; where its judges are served is the trainer's.
    assert set(job["method"]["reinforcement"]) == {"grader", "hyperparameters"}
    parts["reconciler"].tick()
    parts["reconciler"].tick()
    spec = TrainingSpec.load(parts["blobs"], spec_key(f"jobs/{job['id']}/attempt-1"))
    assert spec.judges is not None
    assert {model: target.base_model for model, target in spec.judges.items()} == {
        "ftaas-tiny": "ftaas-tiny",
        "gpt-4o-2024-08-06": "ftaas-tiny",  # OpenAI's grader models: the first base model
    }
    assert all(target.adapter_name is None for target in spec.judges.values())

    for model in ("ft:ftaas-tiny:someone-else:x:abcd1234", "no-such-model"):
        refused = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "ftaas-tiny",
                "training_file": file_id,
                **reinforcement({**JUDGE, "model": model}),
            },
        )
        assert_envelope(refused, 404, "method.reinforcement.grader.model")


def test_where_answers_are_sampled_follows_the_job_then_the_server_then_the_hardware(tmp_path):
    """`rollouts`: the job's choice, else FTAAS_RFT_ROLLOUTS; `auto` samples through the
    serving engine on GPUs and in the trainer on CPUs (bench/rft_rollouts.py); a server
    that serves nothing always samples in the trainer."""
    from service.fine_tuning.attempts import rollouts_for

    serving = Settings(home=tmp_path)
    assert rollouts_for(serving, "auto", use_gpu=True) == "serving"
    assert rollouts_for(serving, "auto", use_gpu=False) == "trainer"
    assert rollouts_for(serving, "serving", use_gpu=False) == "serving"
    assert rollouts_for(serving, "trainer", use_gpu=True) == "trainer"
    configured = Settings(home=tmp_path, rft_rollouts="serving")
    assert rollouts_for(configured, "auto", use_gpu=False) == "serving"
    assert rollouts_for(configured, "trainer", use_gpu=False) == "trainer"
    not_serving = Settings(home=tmp_path, serving_enabled=False)
    assert rollouts_for(not_serving, "serving", use_gpu=True) == "trainer"
