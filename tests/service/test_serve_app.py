"""The API as a Serve application (deploy/kuberay): what it refuses before it starts.
tests/e2e/test_rayservice.py runs it for real."""

from __future__ import annotations

import pytest

from service.serve_app import build_api


def test_a_cluster_api_without_keys_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.delenv("FTAAS_API_KEYS", raising=False)
    monkeypatch.setenv("FTAAS_HOME", str(tmp_path))
    monkeypatch.setenv("FTAAS_RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(RuntimeError, match="FTAAS_API_KEYS"):
        build_api()


def test_with_keys_it_builds_the_same_app_as_make_serve(monkeypatch, tmp_path):
    monkeypatch.setenv("FTAAS_API_KEYS", "k:org-a")
    monkeypatch.setenv("FTAAS_HOME", str(tmp_path))
    monkeypatch.setenv("FTAAS_RAY_ADDRESS", "127.0.0.1:6379")
    paths = {route.path for route in build_api().routes}  # type: ignore[attr-defined]
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/v1/chat/completions", "/health"} <= paths
