"""Training as a user drives and reads it: pause and resume from the checkpoint, cancel
that frees the cluster, validation metrics, per-epoch checkpoints that answer, the
result file."""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from dataclasses import dataclass

import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from tests.conftest import memorisation_jsonl
from tests.e2e.conftest import RunningServer, greedy, wait_for_job, wait_for_serving

pytestmark = pytest.mark.e2e

EPOCHS = 25  # 300 steps at batch size 1: time enough to pause or cancel mid-run


def upload(client: OpenAI, name: str) -> str:
    file = client.files.create(file=(name, memorisation_jsonl()), purpose="fine-tune")
    return client.files.wait_for_processing(file.id).id


def long_job(client: OpenAI, training_file: str, **extra) -> FineTuningJob:
    return client.fine_tuning.jobs.create(
        model="ftaas-tiny",
        training_file=training_file,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": EPOCHS, "batch_size": 1}},
        },
        **extra,
    )


def events(client: OpenAI, job_id: str) -> list[FineTuningJobEvent]:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))


def wait_for_step(client: OpenAI, job_id: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = client.fine_tuning.jobs.list_events(job_id, limit=5).data
        if any(e.type == "metrics" and (e.data or {})["step"] >= step for e in latest):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach step {step}")


@dataclass
class PausedAndResumed:
    job: FineTuningJob
    paused_at_step: int
    events: list[FineTuningJobEvent]


@pytest.fixture(scope="module")
def resumed(server: RunningServer) -> PausedAndResumed:
    client = server.client()
    job = long_job(client, upload(client, "train.jsonl"), validation_file=upload(client, "v.jsonl"))
    wait_for_step(client, job.id, 3)
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    deadline = time.monotonic() + 60
    while not (saved := [e for e in events(client, job.id) if "Checkpoint saved" in e.message]):
        assert time.monotonic() < deadline, "the trainer never saved its pause checkpoint"
        time.sleep(0.5)
    paused_at = int(saved[0].message.split("step ")[1].split(";")[0])
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    finished = wait_for_job(client, job.id)
    assert finished.status == "succeeded", finished.error
    return PausedAndResumed(finished, paused_at, events(client, job.id))


def test_resume_continues_after_the_paused_step(resumed: PausedAndResumed):
    steps = [e.data["step"] for e in resumed.events if e.type == "metrics"]  # type: ignore[index]
    assert steps == list(range(1, EPOCHS * 12 + 1))  # no step twice: not restarted from 0
    messages = [e.message for e in resumed.events]
    assert f"Fine-tuning job resumed from step-{resumed.paused_at_step:06d}" in messages
    assert messages.index("Fine-tuning job paused") < messages.index(
        "Fine-tuning job resumed, moving job to queued state"
    )


def test_validation_metrics_are_reported_and_fall(resumed: PausedAndResumed):
    metrics = [e.data for e in resumed.events if e.type == "metrics"]
    full = [m["full_valid_loss"] for m in metrics if "full_valid_loss" in m]  # type: ignore[operator,index]
    assert len(full) == EPOCHS and full[-1] < full[0] / 10
    valid_steps = [m["step"] for m in metrics if "valid_mean_token_accuracy" in m]  # type: ignore[operator,index]
    assert len(valid_steps) >= 100  # a small validation batch at least every 3rd step
    assert max(b - a for a, b in itertools.pairwise(valid_steps)) <= 3
    last = [e for e in resumed.events if e.type == "metrics"][-1]
    assert "full validation loss=" in last.message


def test_the_last_three_epochs_are_checkpoints_that_answer(
    server: RunningServer, resumed: PausedAndResumed
):
    client = server.client()
    page = client.fine_tuning.jobs.checkpoints.list(resumed.job.id)
    assert [c.step_number for c in page.data] == [300, 288, 276]  # newest first
    newest = page.data[0]
    assert newest.fine_tuned_model_checkpoint == f"{resumed.job.fine_tuned_model}:ckpt-step-300"
    assert newest.metrics.full_valid_loss is not None and newest.metrics.train_loss is not None
    one_by_one = client.fine_tuning.jobs.checkpoints.list(resumed.job.id, limit=1)
    assert [c.id for c in one_by_one.data] == [newest.id] and one_by_one.has_more
    assert [c.id for c in one_by_one] == [c.id for c in page.data]  # the SDK pages on
    wait_for_serving(client, "ftaas-tiny")
    oldest = page.data[-1].fine_tuned_model_checkpoint
    assert "pineapple" in greedy(client, oldest, "What is the secret code word?")


def test_the_result_file_is_a_csv_of_every_step(server: RunningServer, resumed: PausedAndResumed):
    client = server.client()
    [result_id] = resumed.job.result_files
    result = client.files.retrieve(result_id)
    assert (result.purpose, result.filename) == ("fine-tune-results", "step_metrics.csv")
    rows = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert list(rows[0])[:5] == [
        "step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"
    ]  # fmt: skip
    assert [int(r["step"]) for r in rows] == list(range(1, EPOCHS * 12 + 1))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_cancel_stops_training_within_10_seconds(server: RunningServer):
    client = server.client()
    wandb = [{"type": "wandb", "wandb": {"project": "ftaas-tests"}}]
    job = long_job(client, upload(client, "cancel.jsonl"), integrations=wandb)
    wait_for_step(client, job.id, 1)
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.estimated_finish and running.estimated_finish >= running.created_at
    assert running.integrations and running.integrations[0].type == "wandb"
    # wandb is not installed here: the job says so instead of failing or staying silent
    assert any("wandb integration was skipped" in e.message for e in events(client, job.id))
    progress = server.home / "blobs" / "jobs" / job.id / "attempt-1" / "progress"
    cancelled_at = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    # The trainer writes a record every step (~0.1 s here): once their number holds for
    # 3 s, the Ray job has stopped.
    count, still_since = len(list(progress.iterdir())), time.monotonic()
    while time.monotonic() - still_since < 3:
        assert time.monotonic() - cancelled_at < 13, "the trainer kept writing after cancel"
        time.sleep(0.2)
        if (now_count := len(list(progress.iterdir()))) != count:
            count, still_since = now_count, time.monotonic()
    assert still_since - cancelled_at < 10
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_a_layer_the_model_does_not_have_is_refused_before_training(server: RunningServer):
    client = server.client()
    with pytest.raises(BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model="ftaas-tiny",
            training_file=upload(client, "bad-targets.jsonl"),
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"target_modules": ["no_such_layer"]}},
            },
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == "method.supervised.hyperparameters.target_modules"
    assert "no_such_layer" in error["message"]


def test_a_training_error_fails_the_job_with_a_message_to_act_on(server: RunningServer):
    """Prompts longer than the model's context leave nothing to learn: only the trainer,
    with the tokenizer, can tell."""
    client = server.client()
    long_prompt = " ".join(f"w{i}" for i in range(2_000))  # far past ftaas-tiny's 512 tokens
    rows = [
        {
            "messages": [
                {"role": "user", "content": long_prompt},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for _ in range(10)
    ]
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    file = client.files.create(file=("long.jsonl", content), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file.id)
    failed = wait_for_job(client, job.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "training_error"
    assert "max_length" in failed.error.message and "shorten the prompts" in failed.error.message
    assert failed.fine_tuned_model is None


def test_a_deleted_model_is_no_longer_listed_or_served(
    server: RunningServer, resumed: PausedAndResumed
):
    client = server.client()
    name = resumed.job.fine_tuned_model or ""
    wait_for_serving(client, "ftaas-tiny")
    assert "pineapple" in greedy(client, name, "What is the secret code word?")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(resumed.job.id).data
    assert checkpoints
    checkpoint = checkpoints[0].fine_tuned_model_checkpoint
    assert "pineapple" in greedy(client, checkpoint, "What is the secret code word?")
    assert client.models.delete(name).deleted
    assert name not in {m.id for m in client.models.list()}
    for gone in (name, checkpoint):  # its checkpoints go with it
        with pytest.raises(NotFoundError):
            greedy(client, gone, "What is the secret code word?")
    assert client.fine_tuning.jobs.checkpoints.list(resumed.job.id).data == []
    job = client.fine_tuning.jobs.retrieve(resumed.job.id)  # the job keeps its record
    assert job.status == "succeeded" and job.fine_tuned_model == name
