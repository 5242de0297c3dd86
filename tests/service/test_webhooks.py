"""Webhooks, as OpenAI's: registered by an organization's admin, written to the outbox in
the transaction that ends a job, delivered by the sender to a real HTTP server on
127.0.0.1 (allowed through FTAAS_WEBHOOK_ALLOWED_HOSTS) and verified there with the SDK's
`client.webhooks.unwrap`; over SQLite and PostgreSQL. The only traffic is to loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from sqlalchemy import func, select

from service.config import Settings
from service.db import (
    Database,
    JobRow,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    WebhookEventRow,
)
from service.fine_tuning.launcher import LaunchState
from service.fine_tuning.lifecycle import JobStatus, transition
from service.fine_tuning.reconciler import Reconciler
from service.webhooks import addresses
from service.webhooks.addresses import refused
from service.webhooks.endpoints import MAX_ENDPOINTS_PER_ORGANIZATION
from service.webhooks.sender import WebhookSender
from service.webhooks.signing import signature
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client
from tests.service.fakes import FakeLauncher
from training.progress import ProgressLog, Started, Succeeded

ADMIN_A = {"Authorization": "Bearer admin-key-of-org-a-0123456789"}
ADMIN_B = {"Authorization": "Bearer admin-key-of-org-b-0123456789"}
MEMBER_A = "member-key-of-org-a-0123456789"
MEMBER_B = "member-key-of-org-b-0123456789"
METRICS_KEY = "metrics-key-0123456789"
TIMEOUT_S = 1.0


class Receiver:
    """A real HTTP server on 127.0.0.1: answers each POST with the next of `script` (a
    status code, or "slow": no answer before the sender's timeout), then 200."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.script: list[int | str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append((self.path, dict(self.headers.items()), body))
                answer = receiver.script.pop(0) if receiver.script else 200
                if answer == "slow":
                    time.sleep(TIMEOUT_S * 2)
                    answer = 200
                assert isinstance(answer, int)
                self.send_response(answer)
                if answer == 302:
                    self.send_header("location", "/elsewhere")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def webhook_settings(settings: Settings, **more: Any) -> Settings:
    values: dict[str, Any] = {
        "home": settings.home,
        "database_url": settings.database_url,
        "serving_enabled": False,
        "admin_keys": f"{ADMIN_A['Authorization'][7:]}:org-a,{ADMIN_B['Authorization'][7:]}:org-b",
        "api_keys": f"{MEMBER_A}:org-a,{MEMBER_B}:org-b",
        "webhook_allowed_hosts": "127.0.0.1",
        "webhook_retry_delays": "0,0,0",
        "webhook_timeout_s": TIMEOUT_S,
        "metrics_key": METRICS_KEY,
    }
    return Settings(**{**values, **more})


class World:
    """The API (admin routes, and the SDK as a member), the reconciler playing Ray's part,
    and the webhook sender, all on one job store."""

    def __init__(self, settings: Settings, parts: dict, **more: Any) -> None:
        self.settings = webhook_settings(settings, **more)
        self.parts = parts
        self.client = api_client(self.settings, parts)
        self.reconciler: Reconciler = parts["reconciler"]
        self.ray: FakeLauncher = parts["launcher"]
        self.sender = WebhookSender(parts["db"], self.settings, parts["metrics"].registry)

    def sdk(self, key: str = MEMBER_A) -> OpenAI:
        return OpenAI(
            base_url="http://127.0.0.1/v1", api_key=key, http_client=self.client, max_retries=0
        )

    def register(self, url: str, headers: dict = ADMIN_A, **body: Any) -> dict[str, Any]:
        answer = self.client.post(
            "/v1/organization/webhooks", json={"url": url, **body}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def job(self, key: str = MEMBER_A) -> str:
        sdk = self.sdk(key)
        upload = sdk.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
        return sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=upload.id).id

    def tick(self) -> None:
        report = self.reconciler.tick()
        assert not report.errors, report.errors

    def running(self, key: str = MEMBER_A) -> str:
        job_id = self.job(key)
        self.tick()
        self.tick()
        assert self.status(job_id) == "running"
        return job_id

    def succeed(self, job_id: str) -> None:
        output_dir = self.row(job_id).output_dir
        assert output_dir is not None
        log = ProgressLog(self.parts["blobs"], output_dir)
        log.write(Started(total_steps=1, n_examples=12, trained_tokens=10))
        log.write(Succeeded(adapter_dir="/adapter"))
        self.ray.end(job_id)
        self.tick()
        assert self.status(job_id) == "succeeded"

    def fail(self, job_id: str) -> None:
        self.ray.end(job_id, LaunchState.FAILED)
        self.tick()
        assert self.status(job_id) == "failed"

    def row(self, job_id: str) -> JobRow:
        with self.parts["db"].session() as session:
            job = session.get(JobRow, job_id)
            assert job is not None
            return job

    def status(self, job_id: str) -> str:
        return self.row(job_id).status

    def deliver(self, sender: WebhookSender | None = None) -> int:
        return asyncio.run((sender or self.sender).deliver_due())

    def metrics(self) -> str:
        headers = {"Authorization": f"Bearer {METRICS_KEY}"}
        return self.client.get("/metrics", headers=headers).text

    def deliveries(self, webhook_id: str, headers: dict = ADMIN_A) -> list[dict[str, Any]]:
        answer = self.client.get(
            f"/v1/organization/webhooks/{webhook_id}/deliveries", headers=headers
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]


@pytest.fixture
def world(settings: Settings, parts: dict) -> World:
    return World(settings, parts)


def unwrap(secret: str, received: tuple[str, dict[str, str], bytes]) -> Any:
    """What the receiver does: OpenAI's SDK verifies the signature over the raw body."""
    _, headers, body = received
    return OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(body, headers)


def test_the_signer_gives_the_sdks_test_vector():
    body = (
        '{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", '
        '"created_at": 1750861210, "type": "response.completed", "data": {"id": "resp_123"}}'
    )
    assert (
        signature(
            "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=",
            "wh_685c059ae39c8190af8c71ed1022a24d",
            1750861210,
            body.encode(),
        )
        == "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY="
    )


def test_an_admin_registers_lists_shows_and_deletes_an_endpoint(world: World, receiver: Receiver):
    created = world.register(receiver.url())
    assert created["object"] == "organization.webhook" and created["id"].startswith("whep_")
    assert created["url"] == receiver.url() and isinstance(created["created_at"], int)
    assert created["events"] == [
        "fine_tuning.job.succeeded",
        "fine_tuning.job.failed",
        "fine_tuning.job.cancelled",
    ]
    assert created["secret"].startswith("whsec_")
    assert len(base64.b64decode(created["secret"][len("whsec_") :])) == 32

    # The secret is shown once.
    listed = world.client.get("/v1/organization/webhooks", headers=ADMIN_A).json()
    assert [w["id"] for w in listed["data"]] == [created["id"]]
    shown = world.client.get(f"/v1/organization/webhooks/{created['id']}", headers=ADMIN_A)
    assert shown.status_code == 200 and shown.json()["status"] == "enabled"
    assert created["secret"] not in json.dumps(listed) + shown.text

    only = world.register(receiver.url(), events=["fine_tuning.job.failed"])
    assert only["events"] == ["fine_tuning.job.failed"]

    gone = world.client.delete(f"/v1/organization/webhooks/{created['id']}", headers=ADMIN_A)
    assert gone.json() == {"object": "organization.webhook.deleted", "id": created["id"],
                           "deleted": True}  # fmt: skip
    again = world.client.get(f"/v1/organization/webhooks/{created['id']}", headers=ADMIN_A)
    assert again.status_code == 404 and again.json()["error"]["param"] == "webhook_id"

    # Bounds and mistakes: 400s in OpenAI's envelope, naming the field.
    for body, param in (
        ({"url": receiver.url(), "events": ["fine_tuning.job.created"]}, "events"),
        ({"url": receiver.url(), "events": []}, "events"),
        ({"url": receiver.url() + "x" * 2100}, "url"),
        ({"url": "ftp://127.0.0.1/hook"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/hook"}, "url"),
    ):
        refused_ = world.client.post("/v1/organization/webhooks", json=body, headers=ADMIN_A)
        assert refused_.status_code == 400, body
        assert refused_.json()["error"]["param"] == param, refused_.json()
    for _ in range(MAX_ENDPOINTS_PER_ORGANIZATION - 1):
        world.register(receiver.url())
    over = world.client.post(
        "/v1/organization/webhooks", json={"url": receiver.url()}, headers=ADMIN_A
    )
    assert over.status_code == 400 and "delete some" in over.json()["error"]["message"]

    member = world.client.get(
        "/v1/organization/webhooks", headers={"Authorization": f"Bearer {MEMBER_A}"}
    )
    assert member.status_code == 403


def test_each_end_of_a_job_is_delivered_signed_and_the_sdk_unwraps_it(
    world: World, receiver: Receiver
):
    every = world.register(receiver.url("/every"))
    failures = world.register(receiver.url("/failures"), events=["fine_tuning.job.failed"])
    succeeded = world.running()  # one job runs at a time
    world.succeed(succeeded)
    failed, cancelled = world.running(), world.job()
    world.fail(failed)
    world.sdk().fine_tuning.jobs.cancel(cancelled)
    assert world.deliver() == 4 and world.deliver() == 0

    by_path: dict[str, list[Any]] = {"/every": [], "/failures": []}
    for received in receiver.received:
        path, headers, body = received
        secret = every["secret"] if path == "/every" else failures["secret"]
        event = unwrap(secret, received)  # raises unless the signature verifies
        by_path[path].append((event.type, event.data.id))
        # OpenAI's thin payload, and nothing more.
        payload = json.loads(body)
        assert set(payload) == {"id", "object", "type", "created_at", "data"}
        assert payload["object"] == "event" and payload["id"].startswith("evt_")
        assert payload["data"] == {"id": event.data.id}
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"].startswith("ftaas-webhooks/")
        assert headers["webhook-id"].startswith("wh_")
        with pytest.raises(Exception, match="signature"):  # another secret: refused
            unwrap(failures["secret"] if path == "/every" else every["secret"], received)
    assert sorted(by_path["/every"]) == sorted(
        [
            ("fine_tuning.job.succeeded", succeeded),
            ("fine_tuning.job.failed", failed),
            ("fine_tuning.job.cancelled", cancelled),
        ]
    )
    assert by_path["/failures"] == [("fine_tuning.job.failed", failed)]

    # What the admin sees of them, and the operator on /metrics.
    seen = world.deliveries(every["id"])
    assert {d["status"] for d in seen} == {"succeeded"} and len(seen) == 3
    assert all(len(d["attempts"]) == 1 and d["attempts"][0]["status_code"] == 200 for d in seen)
    metrics = world.metrics()
    assert 'ftaas_webhook_attempts_total{outcome="delivered"} 4.0' in metrics
    assert 'ftaas_webhook_deliveries{status="succeeded"} 4.0' in metrics

    # Nothing is sent twice, even as the reconciler keeps ticking.
    world.tick()
    assert world.deliver() == 0 and len(receiver.received) == 4


def test_a_receiver_that_fails_first_gets_the_same_webhook_id_until_it_answers(
    world: World, receiver: Receiver
):
    endpoint = world.register(receiver.url())
    receiver.script = [500, "slow", 200]
    world.sdk().fine_tuning.jobs.cancel(world.job())
    for _ in range(3):
        assert world.deliver() == 1
    assert world.deliver() == 0
    ids = {headers["webhook-id"] for _, headers, _ in receiver.received}
    assert len(receiver.received) == 3 and len(ids) == 1
    for received in receiver.received:  # each attempt signed anew, each verifies
        assert unwrap(endpoint["secret"], received).type == "fine_tuning.job.cancelled"

    [delivery] = world.deliveries(endpoint["id"])
    assert delivery["id"] == ids.pop() and delivery["status"] == "succeeded"
    attempts = delivery["attempts"]
    assert [a["status_code"] for a in attempts] == [500, None, 200]
    assert attempts[1]["error"].startswith("timeout") and attempts[1]["duration_ms"] >= 900
    assert all(isinstance(a["attempted_at"], int) for a in attempts)


def test_retries_follow_the_schedule_and_end_when_it_runs_out(
    settings: Settings, parts: dict, receiver: Receiver
):
    world = World(settings, parts, webhook_retry_delays="0,3600")
    endpoint = world.register(receiver.url())
    receiver.script = [503, 503, 503]
    world.sdk().fine_tuning.jobs.cancel(world.job())
    assert world.deliver() == 1 and world.deliver() == 1  # the first delay: 0 s
    assert world.deliver() == 0  # the next in an hour
    [delivery] = world.deliveries(endpoint["id"])
    assert delivery["status"] == "pending" and delivery["next_attempt_at"] >= time.time() + 3500
    world.sender.clock = lambda: time.time() + 3601
    assert world.deliver() == 1
    [delivery] = world.deliveries(endpoint["id"])
    assert delivery["status"] == "failed" and len(delivery["attempts"]) == 3
    assert delivery["last_error"] == "the receiver answered 503"
    assert world.deliver() == 0 and len(receiver.received) == 3
    assert Settings().webhook_retry_delays_s == (5, 300, 1800, 7200, 18000, 36000, 50400,
                                                  72000, 86400)  # fmt: skip


def test_an_api_restart_between_attempts_still_delivers(
    settings: Settings, parts: dict, receiver: Receiver
):
    world = World(settings, parts)
    endpoint = world.register(receiver.url())
    receiver.script = [500]
    world.sdk().fine_tuning.jobs.cancel(world.job())
    assert world.deliver() == 1  # 500: to be tried again

    # The process goes away; another starts on the same job store.
    url = parts["db"].engine.url.render_as_string(hide_password=False)
    parts["db"].engine.dispose()
    db = Database(url)
    restarted = WebhookSender(db, world.settings)
    assert asyncio.run(restarted.deliver_due()) == 1
    first, second = receiver.received
    assert first[1]["webhook-id"] == second[1]["webhook-id"]
    assert unwrap(endpoint["secret"], second).type == "fine_tuning.job.cancelled"

    # A process that dies while sending: its claim runs out, and another sends it again.
    job = world.job()
    world.sdk().fine_tuning.jobs.cancel(job)
    assert len(restarted.claim(8)) == 1  # ...and never records what happened
    assert asyncio.run(restarted.deliver_due()) == 0  # claimed: nobody else sends it
    later = WebhookSender(db, world.settings, clock=lambda: time.time() + restarted.claim_s + 1)
    assert asyncio.run(later.deliver_due()) == 1
    assert unwrap(endpoint["secret"], receiver.received[-1]).data.id == job
    with db.session() as session:
        statuses = session.scalars(select(WebhookDeliveryRow.status)).all()
    assert statuses == ["succeeded", "succeeded"]
    db.engine.dispose()


def test_the_event_is_written_with_the_status_change_or_not_at_all(
    world: World, receiver: Receiver
):
    world.register(receiver.url())
    db: Database = world.parts["db"]
    job_id = world.running()

    def outbox() -> tuple[int, int]:
        with db.session() as session:
            events = session.scalar(select(func.count()).select_from(WebhookEventRow))
            deliveries = session.scalar(select(func.count()).select_from(WebhookDeliveryRow))
            return events or 0, deliveries or 0

    class Crash(Exception):
        pass

    with pytest.raises(Crash), db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        transition(job, JobStatus.FAILED)
        session.flush()
        assert session.scalar(select(func.count()).select_from(WebhookEventRow)) == 1
        assert outbox() == (0, 0)  # not committed: nobody else sees it
        raise Crash  # the process dies before its commit
    assert world.status(job_id) == "running" and outbox() == (0, 0)

    # cancelling reads cancelled: the event is written then, and not again once it stops.
    world.sdk().fine_tuning.jobs.cancel(job_id)
    assert world.status(job_id) == "cancelling" and outbox() == (1, 1)
    world.tick()
    world.tick()
    assert world.status(job_id) == "cancelled" and outbox() == (1, 1)


def test_a_410_disables_the_endpoint_and_a_redirect_is_not_followed(
    world: World, receiver: Receiver
):
    moved = world.register(receiver.url("/moved"))
    receiver.script = [302]
    world.sdk().fine_tuning.jobs.cancel(world.job())
    assert world.deliver() == 1
    assert [path for path, _, _ in receiver.received] == ["/moved"]  # not /elsewhere
    [delivery] = world.deliveries(moved["id"])
    assert delivery["status"] == "pending" and delivery["attempts"][0]["status_code"] == 302
    world.client.delete(f"/v1/organization/webhooks/{moved['id']}", headers=ADMIN_A)

    gone = world.register(receiver.url("/gone"))
    receiver.script = [410]
    world.sdk().fine_tuning.jobs.cancel(world.job())
    assert world.deliver() == 1
    shown = world.client.get(f"/v1/organization/webhooks/{gone['id']}", headers=ADMIN_A).json()
    assert shown["status"] == "disabled" and "410" in shown["disabled_reason"]
    [delivery] = world.deliveries(gone["id"])
    assert delivery["status"] == "failed" and "410" in delivery["last_error"]
    world.sdk().fine_tuning.jobs.cancel(world.job())  # nothing more for it
    assert world.deliver() == 0 and len(world.deliveries(gone["id"])) == 1


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every outgoing connection from Python fails the test (and is listed)."""
    tried: list[object] = []

    def refuse(_socket: socket.socket, address: object) -> None:
        tried.append(address)
        raise AssertionError(f"a connection to {address} was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


def test_private_urls_are_refused_at_registration_without_a_connection(
    world: World, receiver: Receiver, no_connections: list[object]
):
    for url in (
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "https://[fd00::1]/hook",
        "http://0.0.0.0/hook",
        "http://100.64.0.1/hook",
        "http://224.0.0.1/hook",
        receiver.url(host="localhost"),  # resolves to loopback, and is not allowed
        receiver.url(host="2130706433"),  # 127.0.0.1, written as a number
        receiver.url(host="127.1"),
    ):
        answer = world.client.post("/v1/organization/webhooks", json={"url": url}, headers=ADMIN_A)
        assert answer.status_code == 400, url
        error = answer.json()["error"]
        assert error["param"] == "url" and "refused" in error["message"], error
    assert world.client.get("/v1/organization/webhooks", headers=ADMIN_A).json()["data"] == []
    assert no_connections == [] and receiver.received == []


def test_a_host_that_resolves_to_a_private_address_when_sent_is_not_contacted(
    world: World, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    """DNS rebinding: the name was public when registered, and is loopback now."""
    with world.parts["db"].session() as session:
        session.add(
            WebhookEndpointRow(
                id="whep_rebinding",
                organization="org-a",
                url=receiver.url(host="rebinding.example"),
                events=["fine_tuning.job.cancelled"],
                secret="whsec_" + base64.b64encode(b"k" * 32).decode(),
            )
        )
    real = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "rebinding.example":
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(addresses.socket, "getaddrinfo", resolve)
    world.sdk().fine_tuning.jobs.cancel(world.job())
    assert world.deliver() == 1
    [delivery] = world.deliveries("whep_rebinding")
    assert delivery["status"] == "pending" and receiver.received == []
    assert delivery["attempts"][0]["error"].startswith("refused: the host 'rebinding.example'")
    metrics = world.metrics()
    assert 'ftaas_webhook_attempts_total{outcome="refused"} 1.0' in metrics


def test_the_request_goes_to_the_checked_address_with_the_urls_host(
    world: World, receiver: Receiver
):
    """The connection is made to the address that was checked, not to whatever the name
    resolves to by then: here a name that resolves to nothing at all."""
    outcome = asyncio.run(
        world.sender._post(httpx.URL(receiver.url(host="pinned.invalid")), "127.0.0.1", {}, b"{}")
    )
    assert outcome.status_code == 200
    [(_, headers, _)] = receiver.received
    assert headers["host"] == f"pinned.invalid:{receiver.port}"


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "192.0.2.1", "::1", "::",
     "fe80::1", "fd00::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
     "2002:7f00:1::1", "64:ff9b::a9fe:a9fe", "2001:db8::1"],
)  # fmt: skip
def test_addresses_webhooks_may_not_reach(address: str):
    assert refused(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_reachable(address: str):
    assert not refused(ipaddress.ip_address(address))


def test_tenants_never_see_each_others_webhooks(world: World, receiver: Receiver):
    a = world.register(receiver.url("/a"))
    b = world.register(receiver.url("/b"), headers=ADMIN_B)
    listed = world.client.get("/v1/organization/webhooks", headers=ADMIN_B).json()["data"]
    assert [w["id"] for w in listed] == [b["id"]]
    for method, path in (
        ("get", f"/v1/organization/webhooks/{a['id']}"),
        ("get", f"/v1/organization/webhooks/{a['id']}/deliveries"),
        ("delete", f"/v1/organization/webhooks/{a['id']}"),
    ):
        assert getattr(world.client, method)(path, headers=ADMIN_B).status_code == 404
    world.sdk(MEMBER_A).fine_tuning.jobs.cancel(world.job(MEMBER_A))
    world.sdk(MEMBER_B).fine_tuning.jobs.cancel(world.job(MEMBER_B))
    assert world.deliver() == 2
    sent = {path: unwrap(a["secret"] if path == "/a" else b["secret"], r).data.id
            for r in receiver.received for path in [r[0]]}  # fmt: skip
    assert set(sent) == {"/a", "/b"} and sent["/a"] != sent["/b"]
    assert len(world.deliveries(a["id"])) == 1 and len(world.deliveries(b["id"], ADMIN_B)) == 1
    with world.parts["db"].session() as session:
        attempts = session.scalar(select(func.count()).select_from(WebhookAttemptRow))
    assert attempts == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_to_the_checked_address_verifies_the_urls_host(world: World, tmp_path: Path):
    """Over TLS the pinned connection still names and verifies the URL's host (SNI and the
    certificate's name), not the IP it connects to."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=pinned.test",
         "-addext", "subjectAltName=DNS:pinned.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    receiver = Receiver(server_tls)
    try:
        world.sender.tls = ssl.create_default_context(cafile=str(cert))
        url = f"https://pinned.test:{receiver.port}/hook"
        outcome = asyncio.run(world.sender._post(httpx.URL(url), "127.0.0.1", {}, b"{}"))
        assert outcome.status_code == 200
        assert receiver.received[0][1]["host"] == f"pinned.test:{receiver.port}"
        other = f"https://other.test:{receiver.port}/hook"  # the certificate does not name it
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|hostname"):
            asyncio.run(world.sender._post(httpx.URL(other), "127.0.0.1", {}, b"{}"))
    finally:
        receiver.close()


def test_the_senders_loop_delivers_as_the_app_runs_it(world: World, receiver: Receiver):
    endpoint = world.register(receiver.url())
    receiver.script = ["slow"]  # the first is slow to answer
    first, second = world.job(), world.job()
    world.sdk().fine_tuning.jobs.cancel(first)

    async def run_until_both_arrive() -> None:
        loop = asyncio.create_task(world.sender.run())
        await asyncio.sleep(0.3)  # the first is being sent, slowly
        await asyncio.to_thread(world.sdk().fine_tuning.jobs.cancel, second)
        for _ in range(100):
            if len(receiver.received) >= 2 and len(world.deliveries(endpoint["id"])) == 2:
                break
            await asyncio.sleep(0.1)
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop

    asyncio.run(run_until_both_arrive())
    jobs = [unwrap(endpoint["secret"], r).data.id for r in receiver.received[:2]]
    assert jobs == [first, second]
