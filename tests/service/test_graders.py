"""The grader endpoints through the official SDK (`client.fine_tuning.alpha.graders`),
against the in-process app: OpenAI's request and response shapes, 400s naming the field,
python graders in the sandbox, model graders without serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from service.config import Settings
from service.graders.judge import local_judge_model
from training.graders import PythonSandbox, SandboxLimits, SandboxUnavailable

ALL_FLAGS = {
    "formula_parse_error", "sample_parse_error", "truncated_observation_error",
    "unresponsive_reward_error", "invalid_variable_error", "other_error",
    "python_grader_server_error", "python_grader_server_error_type",
    "python_grader_runtime_error", "python_grader_runtime_error_details",
    "model_grader_server_error", "model_grader_refusal_error", "model_grader_parse_error",
    "model_grader_server_error_details",
}  # fmt: skip


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """SQLite only: these routes read no table of their own."""
    return Settings(home=tmp_path, serving_enabled=False, python_grader_timeout_s=3)


def _bubblewrap_missing() -> str:
    try:
        PythonSandbox("bubblewrap", SandboxLimits()).check()
    except SandboxUnavailable as error:
        return str(error)
    return ""


STRING_CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_json.answer }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}


def test_run_a_string_check(sdk: OpenAI) -> None:
    answer = sdk.fine_tuning.alpha.graders.run(
        grader=STRING_CHECK,  # type: ignore[arg-type]
        model_sample=json.dumps({"answer": "Paris"}),
        item={"answer": "Paris"},
    )
    assert answer.reward == 1.0
    assert answer.metadata.name == "exact" and answer.metadata.type == "string_check"
    assert answer.metadata.errors.invalid_variable_error is False
    assert answer.metadata.execution_time >= 0
    miss = sdk.fine_tuning.alpha.graders.run(
        grader=STRING_CHECK,  # type: ignore[arg-type]
        model_sample="not json",
        item={"answer": "Paris"},
    )
    assert miss.reward == 0.0 and miss.metadata.errors.sample_parse_error is True


def test_every_flag_of_openais_response_is_sent(client: Any) -> None:
    body = {"grader": STRING_CHECK, "model_sample": "{}", "item": {"answer": "x"}}
    answer = client.post("/v1/fine_tuning/alpha/graders/run", json=body).json()
    assert set(answer) == {
        "reward",
        "metadata",
        "sub_rewards",
        "model_grader_token_usage_per_model",
    }
    assert set(answer["metadata"]["errors"]) == ALL_FLAGS
    assert {"name", "type", "execution_time", "scores", "token_usage", "sampled_model_name"} <= set(
        answer["metadata"]
    )


def test_run_a_multi_grader_with_its_sub_rewards(sdk: OpenAI) -> None:
    grader = {
        "type": "multi",
        "name": "compliance",
        "graders": {
            "compliant": {
                **STRING_CHECK,
                "name": "compliant",
                "input": "{{sample.output_json.compliant}}",
                "reference": "{{item.compliant}}",
            },
            "explanation": {
                "type": "text_similarity",
                "name": "explanation",
                "input": "{{sample.output_json.explanation}}",
                "reference": "{{item.explanation}}",
                "evaluation_metric": "rouge_l",
            },
        },
        "calculate_output": "0.5 * compliant + 0.5 * explanation",
    }
    item = {"compliant": "yes", "explanation": "a dedicated security team"}
    sample = json.dumps({"compliant": "yes", "explanation": "a dedicated security team"})
    answer = sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=item)  # type: ignore[arg-type]
    assert answer.reward == 1.0
    assert answer.sub_rewards == {"compliant": 1.0, "explanation": 1.0}


def test_validate_echoes_the_grader(sdk: OpenAI) -> None:
    grader = {**STRING_CHECK, "pass_threshold": 0.5}
    answer = sdk.fine_tuning.alpha.graders.validate(grader=grader)  # type: ignore[arg-type]
    assert answer.grader is not None
    assert answer.grader.model_dump(exclude_none=True) == STRING_CHECK


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"correct": {**STRING_CHECK, "operation": "neq"}},
                "calculate_output": "correct",
            },
            "grader.graders.correct.operation",
        ),
        (
            {
                "type": "text_similarity",
                "name": "t",
                "input": "a",
                "reference": "b",
                "evaluation_metric": "cosine",
            },
            "grader.evaluation_metric",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"c": STRING_CHECK},
                "calculate_output": "__import__('os')",
            },
            "grader.calculate_output",
        ),
        (
            {
                "type": "label_model",
                "name": "l",
                "model": "gpt-4o",
                "input": [{"role": "user", "content": "x"}],
                "labels": ["a"],
                "passing_labels": ["a"],
            },
            "grader",
        ),
    ],
)
def test_an_invalid_grader_is_a_400_naming_the_field(
    sdk: OpenAI, grader: dict[str, Any], param: str
) -> None:
    for call in (
        lambda: sdk.fine_tuning.alpha.graders.validate(grader=grader),  # type: ignore[arg-type]
        lambda: sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample="x"),  # type: ignore[arg-type]
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.body["param"] == param  # type: ignore[index]
    if param == "grader.evaluation_metric":
        assert "only available for evals" in caught.value.message


def test_graders_need_a_key_when_keys_are_configured(settings: Settings, parts: Any) -> None:
    from tests.service.conftest import api_client

    keyed = settings.model_copy(update={"api_keys": "sk-test:org"})
    client = api_client(keyed, parts)
    body = {"grader": STRING_CHECK, "model_sample": "{}"}
    assert client.post("/v1/fine_tuning/alpha/graders/run", json=body).status_code == 401
    ok = client.post(
        "/v1/fine_tuning/alpha/graders/run", json=body, headers={"authorization": "Bearer sk-test"}
    )
    assert ok.status_code == 200


SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": "gpt-4o-2024-08-06",
    "input": [{"role": "user", "content": "Is {{sample.output_text}} right?"}],
}


def test_a_model_grader_without_serving_says_so(sdk: OpenAI) -> None:
    answer = sdk.fine_tuning.alpha.graders.run(grader=SCORE, model_sample="Paris")  # type: ignore[arg-type]
    errors = answer.metadata.errors
    assert answer.reward == 0.0 and errors.api_model_grader_server_error is True
    assert "serving is disabled" in str(errors.api_model_grader_server_error_details)
    assert "ftaas-tiny" in str(errors.api_model_grader_server_error_details)  # the mapped model


def test_openai_grader_models_map_to_local_models(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, grader_models={"o3-mini-2025-01-31": "ft:mine"})
    assert local_judge_model(settings, "o3-mini-2025-01-31", "base") == "ft:mine"
    assert local_judge_model(settings, "gpt-4.1-nano-2025-04-14", "base") == "base"
    assert local_judge_model(settings, "o4-mini-2025-04-16", "base") == "base"
    assert local_judge_model(settings, "ftaas-tiny", "base") == "ftaas-tiny"


@pytest.mark.skipif(bool(_bubblewrap_missing()), reason=_bubblewrap_missing())
def test_run_a_python_grader_in_the_sandbox(sdk: OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTAAS_API_KEYS", "sk-secret:org")
    source = (
        "import os\n"
        "def grade(sample, item):\n"
        "    if any('secret' in v for v in os.environ.values()):\n"
        "        return 1.0\n"
        "    return 0.5 if sample['output_json']['answer'] == item['answer'] else 0.0\n"
    )
    grader = {"type": "python", "name": "py", "source": source}
    answer = sdk.fine_tuning.alpha.graders.run(
        grader=grader,  # type: ignore[arg-type]
        model_sample='{"answer": 4}',
        item={"answer": 4},
    )
    assert answer.reward == 0.5
    assert sdk.fine_tuning.alpha.graders.validate(grader=grader).grader is not None  # type: ignore[arg-type]
    loop = {
        "type": "python",
        "name": "py",
        "source": "def grade(s, i):\n    while True:\n        pass\n",
    }
    answer = sdk.fine_tuning.alpha.graders.run(grader=loop, model_sample="x")  # type: ignore[arg-type]
    assert answer.reward == 0.0 and answer.metadata.errors.python_grader_runtime_error is True
    assert "longer than 3 s" in str(answer.metadata.errors.python_grader_runtime_error_details)


def test_python_graders_fail_closed_without_a_sandbox(sdk: OpenAI, client: Any) -> None:
    client.app.state.graders.sandbox._checked = "bubblewrap is not installed (test)"
    grader = {"type": "python", "name": "py", "source": "def grade(s, i):\n    return 1.0\n"}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.fine_tuning.alpha.graders.validate(grader=grader)  # type: ignore[arg-type]
    assert caught.value.code == "python_grader_unavailable"
    answer = sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample="x")  # type: ignore[arg-type]
    assert answer.reward == 0.0 and answer.metadata.errors.python_grader_server_error is True
    assert answer.metadata.errors.python_grader_server_error_type == "sandbox_unavailable"


def test_concurrent_runs_are_bounded(client: Any) -> None:
    capacity = client.app.state.heavy.graders
    capacity._admitted["another-organization"] = capacity.most  # as if runs were in flight
    body = {"grader": STRING_CHECK, "model_sample": "{}"}
    answer = client.post("/v1/fine_tuning/alpha/graders/run", json=body)
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "concurrency_limit_exceeded"


class EngineAtTheGateway:
    """The gateway's interface to serving, answering as an engine with structured
    output would (the real engine's test comes with the reinforcement recipe)."""

    def __init__(self, state: str = "ready", content: str = '{"steps": [], "result": 0.8}'):
        self.bodies: list[dict[str, Any]] = []
        self._state, self.content = state, content

    def state(self, _base_model: str) -> str:
        return self._state

    async def respond(self, kind: str, target: Any, body: dict[str, Any]) -> Any:
        assert kind == "chat" and target.base_model == "ftaas-tiny"
        self.bodies.append(body)
        usage = {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}
        message = {"role": "assistant", "content": self.content}
        return {"status": 200, "body": {"choices": [{"message": message}], "usage": usage}}, None


def test_the_judge_is_a_served_model_asked_for_structured_output(
    client: Any, sdk: OpenAI, settings: Settings
) -> None:
    engine = EngineAtTheGateway()
    client.app.state.gateway = engine
    client.app.state.graders.settings = settings.model_copy(update={"serving_enabled": True})
    grader = {**SCORE, "sampling_params": {"temperature": 0.2, "max_completions_tokens": 50}}
    answer = sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample="Paris")  # type: ignore[arg-type]
    assert answer.reward == 0.8 and not answer.metadata.errors.api_model_grader_server_error
    assert answer.metadata.sampled_model_name == "ftaas-tiny"
    assert answer.metadata.token_usage == 39
    assert answer.api_model_grader_token_usage_per_model == {
        "ftaas-tiny": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}
    }
    body = engine.bodies[0]
    assert body["model"] == "ftaas-tiny" and body["temperature"] == 0.2 and body["max_tokens"] == 50
    assert body["messages"][0] == {"role": "user", "content": "Is Paris right?"}
    schema = body["response_format"]["json_schema"]
    assert body["response_format"]["type"] == "json_schema" and schema["strict"] is True
    assert schema["schema"]["required"] == ["steps", "result"]

    client.app.state.gateway = EngineAtTheGateway(state="engine warming up")
    answer = sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample="Paris")  # type: ignore[arg-type]
    assert answer.metadata.errors.api_model_grader_server_error is True
    assert "not ready: engine warming up" in str(
        answer.metadata.errors.api_model_grader_server_error_details
    )


def test_a_judge_model_the_caller_cannot_use_is_a_404_naming_the_field(sdk: OpenAI) -> None:
    unknown = {**SCORE, "model": "ft:ftaas-tiny:org::nope"}
    multi = {"type": "multi", "name": "m", "graders": {"j": unknown}, "calculate_output": "j"}
    for grader, param in [(unknown, "grader.model"), (multi, "grader.graders.j.model")]:
        for call in (
            lambda g=grader: sdk.fine_tuning.alpha.graders.run(grader=g, model_sample="x"),  # type: ignore[arg-type]
            lambda g=grader: sdk.fine_tuning.alpha.graders.validate(grader=g),  # type: ignore[arg-type]
        ):
            with pytest.raises(openai.NotFoundError) as caught:
                call()
            assert caught.value.body["param"] == param  # type: ignore[index]
            assert caught.value.code == "model_not_found"
