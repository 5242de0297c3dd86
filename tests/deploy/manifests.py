"""deploy/'s Kubernetes manifests, as the tests read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = (KUBERAY / "ftaas.yaml", KUBERAY / "secrets.example.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str, name: str, path: Path = MANIFESTS[0]) -> dict[str, Any]:
    for doc in documents(path):
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise LookupError(f"{path.name} has no {kind} {name}")


def ray_service() -> dict[str, Any]:
    return resource("RayService", "ftaas")


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(ray_service()["spec"]["serveConfigV2"])
