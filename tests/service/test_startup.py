"""Start-up on a fresh machine: ftaas's own Ray token, and failures told in one line."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import Settings
from service.ray_cluster import (
    RayAuthError,
    embedded_token_path,
    ensure_embedded_token,
    ray_auth_env,
    ray_temp_dir,
)

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_token_is_made_once_and_private(tmp_path: Path):
    settings = Settings(home=tmp_path)
    path = ensure_embedded_token(settings)
    assert path == embedded_token_path(settings) and path.is_relative_to(tmp_path)
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_embedded_token(settings).read_text() == token  # reused, not remade
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no draft left


def test_embedded_head_uses_its_own_token_not_one_meant_for_another_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    env = ray_auth_env(Settings(home=tmp_path))
    assert env == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(embedded_token_path(Settings(home=tmp_path))),
    }


def test_a_cluster_address_without_a_token_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(home=tmp_path, ray_address="10.0.0.7:6379")
    with pytest.raises(RayAuthError) as raised:
        ray_auth_env(settings)
    message = str(raised.value)
    assert "\n" not in message
    assert "RAY_AUTH_TOKEN " in message and "RAY_AUTH_TOKEN_PATH" in message
    assert "10.0.0.7:6379" in message
    assert not embedded_token_path(settings).exists()  # nothing made for a foreign cluster

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RayAuthError, match="is not a file"):
        ray_auth_env(settings)


def test_a_cluster_token_is_taken_as_ray_documents_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(home=tmp_path, ray_address="10.0.0.7:6379")
    token_file = tmp_path / "token"
    token_file.write_text("t" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert ray_auth_env(settings)["RAY_AUTH_TOKEN_PATH"] == str(token_file)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert ray_auth_env(settings)["RAY_AUTH_TOKEN"] == "abc"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth_env(settings) == {"RAY_AUTH_MODE": "disabled"}


def test_ray_sessions_live_under_ftaas_home_unless_the_path_is_too_long_for_sockets():
    assert ray_temp_dir(Settings(home=Path("/srv/ftaas"))) == Path("/srv/ftaas/ray")
    long_home = Path("/home/someone/projects/fine-tuning/ftaas-state-for-team-x")
    fallback = ray_temp_dir(Settings(home=long_home))
    assert fallback.name.startswith("ftaas-ray-") and len(str(fallback)) <= 40
    assert fallback == ray_temp_dir(Settings(home=long_home))  # the same on every start
    assert fallback != ray_temp_dir(Settings(home=long_home / "other"))


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service serve` as a new user runs it (empty HOME), with a base model
    configuration that needs no build, so that it fails fast at the step under test."""
    models = tmp_path / "models.json"
    models.write_text(json.dumps([{"id": "m", "path": str(tmp_path / "weights")}]))
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FTAAS_"))}
    full_env = {
        **clean,
        "HOME": str(user_home),
        "FTAAS_HOME": str(tmp_path / "state"),
        "FTAAS_BASE_MODELS_FILE": str(models),
        **env,
    }
    command = [sys.executable, "-m", "service", "serve"]
    return subprocess.run(
        command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_a_taken_port_fails_in_one_line_before_ray_starts(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(tmp_path, FTAAS_PORT=str(port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"ftaas could not start: binding 127.0.0.1:{port} failed: Address already in use "
        f"(set PORT or FTAAS_PORT to use another) (log: {tmp_path / 'state/logs/server.log'})"
    )
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "state" / "ray.json").exists()


def test_a_cluster_without_token_fails_in_one_line_naming_the_variables(tmp_path: Path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    done = _serve(tmp_path, RAY_ADDRESS="127.0.0.1:1", FTAAS_PORT=str(free))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ftaas could not start: joining the Ray cluster at 127.0.0.1:1 failed")
    assert "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH" in last
    assert "Traceback" not in done.stderr + done.stdout
    log = (tmp_path / "state" / "logs" / "server.log").read_text()
    assert "Traceback" in log  # the whole story is in the log
    assert list((tmp_path / "user-home").iterdir()) == []


def test_two_base_models_one_engine_would_answer_for_are_refused_in_one_line(tmp_path: Path):
    """Review L11: `acme/m` and `acme-m` map to one Serve application, so one model's
    engine would silently answer for the other: the server refuses to start."""
    models = tmp_path / "two.json"
    weights = str(tmp_path / "weights")
    models.write_text(
        json.dumps([{"id": "acme/m", "path": weights}, {"id": "acme-m", "path": weights}])
    )
    done = _serve(tmp_path, FTAAS_BASE_MODELS_FILE=str(models), FTAAS_PORT="0")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ftaas could not start: reading the base models failed"), last
    assert "'acme/m' and 'acme-m' would share the serving application 'llm-acme-m'" in last
    assert "Traceback" not in done.stderr + done.stdout


def test_ports_chosen_together_are_all_different_and_free_of_the_systems_own():
    """Never one the kernel may give an outgoing connection (its ephemeral range) or a Ray
    worker (10002-19999) in the seconds before the component it was chosen for binds it;
    free on every interface, not only on loopback."""
    from service.ray_cluster import free_ports

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):  # one call at a time, the system may repeat a port; together, never
        ports = free_ports(7)
        assert len(set(ports)) == 7
        assert all(20000 <= port < low for port in ports), ports
    # Ports taken on another address than 127.0.0.1 (Ray's agent binds the node's).
    with contextlib.ExitStack() as stack:
        taken = set()
        for port in range(20000, 20000 + 300):
            sock = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):
                sock.bind(("127.0.0.2", port))
                taken.add(port)
        with socket.socket() as loopback:  # what checking 127.0.0.1 alone would see: free
            loopback.bind(("127.0.0.1", min(taken)))
        assert len(taken) > 250 and not taken & set(free_ports(300))
