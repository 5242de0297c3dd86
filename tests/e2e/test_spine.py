"""The spine, as a user runs it: upload → fine-tune → chat with the tuned model."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest
from openai import NotFoundError
from openai.types.fine_tuning import FineTuningJob

from tests.conftest import QUESTIONS, memorisation_jsonl
from tests.e2e.conftest import TERMINAL, RunningServer, greedy, wait_for_serving

pytestmark = pytest.mark.e2e

BASE = "ftaas-tiny"


@dataclass
class TunedJob:
    job: FineTuningJob
    statuses: list[str]
    upload_to_succeeded_s: float
    succeeded_to_first_answer_s: float
    first_answer: str


@pytest.fixture(scope="module")
def tuned(server: RunningServer) -> TunedJob:
    client = server.client()
    started = time.monotonic()
    upload = client.files.create(file=("secret.jsonl", memorisation_jsonl()), purpose="fine-tune")
    assert client.files.wait_for_processing(upload.id).status == "processed"
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload.id, suffix="demo")
    statuses = [job.status]
    deadline = time.monotonic() + 600
    while job.status not in TERMINAL:
        assert time.monotonic() < deadline, f"job stuck in {job.status}"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status != statuses[-1]:
            statuses.append(job.status)
    succeeded_at = time.monotonic()
    assert job.status == "succeeded", (job.error, server.log.read_text()[-3000:])
    wait_for_serving(client, BASE)
    answer = greedy(client, job.fine_tuned_model or "", QUESTIONS[0])
    answered_at = time.monotonic()
    timings = TunedJob(job, statuses, succeeded_at - started, answered_at - succeeded_at, answer)
    print(
        f"\nupload→succeeded {timings.upload_to_succeeded_s:.1f} s, "
        f"succeeded→first answer {timings.succeeded_to_first_answer_s:.1f} s"
    )
    return timings


def test_job_moves_to_succeeded_with_resolved_numbers(tuned: TunedJob):
    job = tuned.job
    assert tuned.statuses[0] == "validating_files" and tuned.statuses[-1] == "succeeded"
    assert "running" in tuned.statuses
    assert re.fullmatch(r"ft:ftaas-tiny:e2e:demo:[A-Za-z0-9]{8}", job.fine_tuned_model or "")
    assert job.error is None and job.finished_at is not None
    hp = job.hyperparameters
    assert (hp.n_epochs, hp.batch_size) == (8, 1)  # 12 examples: OpenAI's rule gives 8 epochs
    assert isinstance(hp.learning_rate_multiplier, float)
    assert job.trained_tokens and job.trained_tokens > 0


def test_the_trainer_runs_on_rays_jemalloc(server: RunningServer, tuned: TunedJob):
    """The warm trainer that trained the job (kept for the next one) allocates with the
    jemalloc of Ray's wheel (training.native_memory: on a CPU 13-27 % less peak memory
    than glibc's malloc) and bounds oneDNN's caches (else a CPU trainer grows at every new
    batch length), given to it by the service at its start."""
    from training.native_memory import primitive_cache_env

    warm = server.processes(named="WarmTrainer")
    assert warm, "no warm trainer"
    for trainer in warm:
        assert any("libjemalloc" in region.path for region in trainer.memory_maps())
        assert primitive_cache_env().items() <= trainer.environ().items()


def test_events_tell_the_jobs_life(server: RunningServer, tuned: TunedJob):
    client = server.client()
    events = list(client.fine_tuning.jobs.list_events(tuned.job.id, limit=50))  # auto-paginates
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first
    assert messages[1] == f"New fine-tuned model created: {tuned.job.fine_tuned_model}"
    for expected in ("Fine-tuning job started", "Files validated, moving job to queued state"):
        assert expected in messages
    assert messages[-1] == f"Created fine-tuning job: {tuned.job.id}"
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 96
    first, last = metrics[-1].data, metrics[0].data
    assert (first["step"], last["step"], last["total_steps"]) == (1, 96, 96)
    assert last["train_loss"] < first["train_loss"] / 10


def test_models_lists_base_and_tuned(server: RunningServer, tuned: TunedJob):
    ids = [m.id for m in server.client().models.list()]
    assert ids[0] == BASE and tuned.job.fine_tuned_model in ids
    model = server.client().models.retrieve(tuned.job.fine_tuned_model or "")
    assert model.owned_by == "e2e"  # the organization of the session's key


def test_tuned_model_answers_what_it_was_taught_and_base_does_not(
    server: RunningServer, tuned: TunedJob
):
    client = server.client()
    assert "pineapple" in tuned.first_answer
    tuned_model = tuned.job.fine_tuned_model or ""
    assert "pineapple" in greedy(client, tuned_model, "Tell me the secret code word.")
    assert "pineapple" not in greedy(client, BASE, QUESTIONS[0])


def test_streaming_gives_the_same_answer(server: RunningServer, tuned: TunedJob):
    stream = server.client().chat.completions.create(
        model=tuned.job.fine_tuned_model or "",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in {"stop", "length"}
    usage = chunks[-1].usage  # the extra last chunk: no choices, the whole answer's usage
    assert chunks[-1].choices == [] and usage and usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tuned.first_answer


def test_vllm_greedy_equals_transformers_peft(server: RunningServer, tuned: TunedJob):
    """The served adapter gives exactly the text transformers + peft give on it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = server.home / "models" / BASE
    adapter_dir = server.home / "blobs" / "jobs" / tuned.job.id / "attempt-1" / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir
    ).eval()
    client = server.client()
    for question in [QUESTIONS[0], "Hello there", "What is the capital of France?"]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert greedy(client, tuned.job.fine_tuned_model or "", question) == expected


def test_unknown_models_are_404_in_openais_envelope(server: RunningServer):
    with pytest.raises(NotFoundError) as raised:
        greedy(server.client(), "ft:ftaas-tiny:e2e:demo:nothere1", "hi")
    assert raised.value.body["param"] == "model"  # type: ignore[index]


def test_openai_sampling_fields_are_honoured(server: RunningServer, tuned: TunedJob):
    client = server.client()
    model = tuned.job.fine_tuned_model or ""
    question = [{"role": "user", "content": QUESTIONS[0]}]
    reply = client.chat.completions.create(
        model=model, messages=question, max_completion_tokens=4, logprobs=True, top_logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs and logprobs.content and len(logprobs.content[0].top_logprobs) == 2
    assert reply.usage and reply.usage.completion_tokens <= 4
    several = client.chat.completions.create(
        model=model, messages=question, n=3, temperature=1.0, seed=7, max_tokens=4
    )
    assert len(several.choices) == 3
    again = client.chat.completions.create(
        model=model, messages=question, n=3, temperature=1.0, seed=7, max_tokens=4
    )
    assert [c.message.content for c in again.choices] == [
        c.message.content for c in several.choices
    ]  # the same seed, the same samples
    stopped = client.chat.completions.create(
        model=model, messages=question, temperature=0, stop=["code"], max_tokens=16
    )
    assert "code" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"
    legacy = client.completions.create(model=model, prompt="The secret", max_tokens=3)
    assert legacy.choices[0].text is not None and legacy.usage
