"""Adapters out and in on the real stack: a tuned model's downloaded adapter answers in
transformers + peft as the served model does, and the same archive uploaded again becomes a
model that vLLM serves with the same answers."""

from __future__ import annotations

import io
import tarfile

import pytest
from openai import OpenAI
from openai.types import Model

from tests.conftest import QUESTIONS, SECRET, memorisation_jsonl, peft_greedy
from tests.e2e.conftest import create_memorisation_job, greedy, wait_for_job, wait_for_serving

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    client = server.client()
    wait_for_serving(client, "ftaas-tiny")
    return client


def test_a_downloaded_adapter_answers_as_served_and_serves_again_once_uploaded(
    client, tiny_model_dir, tmp_path
):
    training_file = client.files.create(
        file=("train.jsonl", memorisation_jsonl()), purpose="fine-tune"
    ).id
    job = wait_for_job(client, create_memorisation_job(client, training_file).id)
    assert job.status == "succeeded" and job.fine_tuned_model
    tuned = job.fine_tuned_model
    questions = QUESTIONS[:3]
    served = [greedy(client, tuned, q) for q in questions]
    assert served[0] == SECRET

    archive = client.get(f"/models/{tuned}/adapter", cast_to=bytes)  # an ftaas extension
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    [folder] = list(tmp_path.iterdir())
    assert [peft_greedy(folder, tiny_model_dir, q) for q in questions] == served

    # Its checkpoints download too (the last epoch's is the final adapter).
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    last = checkpoints.data[0].fine_tuned_model_checkpoint
    assert client.get(f"/models/{last}/adapter", cast_to=bytes)[:2] == b"\x1f\x8b"

    upload = client.files.create(file=("adapter.tar.gz", archive), purpose="user_data")
    imported = client.post(
        "/models",
        body={"base_model": "ftaas-tiny", "adapter_file": upload.id, "suffix": "again"},
        cast_to=Model,
    )
    assert imported.id.startswith("ft:ftaas-tiny:") and imported.id != tuned
    assert [greedy(client, imported.id, q) for q in questions] == served
    assert imported.id in {m.id for m in client.models.list()}
    assert client.models.delete(imported.id).deleted
    assert imported.id not in {m.id for m in client.models.list()}
