"""Managed API keys and an organization's own secrets, over SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.__main__ import main as service_main
from service.config import Settings
from service.db import ApiKeyRow
from service.organization.keys import KeyRing
from tests.conftest import memorisation_jsonl
from tests.service.conftest import api_client

ADMIN_A = {"Authorization": "Bearer admin-key-of-org-a-0123456789"}
ADMIN_B = {"Authorization": "Bearer admin-key-of-org-b-0123456789"}


def keyed_client(settings: Settings, parts: dict, **more: str) -> TestClient:
    keyed = Settings(
        home=settings.home,
        database_url=settings.database_url,
        serving_enabled=False,
        admin_keys=f"{ADMIN_A['Authorization'][7:]}:org-a,{ADMIN_B['Authorization'][7:]}:org-b",
        **more,
    )
    return api_client(keyed, parts)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def every_stored_value(parts: dict, table: str) -> str:
    with parts["db"].engine.connect() as connection:
        return json.dumps(
            [list(map(str, row)) for row in connection.execute(text(f"SELECT * FROM {table}"))]
        )


def test_a_key_lives_is_used_and_dies(settings: Settings, parts: dict):
    client = keyed_client(settings, parts)
    created = client.post("/v1/organization/api_keys", json={"name": "ci"}, headers=ADMIN_A)
    assert created.status_code == 200, created.text
    key = created.json()
    assert key["object"] == "organization.api_key"
    assert key["owner"] == {"type": "organization", "id": "org-a"}
    assert key["value"].startswith("sk-ftaas-") and len(key["value"]) > 40
    assert key["redacted_value"] != key["value"] and key["value"][-4:] in key["redacted_value"]

    # Shown once: no listing or lookup shows it, and the database holds only its hash.
    listed = client.get("/v1/organization/api_keys", headers=ADMIN_A).json()
    assert key["id"] in [k["id"] for k in listed["data"]]
    assert key["value"] not in json.dumps(listed)
    assert (
        "value" not in client.get(f"/v1/organization/api_keys/{key['id']}", headers=ADMIN_A).json()
    )
    assert key["value"] not in every_stored_value(parts, "api_keys")

    # It works, as its organization.
    uploaded = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", memorisation_jsonl())},
        data={"purpose": "fine-tune"},
        headers=bearer(key["value"]),
    )
    assert uploaded.status_code == 200
    assert (
        client.get(f"/v1/files/{uploaded.json()['id']}", headers=bearer(key["value"])).status_code
        == 200
    )
    used = client.get(f"/v1/organization/api_keys/{key['id']}", headers=ADMIN_A).json()
    assert used["last_used_at"] is not None

    # Revoked: the very next request fails.
    gone = client.delete(f"/v1/organization/api_keys/{key['id']}", headers=ADMIN_A)
    assert gone.json() == {
        "object": "organization.api_key.deleted",
        "id": key["id"],
        "deleted": True,
    }
    refused = client.get("/v1/files", headers=bearer(key["value"]))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert client.get(f"/v1/organization/api_keys/{key['id']}", headers=ADMIN_A).status_code == 404


def test_admin_and_member_keys_each_do_their_own_work(settings: Settings, parts: dict):
    client = keyed_client(settings, parts)
    member = client.post("/v1/organization/api_keys", json={"name": "m"}, headers=ADMIN_A).json()
    admin = client.post(
        "/v1/organization/api_keys", json={"name": "second admin", "role": "admin"}, headers=ADMIN_A
    ).json()
    assert admin["value"].startswith("sk-ftaas-admin-")

    as_member = client.get("/v1/organization/api_keys", headers=bearer(member["value"]))
    assert as_member.status_code == 403
    assert as_member.json()["error"]["code"] == "insufficient_permissions"
    assert client.get("/v1/files", headers=ADMIN_A).status_code == 403
    assert (
        client.get("/v1/organization/api_keys", headers=bearer(admin["value"])).status_code == 200
    )
    assert client.get("/v1/organization/api_keys").status_code == 401
    bad = client.post(
        "/v1/organization/api_keys", json={"name": "x", "role": "owner"}, headers=ADMIN_A
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"


def test_an_admin_manages_only_its_own_organization(settings: Settings, parts: dict):
    client = keyed_client(settings, parts)
    of_a = client.post("/v1/organization/api_keys", json={"name": "a"}, headers=ADMIN_A).json()
    assert of_a["id"] not in json.dumps(
        client.get("/v1/organization/api_keys", headers=ADMIN_B).json()
    )
    assert client.get(f"/v1/organization/api_keys/{of_a['id']}", headers=ADMIN_B).status_code == 404
    assert (
        client.delete(f"/v1/organization/api_keys/{of_a['id']}", headers=ADMIN_B).status_code == 404
    )
    assert client.get("/v1/files", headers=bearer(of_a["value"])).status_code == 200  # still alive


def test_environment_keys_are_a_bootstrap(settings: Settings, parts: dict):
    keys = KeyRing(parts["db"])
    keys.bootstrap({"env-key-one": "org-a", "env-key-two": "org-b"}, {})
    assert keys.authenticate("env-key-one").organization == "org-a"  # type: ignore[union-attr]
    assert "env-key-one" not in every_stored_value(parts, "api_keys")

    keys.bootstrap({"env-key-two": "org-c"}, {})  # one removed from the variable, one moved
    assert keys.authenticate("env-key-one") is None
    assert keys.authenticate("env-key-two").organization == "org-c"  # type: ignore[union-attr]

    two = next(k for k in keys.list("org-c"))
    keys.revoke("org-c", two.id)  # revoked by an admin: the variable does not bring it back
    keys.bootstrap({"env-key-two": "org-c"}, {})
    assert keys.authenticate("env-key-two") is None

    keys.bootstrap({}, {})  # the variable unset: its active keys go, the revoked one stays
    keys.bootstrap({"env-key-two": "org-c"}, {})
    assert keys.authenticate("env-key-two") is None

    fresh = KeyRing(parts["db"])
    with parts["db"].session() as session:  # a developer's machine that only ever had one
        session.query(ApiKeyRow).delete()
    fresh.bootstrap({"dev-key": "local"}, {})
    fresh.bootstrap({}, {})  # unset again: open access, as before keys were managed
    assert fresh.open_access()


def test_open_access_ends_with_the_first_key(settings: Settings, parts: dict):
    client = api_client(settings, parts)
    assert client.get("/v1/files").status_code == 200  # no key anywhere: open access
    made = client.post("/v1/organization/api_keys", json={"name": "first", "role": "admin"})
    assert made.status_code == 200 and made.json()["owner"]["id"] == "local"
    assert client.get("/v1/files").status_code == 401
    admin = bearer(made.json()["value"])
    assert client.get("/v1/organization/api_keys", headers=admin).status_code == 200


def test_the_operator_command_makes_lists_and_revokes_keys(
    settings: Settings, parts: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("FTAAS_HOME", str(settings.home))
    if settings.database_url:
        monkeypatch.setenv("FTAAS_DATABASE_URL", settings.database_url)
    client = api_client(settings, parts)

    assert service_main(["keys", "create", "--organization", "acme", "--name", "deploy"]) == 0
    out = capsys.readouterr()
    value = out.out.strip()
    assert value.startswith("sk-ftaas-") and "shown only now" in out.err
    key_id = out.err.split(":")[0]
    assert client.get("/v1/files", headers=bearer(value)).status_code == 200  # a running server

    assert service_main(["keys", "list", "--organization", "acme"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and value not in listing and "active" in listing

    assert service_main(["keys", "revoke", key_id]) == 0
    capsys.readouterr()
    assert client.get("/v1/files", headers=bearer(value)).status_code == 401
    assert service_main(["keys", "revoke", key_id]) == 1
    assert service_main(["keys", "create", "--organization", "no/slashes"]) == 2


def test_a_wandb_key_is_the_organizations_own_and_reaches_only_its_trainer(
    settings: Settings, parts: dict, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("WANDB_API_KEY", "the-operators-own-key-never-used")
    client = keyed_client(settings, parts)
    secret = "0123456789abcdef0123456789abcdef01234567"
    put = client.put(
        "/v1/organization/integrations/wandb",
        json={"api_key": secret, "base_url": "https://wandb.example.com"},
        headers=ADMIN_A,
    )
    assert put.status_code == 200 and secret not in put.text
    shown = client.get("/v1/organization/integrations/wandb", headers=ADMIN_A).json()
    assert shown["type"] == "wandb" and secret not in json.dumps(shown)
    assert client.get("/v1/organization/integrations/wandb", headers=ADMIN_B).status_code == 404

    member_a = client.post("/v1/organization/api_keys", json={"name": "a"}, headers=ADMIN_A).json()
    member_b = client.post("/v1/organization/api_keys", json={"name": "b"}, headers=ADMIN_B).json()
    jobs = {}
    for org, member in (("org-a", member_a), ("org-b", member_b)):
        file = client.post(
            "/v1/files",
            files={"file": ("t.jsonl", memorisation_jsonl())},
            data={"purpose": "fine-tune"},
            headers=bearer(member["value"]),
        ).json()
        jobs[org] = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "ftaas-tiny",
                "training_file": file["id"],
                "integrations": [{"type": "wandb", "wandb": {"project": "p"}}],
            },
            headers=bearer(member["value"]),
        ).json()["id"]
    parts["reconciler"].settings.max_running_jobs = 2
    for _ in range(3):
        parts["reconciler"].tick()

    store, launcher = parts["blobs"], parts["launcher"]
    from service.housekeeping import Housekeeping
    from training.spec import TrainingSpec, spec_key, wandb_secret_key

    for org, job_id in jobs.items():
        assert launcher.envs[job_id] == {}  # nothing rides in the Ray job's runtime_env
        spec_json = store.get_bytes(spec_key(f"jobs/{job_id}/attempt-1")).decode()
        assert secret not in spec_json and "the-operators-own-key" not in spec_json
        spec = TrainingSpec.model_validate_json(spec_json)
        if org == "org-a":
            assert spec.wandb_secret is not None
            handed = json.loads(store.get_bytes(spec.wandb_secret))
            assert handed == {"api_key": secret, "base_url": "https://wandb.example.com/"}
        else:  # org B registered nothing: org A's key (or the operator's) is not used
            assert spec.wandb_secret is None
    events = client.get(
        f"/v1/fine_tuning/jobs/{jobs['org-a']}/events", headers=bearer(member_a["value"])
    )
    assert secret not in events.text

    # Once the trainer is gone without deleting its copy (killed, or never started), the
    # housekeeping sweep removes it.
    client.post(f"/v1/fine_tuning/jobs/{jobs['org-a']}/cancel", headers=bearer(member_a["value"]))
    parts["reconciler"].tick()
    assert store.exists(wandb_secret_key(f"jobs/{jobs['org-a']}/attempt-1"))
    assert Housekeeping(parts["db"], parts["blobs"]).sweep().removed_secrets == 1
    assert not store.exists(wandb_secret_key(f"jobs/{jobs['org-a']}/attempt-1"))
    # A next attempt's copy, handed over before its intent lost to a cancel (the job's
    # attempts still 1), goes too.
    lost = wandb_secret_key(f"jobs/{jobs['org-a']}/attempt-2")
    store.put_bytes(lost, json.dumps({"api_key": secret}).encode())
    assert Housekeeping(parts["db"], parts["blobs"]).sweep().removed_secrets == 1
    assert not store.exists(lost)

    plain = client.put(
        "/v1/organization/integrations/wandb",
        json={"api_key": secret, "base_url": "http://10.0.0.5"},
        headers=ADMIN_A,
    )
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "base_url"
    assert client.delete("/v1/organization/integrations/wandb", headers=ADMIN_A).status_code == 200
    assert client.get("/v1/organization/integrations/wandb", headers=ADMIN_A).status_code == 404


def test_a_keyed_database_holds_no_key_in_plain_text(tmp_path: Path, parts: dict):
    keyed_client(Settings(home=tmp_path, serving_enabled=False), parts)
    stored = every_stored_value(parts, "api_keys")
    assert "admin-key-of-org-a" not in stored and "admin-key-of-org-b" not in stored
