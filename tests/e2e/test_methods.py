"""The training methods end to end on ftaas-tiny, through the official SDK on the real stack
(Ray Train, vLLM): DPO from a base model, and continued pre-training on raw text with a
validation file. Every hyperparameter is left "auto" unless the test is about one. The
same methods on the real model, and DPO on top of a tuned one (SFT → DPO, the documented
recipe), are in tests/e2e/test_real_model.py."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from tests.conftest import (
    QUESTIONS,
    SECRET,
    STORY,
    WRONG,
    preference_jsonl,
    story_jsonl,
)
from tests.e2e.conftest import (
    REAL,
    answer_logprob,
    greedy,
    wait_for_job,
    wait_for_serving,
)
from training.tiny_model import CHATML_TEMPLATE

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


def chat_prompt(question: str) -> str:
    """The question as ftaas-tiny's template renders it for an answer."""
    from jinja2 import Template

    return Template(CHATML_TEMPLATE).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True
    )


def margin(client: OpenAI, model: str, preferred: str, other: str) -> float:
    """How much more likely the preferred answer is than the other, over the questions."""
    return (
        sum(
            answer_logprob(client, model, chat_prompt(q), preferred)
            - answer_logprob(client, model, chat_prompt(q), other)
            for q in QUESTIONS[:4]
        )
        / 4
    )


def dpo_job(client: OpenAI, model: str, training_file: str, **hyperparameters):
    return client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        method={"type": "dpo", "dpo": {"hyperparameters": hyperparameters}},
    )


def test_dpo_makes_the_preferred_answer_the_models_answer(client):
    pairs = upload(client, "prefer.jsonl", preference_jsonl(SECRET, WRONG))
    job = wait_for_job(client, dpo_job(client, "ftaas-tiny", pairs).id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo"
    resolved = job.method.dpo.hyperparameters
    # "auto": 12 pairs raised to 200 pair passes (training/methods.py).
    assert resolved.beta == 0.1 and resolved.n_epochs == 16 and resolved.batch_size == 1
    tuned = job.fine_tuned_model
    assert tuned and tuned.startswith("ft:ftaas-tiny:")
    assert greedy(client, tuned, QUESTIONS[0]) == SECRET
    before = margin(client, "ftaas-tiny", SECRET, WRONG)
    after = margin(client, tuned, SECRET, WRONG)
    print(f"DPO from the base: margin log p(preferred) - log p(other) {before:.1f} -> {after:.1f}")
    assert after > before + 10
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    steps = [m for m in metrics if m and "train_reward_accuracy" in m]
    assert steps and {"train_loss", "train_reward_margin"} <= set(steps[0])
    assert max(m["train_reward_accuracy"] for m in steps) == 1.0


def test_continued_pretraining_teaches_the_model_to_continue_the_text(client):
    corpus = upload(client, "story.jsonl", story_jsonl())
    job = client.fine_tuning.jobs.create(
        model="ftaas-tiny",
        training_file=corpus,
        validation_file=upload(client, "story-valid.jsonl", story_jsonl(copies=1)),
        method={  # an ftaas method: the SDK sends it unchanged
            "type": "continued_pretraining",  # type: ignore[typeddict-item]
            "continued_pretraining": {"hyperparameters": {"n_epochs": 30, "batch_size": 2}},
        },
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "continued_pretraining"
    for sentence in STORY:
        opening = " ".join(sentence.split()[:4])
        reply = client.completions.create(
            model=job.fine_tuned_model, prompt=opening, max_tokens=64, temperature=0
        )
        assert (opening + reply.choices[0].text).startswith(sentence), reply.choices[0].text
    events = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(data and "full_valid_loss" in data for data in events)


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
