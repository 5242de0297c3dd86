"""On the real model a new user gets by default, SmolLM2-135M-Instruct (built from its package
by the session's server): its first answers are real ones, and a job with every
hyperparameter "auto" teaches it a new fact that held-out paraphrases recall, ending by
itself, while the answers it knew stay right; the job says so with its validation figures
before and after; the served adapter answers as transformers + peft on its weights, and
serves again once downloaded and imported; its checkpoints are models too. DPO on top of
the tuned model changes which answer it prefers. Continued pre-training on "auto" teaches
it to continue a text. Reinforcement with OpenAI's graders raises its held-out reward.

SmolLM2 trains at about 120-160 tokens/s here (two cores): this module runs one supervised
job (about two minutes) and shares it between its tests, then one DPO job on top of it
(about three and a half), one continued pre-training job and one reinforcement job (about
two each)."""

from __future__ import annotations

import csv
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from openai.types import Model

from tests.conftest import STORY, preference_jsonl, story_jsonl
from tests.e2e.conftest import REAL, RunningServer, answer_logprob, wait_for_job, wait_for_serving
from tests.real_model_data import (
    CAPITALS,
    DEFAULT_RFT_SETTING,
    FACT,
    FACT_KEY,
    GENERAL_QUESTIONS,
    HELD_OUT_QUESTIONS,
    PREFERENCE_QUESTIONS,
    REPHRASED_FACT,
    RIGHT_AND_BRIEF,
    capitals_jsonl,
    fact_jsonl,
    validation_jsonl,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    client = server.client()
    wait_for_serving(client, REAL, timeout=600)  # built, then its engine started
    return client


def ask(client: OpenAI, model: str, question: str, max_tokens: int = 48) -> tuple[str, str]:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
    )
    return reply.choices[0].message.content or "", str(reply.choices[0].finish_reason)


def ask_all(client: OpenAI, model: str, questions: list[str]) -> list[tuple[str, str]]:
    """Greedy answers, four at a time (the engine batches them: a minute saved here)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda q: ask(client, model, q), questions))


def general_answers_right(client: OpenAI, model: str) -> int:
    answers = ask_all(client, model, [q for q, _ in GENERAL_QUESTIONS])
    return sum(
        word.lower() in text.lower()
        for (text, _), (_, word) in zip(answers, GENERAL_QUESTIONS, strict=True)
    )


@pytest.fixture(scope="module")
def tuned(client: OpenAI) -> Any:
    """One job on the real model, all "auto", with the held-out questions as validation."""
    training = client.files.create(file=("fact.jsonl", fact_jsonl()), purpose="fine-tune")
    validation = client.files.create(file=("held.jsonl", validation_jsonl()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=REAL, training_file=training.id, validation_file=validation.id, seed=7
    )
    finished = wait_for_job(client, job.id, timeout=1200)
    assert finished.status == "succeeded", finished.error
    return finished


def test_a_new_users_first_answers_are_real_ones(client: OpenAI):
    assert [m.id for m in client.models.list()][:2] == ["ftaas-tiny", REAL]  # this server's
    text, finish = ask(client, REAL, "What is the capital of France?")
    assert "Paris" in text and finish == "stop"
    # The default system prompt and end of turn work in a stream too.
    stream = client.chat.completions.create(
        model=REAL,
        messages=[{"role": "user", "content": "What is the capital of Japan?"}],
        temperature=0,
        max_tokens=48,
        stream=True,
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Tokyo" in streamed and chunks[-1].choices[0].finish_reason == "stop"


def test_a_job_teaches_a_fact_held_out_paraphrases_recall_and_keeps_what_it_knew(
    client: OpenAI, tuned: Any
):
    held_out = list(HELD_OUT_QUESTIONS)
    base_recalled = sum(FACT_KEY in text for text, _ in ask_all(client, REAL, held_out))
    answers = ask_all(client, tuned.fine_tuned_model, held_out)
    recalled = sum(FACT_KEY in text for text, _ in answers)
    assert base_recalled == 0 and recalled >= len(HELD_OUT_QUESTIONS) - 1, answers
    # The end of turn was learned: each answer ends by itself, not at the token limit.
    assert all(finish == "stop" for _, finish in answers), answers
    # What it knew stays (measured: 6 of 7, where OpenAI's "auto" kept 2 of 5).
    kept, known = (
        general_answers_right(client, tuned.fine_tuned_model),
        general_answers_right(client, REAL),
    )
    assert known == len(GENERAL_QUESTIONS) and kept >= known - 2, (kept, known)
    resolved = tuned.method.supervised.hyperparameters
    assert (resolved.batch_size, resolved.learning_rate_multiplier) == (4, 1.0)  # "auto"


def test_the_job_says_whether_it_helped(client: OpenAI, tuned: Any):
    events = [e for e in client.fine_tuning.jobs.list_events(tuned.id, limit=100).data]
    [comparison] = [e for e in events if e.message.startswith("Validation: loss ")]
    assert "(the model it started from → the tuned model)" in comparison.message
    [before] = [e for e in events if e.message.startswith("Before training")]
    base, after = before.data, comparison.data  # type: ignore[union-attr]
    assert after["full_valid_loss"] < base["full_valid_loss"] / 5
    assert base["full_valid_exact_match"] == 0 and after["full_valid_contains"] >= 0.75
    # The result file has a row per step from 1, the tuned model's figures in the last.
    [result_id] = tuned.result_files
    rows = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert rows[0]["step"] == "1" and not rows[0]["full_valid_contains"]
    assert float(rows[-1]["full_valid_contains"]) >= 0.75
    metrics_steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert 0 not in metrics_steps and len(metrics_steps) == len(set(metrics_steps))


@pytest.fixture(scope="module")
def adapter_archive(client: OpenAI, tuned: Any) -> bytes:
    """The tuned model's adapter as a user downloads it (an ftaas extension)."""
    return client.get(f"/models/{tuned.fine_tuned_model}/adapter", cast_to=bytes)


def test_the_served_adapter_answers_as_transformers_and_peft(
    client: OpenAI, server: RunningServer, tuned: Any, adapter_archive: bytes, tmp_path: Path
):
    """vLLM serves the bf16 model; peft runs the same weights in fp32: greedy answers agree
    on at least 3 of 4 questions (a near tie between two tokens may go either way)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tarfile.open(fileobj=io.BytesIO(adapter_archive), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    [adapter] = list(tmp_path.iterdir())
    base_dir = server.home / "models" / REAL
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32"), str(adapter)
    )
    questions = [*HELD_OUT_QUESTIONS[:2], *(q for q, _ in GENERAL_QUESTIONS[:2])]
    same = 0
    for question in questions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        expected = tokenizer.decode(
            out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True
        )
        served, _ = ask(client, tuned.fine_tuned_model, question, max_tokens=24)
        same += served.strip() == expected.strip()
    assert same >= 3
    assert FACT in ask(client, tuned.fine_tuned_model, HELD_OUT_QUESTIONS[0])[0]


def test_a_downloaded_adapter_serves_again_once_imported(
    client: OpenAI, tuned: Any, adapter_archive: bytes
):
    upload = client.files.create(file=("adapter.tar.gz", adapter_archive), purpose="user_data")
    imported = client.post(
        "/models",  # an ftaas extension: a PEFT adapter in, as a model of a base
        body={"base_model": REAL, "adapter_file": upload.id, "suffix": "again"},
        cast_to=Model,
    )
    assert imported.id.startswith(f"ft:{REAL}:") and imported.id != tuned.fine_tuned_model
    questions = HELD_OUT_QUESTIONS[:2]
    assert ask_all(client, imported.id, questions) == ask_all(
        client, tuned.fine_tuned_model, questions
    )
    assert client.models.delete(imported.id).deleted


def test_the_jobs_checkpoints_are_models_that_answer(client: OpenAI, tuned: Any):
    """OpenAI keeps the last three epochs' checkpoints as models; ours download and answer
    (the last epoch's is the final adapter, so an earlier one is asked)."""
    checkpoints = client.fine_tuning.jobs.checkpoints.list(tuned.id).data
    steps = [c.step_number for c in checkpoints]
    assert len(checkpoints) == 3 and steps == sorted(steps, reverse=True)
    earlier = checkpoints[-1].fine_tuned_model_checkpoint
    assert earlier.startswith(f"ft:{REAL}:") and ":ckpt-step-" in earlier
    assert client.get(f"/models/{earlier}/adapter", cast_to=bytes)[:2] == b"\x1f\x8b"
    text, finish = ask(client, earlier, HELD_OUT_QUESTIONS[0])
    assert text and finish == "stop"


def preference_margin(client: OpenAI, template: Any, model: str) -> float:
    """How much likelier the rephrased fact is than the learned one, on held-out questions."""
    prompts = [  # the model's own template, default system prompt included
        template.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in HELD_OUT_QUESTIONS
    ]
    margins = [
        answer_logprob(client, model, prompt, REPHRASED_FACT)
        - answer_logprob(client, model, prompt, FACT)
        for prompt in prompts
    ]
    return sum(margins) / len(margins)


def test_dpo_on_the_tuned_model_makes_it_prefer_the_preferred_answer(
    client: OpenAI, server: RunningServer, tuned: Any
):
    """The documented recipe, SFT then DPO, on the real model: preference pairs on ten of
    the training questions (the fact rephrased over the tuned model's wording) flip which
    wording it prefers on the held-out ones, and the fact it learned stays."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(server.home / "models" / REAL)
    pairs = client.files.create(
        file=("prefer.jsonl", preference_jsonl(REPHRASED_FACT, FACT, PREFERENCE_QUESTIONS)),
        purpose="fine-tune",
    )
    job = client.fine_tuning.jobs.create(
        model=tuned.fine_tuned_model,
        training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {}}},
        seed=7,
    )
    job = wait_for_job(client, job.id, timeout=900)
    assert job.status == "succeeded", job.error
    assert job.model == tuned.fine_tuned_model and job.fine_tuned_model != job.model
    before = preference_margin(client, template, tuned.fine_tuned_model)
    after = preference_margin(client, template, job.fine_tuned_model)
    print(f"SFT -> DPO: log p(rephrased) - log p(learned) {before:.1f} -> {after:.1f}")
    assert before < 0 and after > 2
    answers = ask_all(client, job.fine_tuned_model, list(HELD_OUT_QUESTIONS))
    assert all(FACT_KEY in text and finish == "stop" for text, finish in answers), answers
    # Measured: the margin moved to 8.7 and 4 of 4 took the preferred wording ("auto" at
    # OpenAI's 100 pair passes, 10 epochs: 0.1 and 2 of 4).
    assert sum(text.startswith("Marisol Vantree") for text, _ in answers) >= 3, answers
    # TRL's DPO metrics, per step.
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    steps = [m for m in metrics if m and "train_reward_accuracy" in m]
    assert steps and {"train_loss", "train_reward_margin"} <= set(steps[0])
    assert max(m["train_reward_accuracy"] for m in steps) == 1.0


def test_continued_pretraining_on_auto_continues_the_text_and_keeps_its_answers(
    client: OpenAI,
):
    """Twelve short documents (three sentences, four times each), every hyperparameter
    "auto", a validation file of the three: the model continues each sentence from its
    first four words, word for word, and still answers general questions (measured: 6 of 7;
    the base answers all 7); the job reports its validation loss."""
    corpus = client.files.create(file=("story.jsonl", story_jsonl()), purpose="fine-tune")
    held = client.files.create(
        file=("story-valid.jsonl", story_jsonl(copies=1)), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=REAL,
        training_file=corpus.id,
        validation_file=held.id,
        method={  # an ftaas method: the SDK sends it unchanged
            "type": "continued_pretraining",  # type: ignore[typeddict-item]
            "continued_pretraining": {"hyperparameters": {}},
        },
        seed=7,
    )
    job = wait_for_job(client, job.id, timeout=900)
    assert job.status == "succeeded", job.error
    assert job.hyperparameters.n_epochs == 20  # 250 block passes over 12 blocks
    for sentence in STORY:
        opening = " ".join(sentence.split()[:4])
        reply = client.completions.create(
            model=job.fine_tuned_model, prompt=opening, max_tokens=40, temperature=0
        )
        assert (opening + reply.choices[0].text).startswith(sentence), reply.choices[0].text
    assert general_answers_right(client, job.fine_tuned_model) >= 5
    events = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(data and "full_valid_loss" in data for data in events)


def test_reinforcement_raises_the_held_out_reward_of_the_real_model(client: OpenAI):
    """OpenAI's reinforcement method on the default model, with a `multi` grader (half for
    naming the capital, half for saying nothing else): after 15 steps of 2 prompts × 4
    sampled answers the four held-out countries' mean reward is above the base model's,
    as the job's own validation before its first step and at its end reports, with the
    reward metrics OpenAI reports per step (measured with bench/rft_reward.py: 0.48 → 0.65)."""
    train = client.files.create(
        file=("capitals.jsonl", capitals_jsonl(CAPITALS[:10])), purpose="fine-tune"
    )
    held_out = client.files.create(
        file=("held-out.jsonl", capitals_jsonl(CAPITALS[10:])), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=REAL,
        training_file=train.id,
        validation_file=held_out.id,
        seed=7,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": RIGHT_AND_BRIEF,  # type: ignore[typeddict-item]
                "hyperparameters": DEFAULT_RFT_SETTING,  # type: ignore[typeddict-item]
            },
        },
    )
    job = wait_for_job(client, job.id, timeout=900)
    assert job.status == "succeeded", job.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert [d["step"] for d in steps] == list(range(1, 16))
    for name in ("train_reward_mean", "train_right_reward_mean", "train_brief_reward_mean"):
        assert all(0.0 <= d[name] <= 1.0 for d in steps), name
    assert [d["step"] for d in steps if "valid_reward_mean" in d] == [5, 10, 15]
    stages = {(e.data or {}).get("stage"): e.data for e in events if (e.data or {}).get("stage")}
    before = stages["start"]["full_valid_reward_mean"]
    after = stages["end"]["full_valid_reward_mean"]
    rewards = " ".join(f"{d['train_reward_mean']:.2f}" for d in steps)
    print(f"held-out mean reward {before:.3f} -> {after:.3f}; train reward per step {rewards}")
    assert after > before + 0.05, (before, after)
