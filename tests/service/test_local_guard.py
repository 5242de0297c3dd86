"""Open access stays on the developer's machine: the app itself refuses other clients,
other Host names (DNS rebinding) and other origins (a web page's forms and fetches), and
JSON endpoints refuse bodies that are not JSON."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client
from tests.service.test_api import assert_envelope

EVIL = "http://evil.example"


def _requests(client: TestClient, headers: dict[str, str]) -> list:
    """What a page could try: read files, upload one, start a job, chat."""
    return [
        client.get("/v1/files", headers=headers),
        client.post(
            "/v1/files",
            files={"file": ("t.jsonl", memorisation_jsonl())},
            data={"purpose": "fine-tune"},
            headers=headers,
        ),
        client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "ftaas-tiny", "training_file": "file-x"},
            headers=headers,
        ),
        client.post(
            "/v1/chat/completions",
            json={"model": "ftaas-tiny", "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        ),
    ]


def test_a_rebound_host_name_is_refused(client):
    for response in _requests(client, {"host": "evil.example:8000"}):
        error = assert_envelope(response, 403)
        assert "evil.example" in error["message"]
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/v1/files", headers={"host": host}).status_code == 200


def test_a_web_page_of_another_origin_is_refused(client):
    for response in _requests(client, {"origin": EVIL}):
        assert_envelope(response, 403)
    assert client.get("/v1/files", headers={"origin": "http://localhost:3000"}).status_code == 200


def test_open_access_serves_only_this_machine_however_the_app_was_started(tmp_path, parts):
    settings = Settings(home=tmp_path, serving_enabled=False, host="0.0.0.0")
    app = api_client(settings, parts).app
    remote = TestClient(app, base_url="http://127.0.0.1", client=("192.0.2.7", 40000))
    error = assert_envelope(remote.get("/v1/files"), 403)
    assert "FTAAS_API_KEYS" in error["message"]
    assert remote.get("/health").status_code == 200  # probes still see it


def test_open_access_is_never_served_through_a_proxy(client):
    """A reverse proxy on this machine (nginx's defaults: a loopback Host, no
    X-Forwarded-For) makes a remote client look local; whatever it adds gives it away."""
    proxied = (
        {"forwarded": "for=192.0.2.7;proto=https"},
        {"x-forwarded-for": "192.0.2.7"},
        {"x-forwarded-host": "api.example.com"},
        {"x-real-ip": "192.0.2.7"},
        {"via": "1.1 nginx"},
    )
    for headers in proxied:
        for response in _requests(client, headers):
            error = assert_envelope(response, 403)
            assert "FTAAS_API_KEYS" in error["message"]
    assert client.get("/v1/files").status_code == 200


def test_with_api_keys_other_hosts_and_clients_are_served(tmp_path, parts):
    settings = Settings(home=tmp_path, serving_enabled=False, api_keys="key-a:org-a")
    app = api_client(settings, parts).app
    remote = TestClient(app, base_url="http://api.example.com", client=("192.0.2.7", 1))
    key = {"Authorization": "Bearer key-a"}
    assert remote.get("/v1/files", headers=key).status_code == 200
    assert remote.get("/v1/files", headers={**key, "origin": EVIL}).status_code == 200
    assert remote.get("/v1/files", headers={**key, "via": "1.1 nginx"}).status_code == 200
    # An operator's allow-list holds in every mode.
    listed = Settings(
        home=tmp_path, serving_enabled=False, api_keys="key-a:org-a",
        allowed_hosts="api.example.com",
    )  # fmt: skip
    guarded = TestClient(create_app(listed), base_url="http://other.example", client=("1.2.3.4", 1))
    assert_envelope(guarded.get("/v1/files", headers=key), 403)


def test_chat_refuses_a_body_that_is_not_sent_as_json(client):
    body = '{"model": "ftaas-tiny", "messages": [{"role": "user", "content": "hi"}]}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        for path in ("/v1/chat/completions", "/v1/completions"):
            response = client.post(path, content=body, headers=headers)
            error = assert_envelope(response, 400)
            assert "application/json" in error["message"]
