"""Refresh tests/openapi/openai-openapi.json: the part of OpenAI's OpenAPI document
(github.com/openai/openai-openapi, MIT, see LICENSE-openai-openapi) that describes the
routes ftaas serves, with every schema they reference.

    python tests/openapi/refresh.py [COMMIT | path/to/openapi.json]

With a commit (default: the one vendored now) the document is downloaded from GitHub.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENDORED = HERE / "openai-openapi.json"
URL = "https://raw.githubusercontent.com/openai/openai-openapi/{commit}/openapi.json"
# The routes ftaas serves under /v1 (its own extensions have no schema there).
PATHS = (
    "/files", "/files/{file_id}", "/files/{file_id}/content",
    "/uploads", "/uploads/{upload_id}/parts", "/uploads/{upload_id}/complete",
    "/uploads/{upload_id}/cancel",
    "/fine_tuning/jobs", "/fine_tuning/jobs/{fine_tuning_job_id}",
    "/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
    "/fine_tuning/jobs/{fine_tuning_job_id}/pause",
    "/fine_tuning/jobs/{fine_tuning_job_id}/resume",
    "/fine_tuning/jobs/{fine_tuning_job_id}/events",
    "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    "/models", "/models/{model}", "/chat/completions", "/completions",
)  # fmt: skip
# Schemas the routes' operations do not name but their answers carry.
EXTRA_SCHEMAS = ("ErrorResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse")


def _refs(node: Any) -> set[tuple[str, str]]:
    """(kind, name) of every `#/components/<kind>/<name>` reference in `node`."""
    if isinstance(node, dict):
        found = set()
        if isinstance(node.get("$ref"), str):
            _, _, kind, name = node["$ref"].split("/", 3)
            found.add((kind, name))
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def subset(document: dict[str, Any], commit: str) -> dict[str, Any]:
    paths = {path: document["paths"][path] for path in PATHS}
    components = document["components"]
    wanted: set[tuple[str, str]] = set()
    todo = _refs(paths) | {("schemas", name) for name in EXTRA_SCHEMAS}
    while todo:
        ref = todo.pop()
        if ref not in wanted:
            wanted.add(ref)
            todo |= _refs(components[ref[0]][ref[1]])
    kept: dict[str, dict[str, Any]] = {}
    for kind, name in sorted(wanted):
        kept.setdefault(kind, {})[name] = components[kind][name]
    return {
        "openapi": document["openapi"],
        "info": {**document["info"], "x-ftaas-source": f"openai/openai-openapi@{commit}"},
        "paths": paths,
        "components": kept,
    }


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else None
    current = json.loads(VENDORED.read_text())["info"]["x-ftaas-source"].split("@")[1]
    if source and Path(source).exists():
        document, commit = json.loads(Path(source).read_text()), current
    else:
        commit = source or current
        with urllib.request.urlopen(URL.format(commit=commit), timeout=60) as response:
            document = json.loads(response.read())
    kept = subset(document, commit)
    VENDORED.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    print(f"{VENDORED}: {len(kept['components']['schemas'])} schemas")


if __name__ == "__main__":
    main()
