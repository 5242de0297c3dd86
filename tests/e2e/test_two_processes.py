"""Two API processes on one PostgreSQL job store, as behind a load balancer: one of them
schedules at a time (a lease in the store), either answers every call, `max_running_jobs`
holds across both, no event is written twice, and when the scheduling one dies the other
takes over.

They share the session server's FTAAS_HOME, so its Ray head and serving engine (one of
each per test session on this machine); their jobs live in their own PostgreSQL store."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import sqlalchemy as sa

from service.ray_cluster import free_port
from tests.conftest import memorisation_jsonl
from tests.e2e.conftest import ROOT, SESSION_MODELS, RunningServer, wait_for_job
from tests.postgres import PostgresServer

pytestmark = pytest.mark.e2e


def _lease_holder_pid(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        holder = connection.execute(sa.text("SELECT holder FROM leases")).scalar_one()
    engine.dispose()
    return int(holder.split(":")[1])


def test_two_api_processes_share_one_store_and_one_scheduler(
    server: RunningServer, postgres: PostgresServer
):
    url = postgres.new_database()
    pair = []
    for _ in range(2):
        process = RunningServer(server.home, free_port(), server.user_home, SESSION_MODELS)
        process.log = server.home / f"server-{process.base_url.rsplit(':', 1)[1]}.log"
        process.env.update({"FTAAS_DATABASE_URL": url, "FTAAS_MAX_RUNNING_JOBS": "1"})
        pair.append(process)
    first, second = pair
    try:
        for process in pair:
            process.start()
        a, b = first.client(), second.client()
        upload = a.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
        assert b.files.retrieve(upload.id).status == "processed"  # either answers
        jobs = [
            client.fine_tuning.jobs.create(model="ftaas-tiny", training_file=upload.id).id
            for client in (a, b, a)
        ]
        running_at_once: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                statuses = [b.fine_tuning.jobs.retrieve(j).status for j in jobs]
                running_at_once.append(statuses.count("running"))
                time.sleep(0.3)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            wait_for_job(a, jobs[0], {"running", "succeeded"})
            # Kill the one that holds the lease: the other must take over and finish all.
            holder = first if _lease_holder_pid(url) == first.process.pid else second  # type: ignore[union-attr]
            holder.kill()
            survivor = b if holder is first else a
            finished = [wait_for_job(survivor, j, timeout=600) for j in jobs]
        finally:
            stop.set()
            watcher.join()
        assert [j.status for j in finished] == ["succeeded"] * 3, [j.error for j in finished]
        assert max(running_at_once) == 1  # max_running_jobs held across both processes
        for job_id in jobs:
            events = list(survivor.fine_tuning.jobs.list_events(job_id, limit=1000))
            steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
            assert sorted(steps) == list(range(1, len(steps) + 1)), "an event was duplicated"
    finally:
        for process in pair:
            if process.process is not None and process.process.poll() is None:
                process.process.terminate()
                process.process.wait(30)


def test_uvicorn_with_two_workers_on_one_home_shares_its_head_and_one_scheduler(
    server: RunningServer, tmp_path
):
    """`uvicorn --workers 2`: both workers prepare the same FTAAS_HOME at once; one does
    it (a start-up lock), the other reuses the head, and the store's lease lets one
    schedule."""
    head = (server.home / "ray.json").read_text()
    port = free_port()
    with open(tmp_path / "uvicorn.log", "wb") as log:
        workers = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
             "--workers", "2", "--port", str(port)],
            cwd=ROOT, env=server.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base = RunningServer(server.home, port, server.user_home, SESSION_MODELS)
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base.base_url}/health", timeout=2)
                break
            except OSError:
                assert workers.poll() is None and time.monotonic() < deadline, "no answer"
                time.sleep(1)
        client = base.client()
        upload = client.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
        jobs = [
            client.fine_tuning.jobs.create(model="ftaas-tiny", training_file=upload.id).id
            for _ in range(2)
        ]
        finished = [wait_for_job(client, job_id) for job_id in jobs]
        assert [j.status for j in finished] == ["succeeded"] * 2, [j.error for j in finished]
        for job_id in jobs:
            events = list(client.fine_tuning.jobs.list_events(job_id, limit=1000))
            steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
            assert sorted(steps) == list(range(1, len(steps) + 1))
        assert (server.home / "ray.json").read_text() == head  # no second Ray head
    finally:
        workers.terminate()
        workers.wait(30)
