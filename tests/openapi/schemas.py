"""Answers checked against OpenAI's OpenAPI document (the vendored part of it,
tests/openapi/openai-openapi.json), as clients generated from it read them.

The document says OpenAPI 3.1 but still spells some schemas the 3.0 way (`nullable: true`,
a boolean `exclusiveMinimum`); they are read as 3.0 meant them. Discriminators and
`x-` annotations are descriptive only."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).resolve().parent / "openai-openapi.json"
BASE = "urn:openai-openapi"


def _as_2020(node: Any) -> Any:
    if isinstance(node, list):
        return [_as_2020(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _as_2020(value) for key, value in node.items()}
    if node.get("exclusiveMinimum") is True and "minimum" in node:
        node["exclusiveMinimum"] = node.pop("minimum")
    elif node.get("exclusiveMinimum") is False:
        del node["exclusiveMinimum"]
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _registry() -> Registry:
    document = _as_2020(json.loads(DOCUMENT.read_text()))
    return Registry().with_resource(BASE, Resource(contents=document, specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def operation_schema(method: str, path: str, status: str = "200") -> dict[str, Any]:
    """The schema of an operation's JSON answer (`path` as the document spells it)."""
    where = _pointer("paths", path, method, "responses", status, "content", "application/json")
    return {"$ref": f"{BASE}#/{where}/schema"}


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"{BASE}#/components/schemas/{name}"}


def problems(schema: dict[str, Any], answer: Any) -> list[str]:
    """Where `answer` breaks `schema`: one line per problem (none: it validates)."""
    validator = Draft202012Validator(schema, registry=_registry())
    found = []
    for error in validator.iter_errors(answer):
        # The deepest, most specific reasons of an anyOf/oneOf that failed as a whole.
        leaves = [e for e in error.context or []] or [error]
        best = min(leaves, key=lambda e: len(list(e.relative_path)) * -1)
        where = "/".join(str(p) for p in best.absolute_path) or "(the answer)"
        found.append(f"{where}: {best.message[:200]}")
    return found
