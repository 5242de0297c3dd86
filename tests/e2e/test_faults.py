"""Faults on the real stack (Ray, vLLM, SQLite): scripted create-then-cancel, the API
SIGKILLed at random moments, a killed serving replica. Every job ends, nothing is
duplicated, and no trainer outlives its job."""

from __future__ import annotations

import contextlib
import random
import time

import psutil
import pytest
from openai import OpenAI

from tests.conftest import QUESTIONS, memorisation_jsonl
from tests.e2e.conftest import TERMINAL, RunningServer, greedy, wait_for_job, wait_for_serving

pytestmark = pytest.mark.e2e


def trainers(server: RunningServer) -> list[psutil.Process]:
    """The server's processes that train: a cold attempt's `training.entrypoint` or Ray
    Train worker, or a warm trainer that is computing (an idle one waits for the next job
    and uses no CPU; a cancelled job's is killed)."""
    found, warm = [], []
    for process in server.processes():
        try:
            cmdline = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "training.entrypoint" in cmdline or "RayTrainWorker" in cmdline:
            found.append(process)
        elif "WarmTrainer" in cmdline:
            warm.append(process)
            process.cpu_percent()  # starts the measurement
    if warm:
        time.sleep(1.0)
    for process in warm:
        try:
            if process.cpu_percent() > 50:
                found.append(process)
        except psutil.Error:
            pass
    return found


def the_machine_dies(server: RunningServer) -> None:
    """SIGKILL to the API and, at once, to every process of its embedded Ray (head,
    trainers, engine): nothing of the old head lives on to finish the job."""
    server.kill()
    for _ in range(2):  # a process forked while the first pass ran
        for process in server.processes():
            with contextlib.suppress(psutil.Error):
                process.kill()
        time.sleep(0.5)


def training_file(client: OpenAI) -> str:
    upload = client.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
    return client.files.wait_for_processing(upload.id).id


def test_twenty_create_then_cancel_all_end_cancelled_with_no_trainer(server: RunningServer):
    client = server.client()
    file_id = training_file(client)
    cancelled = []
    for _ in range(20):
        job = client.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file_id)
        answer = client.fine_tuning.jobs.cancel(job.id)  # sent the moment create answered
        assert answer.status == "cancelled"
        cancelled.append(job.id)
    time.sleep(10)  # the scheduler has ticked on all of them, and Ray has stopped any
    for job_id in cancelled:
        assert client.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    assert trainers(server) == [], "a cancelled job's trainer is still running 10 s later"


def test_the_api_killed_at_random_moments_loses_and_duplicates_nothing(server: RunningServer):
    client = server.client()
    file_id = training_file(client)
    jobs = [
        client.fine_tuning.jobs.create(
            model="ftaas-tiny", training_file=file_id, suffix=f"kill{i}", seed=i
        ).id
        for i in range(3)
    ]
    chance = random.Random(7)
    for _ in range(5):
        time.sleep(chance.uniform(0.5, 8.0))
        server.kill()
        server.start()
        client = server.client()
    finished = [wait_for_job(client, job_id, timeout=900) for job_id in jobs]
    assert [job.status for job in finished] == ["succeeded"] * 3, [j.error for j in finished]
    for job in finished:
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
        assert len({e.id for e in events}) == len(events)
        steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
        assert sorted(steps) == sorted(set(steps)), "a metrics step appears twice"
        assert [e.message for e in events].count("The job has successfully completed") == 1
    wait_for_serving(client, "ftaas-tiny")
    for job in finished:
        assert "pineapple" in greedy(client, job.fine_tuned_model or "", QUESTIONS[0])
    assert no_trainer_within(server, 30), "a trainer outlived its job"


def no_trainer_within(server: RunningServer, seconds: float) -> bool:
    """A finished job's trainer process exits a few seconds after its last record."""
    deadline = time.monotonic() + seconds
    while trainers(server):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def _replica(name: str) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        if any(name in part for part in process.info["cmdline"] or []):
            return process
    raise AssertionError(f"no process {name}")


def test_a_killed_serving_replica_answers_again_within_a_minute(server: RunningServer):
    client = server.client()
    wait_for_serving(client, "ftaas-tiny")
    job = client.fine_tuning.jobs.create(
        model="ftaas-tiny", training_file=training_file(client), suffix="replica"
    )
    tuned = wait_for_job(client, job.id)
    assert tuned.status in TERMINAL and tuned.status == "succeeded", tuned.error
    _replica("ServeReplica:llm-ftaas-tiny").kill()
    killed = time.monotonic()
    deadline = killed + 120
    while True:
        try:
            answer = greedy(client, tuned.fine_tuned_model or "", QUESTIONS[0])
            break
        except Exception:
            assert time.monotonic() < deadline, "serving did not come back"
            time.sleep(2)
    print(f"\nreplica killed → tuned model answers again: {time.monotonic() - killed:.1f} s")
    assert "pineapple" in answer


def past_its_first_checkpoint(client: OpenAI, suffix: str) -> str:
    """A 240-step job (20 epochs of 12 steps), once its first epoch checkpoint is listed."""
    job = client.fine_tuning.jobs.create(
        model="ftaas-tiny",
        training_file=training_file(client),
        suffix=suffix,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 20, "batch_size": 1}},
        },
    )
    deadline = time.monotonic() + 300
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.5)
    return job.id


def test_a_training_worker_killed_mid_epoch_resumes_from_its_checkpoint(server: RunningServer):
    """The job's process is a warm trainer (a one-worker job on the embedded head), which
    Ray replaces, or a Ray Train worker, which Ray Train replaces."""
    client = server.client()
    job_id = past_its_first_checkpoint(client, "worker")
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(
            name in " ".join(p.info["cmdline"] or []) for name in ("RayTrainWorker", "WarmTrainer")
        )
    ]
    assert workers, "no training worker found"
    for worker in workers:
        worker.kill()
    finished = wait_for_job(client, job_id, timeout=600)
    assert finished.status == "succeeded", finished.error
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=1000))
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert sorted(steps) == list(range(1, 241)), "every step once"
    assert any("training continues from the checkpoint" in e.message for e in events)


def test_a_job_survives_the_ray_head_going_away_and_serving_comes_back(server: RunningServer):
    client = server.client()
    job_id = past_its_first_checkpoint(client, "head")
    the_machine_dies(server)
    server.shutdown()
    assert server.processes() == []
    server.start()  # a new head; the job's Ray submission is gone with the old one
    client = server.client()
    finished = wait_for_job(client, job_id, timeout=900)
    assert finished.status == "succeeded", finished.error
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=1000))
    messages = [e.message for e in events]
    assert "Ray no longer knows this job; it is queued to run again" in messages
    assert any(m.startswith("Fine-tuning job resumed from step-") for m in messages)
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert sorted(steps) == list(range(1, 241)), "every step once"
    wait_for_serving(client, "ftaas-tiny")
    assert "pineapple" in greedy(client, finished.fine_tuned_model or "", QUESTIONS[0])
