"""The wire contract, through the official SDK against the app in-process: every
endpoint that needs no training run, with the SDK's own types and pagination helpers.
(Training, serving and checkpoints on live jobs: tests/e2e.)"""

from __future__ import annotations

import pytest
from openai import BadRequestError, ConflictError, NotFoundError, OpenAI
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob

from tests.conftest import memorisation_jsonl

JOB_FIELDS = {
    "id", "object", "created_at", "error", "fine_tuned_model", "finished_at",
    "hyperparameters", "model", "organization_id", "result_files", "seed", "status",
    "trained_tokens", "training_file", "validation_file", "estimated_finish",
    "integrations", "metadata", "method", "user_provided_suffix",
}  # fmt: skip


def upload(sdk: OpenAI, name: str = "train.jsonl") -> FileObject:
    return sdk.files.create(file=(name, memorisation_jsonl()), purpose="fine-tune")


def test_files_page_both_ways_and_the_sdk_follows(sdk: OpenAI):
    ids = [upload(sdk, f"f{i}.jsonl").id for i in range(5)]
    assert sdk.files.wait_for_processing(ids[0]).status == "processed"
    page = sdk.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    assert [f.id for f in sdk.files.list(limit=2)] == ids[::-1]  # auto-pagination
    assert [f.id for f in sdk.files.list(order="asc", limit=2)] == ids
    assert [f.id for f in sdk.files.list(purpose="assistants")] == []
    assert sdk.files.delete(ids[0]).deleted
    with pytest.raises(NotFoundError):
        sdk.files.retrieve(ids[0])


def test_a_job_object_has_every_field_openai_has(sdk: OpenAI, client):
    training = upload(sdk)
    validation = upload(sdk, "valid.jsonl")
    job = sdk.fine_tuning.jobs.create(
        model="ftaas-tiny",
        training_file=training.id,
        validation_file=validation.id,
        suffix="contract",
        seed=42,
        metadata={"team": "search"},
        integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    raw = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    assert set(raw) >= JOB_FIELDS
    assert isinstance(job, FineTuningJob) and job.status == "validating_files"
    assert (job.seed, job.metadata, job.user_provided_suffix) == (
        42,
        {"team": "search"},
        "contract",
    )  # type: ignore[attr-defined]
    assert job.error is None and job.result_files == [] and job.estimated_finish is None
    assert job.hyperparameters.n_epochs == 2 and job.method and job.method.type == "supervised"
    assert job.integrations and job.integrations[0].wandb.project == "p"


def test_jobs_list_page_filter_and_control(sdk: OpenAI, settings, parts):
    settings.max_running_jobs = 0  # jobs wait in the queue: no Ray here
    training = upload(sdk)
    jobs = [
        sdk.fine_tuning.jobs.create(
            model="ftaas-tiny", training_file=training.id, metadata={"n": str(i)}
        )
        for i in range(3)
    ]
    page = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == [jobs[2].id, jobs[1].id] and page.has_more
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=1)] == [j.id for j in jobs[::-1]]
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"n": "1"})] == [jobs[1].id]

    assert not parts["reconciler"].tick().errors
    assert sdk.fine_tuning.jobs.retrieve(jobs[0].id).status == "queued"
    assert sdk.fine_tuning.jobs.pause(jobs[0].id).status == "paused"
    assert sdk.fine_tuning.jobs.resume(jobs[0].id).status == "queued"
    assert sdk.fine_tuning.jobs.cancel(jobs[0].id).status == "cancelled"
    with pytest.raises(ConflictError):
        sdk.fine_tuning.jobs.resume(jobs[0].id)

    events = sdk.fine_tuning.jobs.list_events(jobs[0].id, limit=2)
    assert events.data[0].message == "Fine-tuning job cancelled" and events.has_more
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(jobs[0].id, limit=2)]
    assert messages[-1] == f"Created fine-tuning job: {jobs[0].id}" and len(messages) == 6
    assert all(e.object == "fine_tuning.job.event" for e in events.data)
    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(jobs[0].id)
    assert checkpoints.data == [] and not checkpoints.has_more


def test_models_list_retrieve_and_refuse_deleting_a_base_model(sdk: OpenAI):
    assert [m.id for m in sdk.models.list()] == ["ftaas-tiny"]
    assert sdk.models.retrieve("ftaas-tiny").owned_by == "ftaas"
    with pytest.raises(BadRequestError):
        sdk.models.delete("ftaas-tiny")
    with pytest.raises(NotFoundError):
        sdk.models.retrieve("ft:ftaas-tiny:local:x:nothere1")
