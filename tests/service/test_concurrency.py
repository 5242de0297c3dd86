"""Two requests at once, on SQLite and on a real PostgreSQL: an event's order is its commit
order within its job, two checks of one organization's quota cannot both find the same
room, and a cancel cannot undo a completion.

A race is made to happen rather than hoped for: the first request is held between its
check and its insert until the second has either made the same check (no lock: both find
room) or waited on the first (a lock) for a second.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from service.auth import OPEN_ACCESS_ORGANIZATION, Tenant
from service.db import EventRow, FileRow, JobRow
from service.errors import InvalidRequest, QuotaExceeded
from service.ids import event_id, file_id
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client
from tests.service.test_limits import limited, sdk_for

HELD_S = 1.0  # how long a request is held after its check, waiting for the other


def held_after(check: Callable[..., Any]) -> Callable[..., Any]:
    """`check`, then a wait until a second caller has also passed it (or HELD_S)."""
    both = threading.Barrier(2, timeout=HELD_S)

    def checked(*args: Any, **kwargs: Any) -> Any:
        result = check(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):  # the other waits on a lock
            both.wait()
        return result

    return checked


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads together; each one's result or exception."""
    outcomes: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            outcomes[index] = calls[index]()
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_a_jobs_events_are_numbered_in_the_order_they_commit(client, parts):
    """Before: A draws seq 7, B draws 8 and commits; a client reads 8 as the newest event,
    then A commits 7 below it, and the client, polling for what is newer than 8, never
    sees it. Now B's insert waits for A's commit, so B's event is numbered after A's."""
    db = parts["db"]
    upload = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", memorisation_jsonl())},
        data={"purpose": "fine-tune"},
    ).json()
    job = client.post(
        "/v1/fine_tuning/jobs", json={"model": "ftaas-tiny", "training_file": upload["id"]}
    ).json()

    def event(message: str) -> EventRow:
        return EventRow(id=event_id(), job_id=job["id"], message=message, data={})

    first = db.session()
    session = first.__enter__()  # A: an event inserted, not yet committed
    a = event("A")
    session.add(a)
    session.flush()
    b_done = threading.Event()
    b = event("B")

    def write_b() -> None:
        with db.session() as other:
            other.add(b)
        b_done.set()

    writer = threading.Thread(target=write_b)
    writer.start()
    assert not b_done.wait(1.0), "B committed an event while A's was still open"
    newest = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1").json()["data"]
    assert newest[0]["message"] != "B"
    first.__exit__(None, None, None)
    writer.join(timeout=30)
    assert b_done.is_set()
    assert b.seq > a.seq
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events[:2]] == ["B", "A"]
    older = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?after={b.id}&limit=1")
    assert older.json()["data"][0]["id"] == a.id


def test_two_uploads_at_once_cannot_both_take_the_last_file(settings, parts):
    changed = limited(settings, parts, files=1)
    limits = parts["limits"]
    assert limits.settings is changed
    limits.check_storage = held_after(limits.check_storage)

    def add(name: str) -> str:
        with parts["db"].session() as session:
            limits.check_storage(session, "org-a", 10, "file")
            session.add(
                FileRow(
                    id=file_id(),
                    organization="org-a",
                    filename=name,
                    purpose="fine-tune",
                    bytes=10,
                    status="processed",
                    blob_key=f"files/{name}",
                )
            )
        return name

    outcomes = at_once(lambda: add("a"), lambda: add("b"))
    assert sum(isinstance(o, str) for o in outcomes) == 1, outcomes
    assert sum(isinstance(o, QuotaExceeded) for o in outcomes) == 1, outcomes
    with parts["db"].session() as session:
        assert session.query(FileRow).filter_by(organization="org-a").count() == 1


def test_two_job_creations_at_once_cannot_exceed_active_jobs(settings, parts):
    client = api_client(limited(settings, parts, active_jobs=1), parts)
    sdk = sdk_for(client, "key-a", [], max_retries=0)
    file = sdk.files.create(file=("t.jsonl", io.BytesIO(memorisation_jsonl())), purpose="fine-tune")
    limits = parts["limits"]
    limits.check_jobs = held_after(limits.check_jobs)

    def create() -> Any:
        return sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=file.id)

    outcomes = at_once(create, create)
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(refused) == 1, outcomes
    assert refused[0].body["code"] == "job_quota_exceeded"  # type: ignore[index]
    with parts["db"].session() as session:
        assert session.query(JobRow).count() == 1


def test_two_parts_at_once_cannot_overfill_an_upload(sdk, parts):
    uploads = parts["uploads"]
    upload = sdk.uploads.create(
        bytes=10, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    counted = uploads._stored_bytes

    def stored_bytes(upload_id: str, session: Any = None) -> int:
        return counted(upload_id, session)

    held = held_after(stored_bytes)
    # Only the count made in the adding transaction is held (not the room asked before).
    uploads._stored_bytes = lambda i, s=None: held(i, s) if s is not None else counted(i)

    def add() -> Any:
        return sdk.uploads.parts.create(upload_id=upload.id, data=b"0123456789")

    outcomes = at_once(add, add)
    assert sum(isinstance(o, openai.BadRequestError) for o in outcomes) == 1, outcomes
    assert counted(upload.id) == 10


def test_a_cancel_that_loses_to_a_completion_answers_as_after_it(sdk, parts, monkeypatch):
    uploads = parts["uploads"]
    data = memorisation_jsonl()
    upload = sdk.uploads.create(
        bytes=len(data), filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    part = sdk.uploads.parts.create(upload_id=upload.id, data=data)
    tenant = Tenant(OPEN_ACCESS_ORGANIZATION)
    read_pending = uploads._pending(tenant, upload.id)  # the cancel read it pending...
    done = sdk.uploads.complete(upload_id=upload.id, part_ids=[part.id])  # ...then this won
    monkeypatch.setattr(uploads, "_pending", lambda _tenant, _id: read_pending)
    with pytest.raises(InvalidRequest) as refused:
        uploads.cancel(tenant, upload.id)
    assert "is completed" in refused.value.message
    monkeypatch.undo()
    with pytest.raises(openai.BadRequestError) as after:  # the same answer, in sequence
        sdk.uploads.cancel(upload.id)
    assert after.value.body["param"] == "upload_id"  # type: ignore[index]
    assert "is completed" in after.value.body["message"]  # type: ignore[index]
    assert done.file is not None
    assert sdk.files.retrieve(done.file.id).status == "processed"


def test_a_quota_check_waits_for_another_of_the_same_organization_only(parts):
    """The lock is per organization: another organization's check does not wait."""
    db, limits = parts["db"], parts["limits"]
    first = db.session()
    session = first.__enter__()
    limits.check_jobs(session, "org-a")
    started = time.monotonic()
    other_done = threading.Event()

    def other() -> None:
        with db.session() as s:
            limits.check_jobs(s, "org-b")
        other_done.set()

    thread = threading.Thread(target=other)
    thread.start()
    # SQLite has one writer for the whole database: there, org-b waits too.
    if db.engine.dialect.name == "postgresql":
        assert other_done.wait(10), "org-b waited on org-a's quota lock"
        assert time.monotonic() - started < 10
    first.__exit__(None, None, None)
    thread.join(timeout=30)
    assert other_done.is_set()
