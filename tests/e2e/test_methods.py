"""Reinforcement fine-tuning end to end on ftaas-tiny, through the official SDK on the real
stack (Ray Train, vLLM): answers sampled by the serving engine, and a model grader judged
by a model this server serves. Supervised, DPO (SFT → DPO, the documented recipe),
continued pre-training and reinforcement on the real model are in
tests/e2e/test_real_model.py; DPO's reference policy from a base model and from a tuned
one, in tests/training/test_dpo.py."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from tests.conftest import QUESTIONS
from tests.e2e.conftest import REAL, wait_for_job, wait_for_serving

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    client = server.client()
    wait_for_serving(client, "ftaas-tiny")
    return client


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def upload(client: OpenAI, name: str, content: bytes) -> str:
    return client.files.create(file=(name, content), purpose="fine-tune").id


def test_reinforcement_makes_the_graders_answer_the_models_answer(client):
    """GRPO with a string_check grader: what it rewards is rare in ftaas-tiny's random
    answers (about 1 in 6 says "in"), and the rule after a few steps, on held-out prompts
    too."""
    word = {"word": "in"}
    prompts = [{"messages": [{"role": "user", "content": q}], **word} for q in QUESTIONS]
    grader = {
        "type": "string_check",
        "name": "says the word",
        "input": "{{sample.output_text}}",
        "reference": "{{item.word}}",
        "operation": "ilike",
    }
    job = client.fine_tuning.jobs.create(
        model="ftaas-tiny",
        seed=8,
        training_file=upload(client, "prompts.jsonl", jsonl(prompts[:10])),
        validation_file=upload(client, "held-out.jsonl", jsonl(prompts[10:])),
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,  # type: ignore[typeddict-item]
                "hyperparameters": {
                    "n_epochs": 3,
                    "batch_size": 2,
                    "learning_rate_multiplier": 10,
                    "eval_interval": 5,
                    "group_size": 8,  # type: ignore[typeddict-unknown-key]
                    "max_completion_tokens": 6,
                    # Sampled by the serving engine, the policy's weights hot-loaded each
                    # step (`auto` would sample in the trainer on this CPU).
                    "rollouts": "serving",
                },
            },
        },
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "reinforcement"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert [d["step"] for d in steps] == list(range(1, 16))
    rewards = [d["train_reward_mean"] for d in steps]
    assert rewards[0] < 0.5 and max(rewards[-3:]) == 1.0, rewards
    validated = [d for d in steps if "valid_reward_mean" in d]
    assert [d["step"] for d in validated] == [5, 10, 15]
    assert validated[-1]["valid_reward_mean"] == 1.0
    assert any("train mean reward=" in e.message for e in events if e.type == "metrics")
    assert any(e.message.startswith("Answers are sampled by the serving engine") for e in events)
    (compared,) = [e for e in events if e.message.startswith("Validation: mean reward")]
    print(compared.message)
    results = client.files.content(job.result_files[0]).text.splitlines()
    assert "train_reward_mean" in results[0].split(",")
    # The tuned model, served: its greedy answers say the word.
    for question in QUESTIONS[10:]:
        answer = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": question}],
            max_tokens=6,
            temperature=0,
        )
        assert "in" in (answer.choices[0].message.content or "").lower()


def test_a_score_model_grader_in_a_job_is_judged_by_a_model_this_server_serves(client):
    """OpenAI's score_model grader in a reinforcement job: the trainer asks the judge (here
    SmolLM2, served beside ftaas-tiny) through serving, with the grader's JSON schema as
    structured output, and its scores are the rewards."""
    wait_for_serving(client, REAL)
    # Ten prompts, the fewest a reinforcement file may hold: one step.
    questions = (QUESTIONS * 10)[:10]
    prompts = [{"messages": [{"role": "user", "content": q}]} for q in questions]
    judge = {
        "type": "score_model",
        "name": "polite",
        "model": REAL,
        "input": [
            {"role": "system", "content": "Score from 0 to 1 how polite the answer is."},
            {"role": "user", "content": "Answer: {{sample.output_text}}"},
        ],
        "range": [0, 1],
        "sampling_params": {"temperature": 0, "max_completions_tokens": 400},
    }
    job = client.fine_tuning.jobs.create(
        model="ftaas-tiny",
        seed=8,
        training_file=upload(client, "prompts.jsonl", jsonl(prompts)),
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": judge,  # type: ignore[typeddict-item]
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 10,
                    "group_size": 2,  # type: ignore[typeddict-unknown-key]
                    "max_completion_tokens": 6,
                },
            },
        },
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert [d["step"] for d in steps] == [1]
    # The judge answered (in the schema) for most answers; its scores are within range.
    assert all(d["train_grader_error_rate"] < 0.5 for d in steps), steps
    assert all(0.0 <= d["train_reward_mean"] <= 1.0 for d in steps), steps
