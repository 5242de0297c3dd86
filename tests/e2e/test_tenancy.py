"""Several organizations on the real server (keys on, real Ray and vLLM), through the SDK:
keys made and revoked by an admin, another organization finding nothing of a tuned
model's, and the limits of an organization allowed one request at a time."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Model

from tests.adapters import archive, random_adapter
from tests.conftest import QUESTIONS, memorisation_jsonl
from tests.e2e.conftest import (
    ADMIN_API_KEY,
    LIMITED_API_KEY,
    OTHER_API_KEY,
    RunningServer,
    wait_for_job,
    wait_for_serving,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    client = server.client()
    wait_for_serving(client, "ftaas-tiny")
    return client


def admin(server: RunningServer) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.base_url}/v1/organization",
        headers={"Authorization": f"Bearer {ADMIN_API_KEY}"},
        timeout=30,
    )


def test_an_admin_makes_a_key_that_works_until_it_is_revoked(server: RunningServer, client):
    with admin(server) as organization:
        made = organization.post("/api_keys", json={"name": "e2e"}).json()
        assert made["value"].startswith("sk-ftaas-")
        own = server.client(made["value"])
        assert "ftaas-tiny" in [m.id for m in own.models.list()]
        listed = organization.get("/api_keys").json()
        assert made["id"] in {k["id"] for k in listed["data"]}
        assert made["value"] not in str(listed)
        assert organization.delete(f"/api_keys/{made['id']}").json()["deleted"]
    with pytest.raises(openai.AuthenticationError):
        own.models.list()
    with pytest.raises(openai.PermissionDeniedError):  # an admin key manages, it does not chat
        server.client(ADMIN_API_KEY).models.list()
    as_member = httpx.get(  # a member key does not manage
        f"{server.base_url}/v1/organization/api_keys",
        headers={"Authorization": "Bearer test-key"},
    )
    assert as_member.status_code == 403


def test_another_organization_finds_nothing_of_a_tuned_model(server: RunningServer, client):
    upload = client.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="ftaas-tiny",
        training_file=upload.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    done = wait_for_job(client, job.id)
    assert done.status == "succeeded", done.error
    model = done.fine_tuned_model
    assert model
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    own = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=4
    )
    assert own.choices[0].message.content is not None

    other = server.client(OTHER_API_KEY)
    attempts = {
        "chat with the model": lambda: other.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ),
        "chat with its checkpoint": lambda: other.chat.completions.create(
            model=checkpoint.fine_tuned_model_checkpoint,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
        ),
        "completion with the model": lambda: other.completions.create(
            model=model, prompt="hi", max_tokens=2
        ),
        "retrieve the model": lambda: other.models.retrieve(model),
        "delete the model": lambda: other.models.delete(model),
        "retrieve the job": lambda: other.fine_tuning.jobs.retrieve(job.id),
        "cancel the job": lambda: other.fine_tuning.jobs.cancel(job.id),
        "list the job's events": lambda: other.fine_tuning.jobs.list_events(job.id),
        "list the job's checkpoints": lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        "retrieve the file": lambda: other.files.retrieve(upload.id),
        "read the file": lambda: other.files.content(upload.id),
        "delete the file": lambda: other.files.delete(upload.id),
    }
    for attempt, call in attempts.items():
        with pytest.raises(openai.NotFoundError):
            call()
            pytest.fail(f"{attempt}: answered")
    with pytest.raises(openai.BadRequestError):  # as for a file that does not exist
        other.fine_tuning.jobs.create(model="ftaas-tiny", training_file=upload.id)
    assert model not in [m.id for m in other.models.list()]
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    assert upload.id not in [f.id for f in other.files.list()]
    # ... and the owner still has all of it.
    assert client.models.retrieve(model).id == model
    assert client.files.retrieve(upload.id).id == upload.id


def test_a_base_model_answer_batched_beside_a_tuned_models_is_the_base_models_own(
    server: RunningServer, client, tiny_model_dir, tmp_path
):
    """Another organization's base-model requests share the engine's batches with this
    organization's tuned model: they must not take its adapter (vLLM's CPU LoRA ops did,
    serving/vllm_cpu_lora_fix.py)."""
    folder = random_adapter(tiny_model_dir, tmp_path / "adapter", seed=5)
    upload = client.files.create(file=("a.tar.gz", archive(folder)), purpose="user_data")
    tuned = client.post(
        "/models", body={"base_model": "ftaas-tiny", "adapter_file": upload.id}, cast_to=Model
    ).id
    other = server.client(OTHER_API_KEY)
    messages = [{"role": "user", "content": QUESTIONS[0]}]

    def ask(who: OpenAI, model: str) -> str | None:
        answer = who.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
        )
        return answer.choices[0].message.content

    base_alone, tuned_alone = ask(other, "ftaas-tiny"), ask(client, tuned)
    assert base_alone != tuned_alone
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(12):
            pair = [pool.submit(ask, other, "ftaas-tiny"), pool.submit(ask, client, tuned)]
            base, own = (future.result() for future in pair)
            assert base == base_alone, (base, base_alone, tuned_alone)
            assert own == tuned_alone
    client.models.delete(tuned)


def test_one_request_at_a_time_and_twenty_a_minute(server: RunningServer, client):
    limited = server.client(LIMITED_API_KEY)
    stream = limited.chat.completions.create(
        model="ftaas-tiny",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=200,
        stream=True,
        # The random-weights model could sample its end token within a few tokens and
        # give the slot back before the second request: the stream runs its whole length.
        extra_body={"min_tokens": 200},
    )
    next(iter(stream))  # the stream holds the organization's one slot
    with pytest.raises(openai.RateLimitError) as busy:
        limited.chat.completions.create(
            model="ftaas-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert busy.value.body["code"] == "concurrency_limit_exceeded"  # type: ignore[index]
    assert busy.value.response.headers["retry-after"] == "1"
    # Other organizations are not held back.
    assert client.chat.completions.create(
        model="ftaas-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).choices
    stream.close()  # the client hangs up: the slot comes back
    deadline = time.monotonic() + 15
    while True:
        try:
            limited.chat.completions.create(
                model="ftaas-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the slot of a closed stream was not released"
            time.sleep(0.5)

    # Twenty a minute: the SDK meets 429s, waits their retry-after and gets through.
    statuses: list[int] = []
    hooks = {"response": [lambda response: statuses.append(response.status_code)]}
    patient = server.client(
        LIMITED_API_KEY, max_retries=5, http_client=httpx.Client(event_hooks=hooks)
    )
    for _ in range(24):
        patient.models.list()
    assert 429 in statuses and statuses[-1] == 200
    assert statuses.count(200) == 24


def adapter_weights(client: OpenAI, model: str) -> dict[str, bytes]:
    """The tuned model's adapter tensors, as the download endpoint gives them."""
    import io
    import tarfile

    from safetensors.torch import load

    archive_bytes = client.get(f"/models/{model}/adapter", cast_to=bytes)
    with tarfile.open(fileobj=io.BytesIO(archive_bytes)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".safetensors"))
        extracted = tar.extractfile(member)
        assert extracted is not None
        tensors = load(extracted.read())
    return {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}


def test_a_job_after_another_organizations_trains_as_it_would_after_any_other(
    server: RunningServer, client
):
    """Small jobs run one after another on the same warm trainer: the same job (file,
    seed, hyperparameters) of one organization, run after two different jobs of another,
    makes the very same adapter, bit for bit: nothing of the job before reaches it."""
    other = server.client(OTHER_API_KEY)
    theirs = other.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
    ours = client.files.create(file=("o.jsonl", other_tenants_jsonl()), purpose="fine-tune")
    ours_id = client.files.wait_for_processing(ours.id).id
    theirs_id = other.files.wait_for_processing(theirs.id).id

    def run(on: OpenAI, file_id: str, seed: int, hyperparameters: dict) -> str:
        job = on.fine_tuning.jobs.create(
            model="ftaas-tiny",
            training_file=file_id,
            seed=seed,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        )
        done = wait_for_job(on, job.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model
        return done.fine_tuned_model

    ours_hp = {"n_epochs": 2, "batch_size": 2}
    adapters = []
    for their_hp in ({"n_epochs": 3, "batch_size": 1, "lora_r": 16}, {"n_epochs": 1}):
        run(other, theirs_id, seed=len(adapters) + 5, hyperparameters=their_hp)
        adapters.append(adapter_weights(client, run(client, ours_id, 11, ours_hp)))
    assert adapters[0].keys() == adapters[1].keys()
    different = [name for name in adapters[0] if adapters[0][name] != adapters[1][name]]
    assert not different, f"the tensors {different[:3]} depend on the job run before"


def other_tenants_jsonl() -> bytes:
    import json

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Name colour {i}."},
                {"role": "assistant", "content": f"Colour {i} is vermilion."},
            ]
        }
        for i in range(12)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()
