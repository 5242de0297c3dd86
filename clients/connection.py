"""The `openai` client the command talks through, configured as the SDK configures itself.

`OPENAI_BASE_URL` and `OPENAI_API_KEY` are read as the SDK reads them (`--base-url` and
`--api-key` win); with neither, the command talks to a local server on ftaas's default
port. A server in open access (no key registered, loopback) takes any key, but the SDK
refuses to start without one, so a placeholder is sent, as the README's walk-through does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from openai import OpenAI

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# Any value does on an open server; a server with keys answers 401 to it, which says so.
OPEN_ACCESS_KEY = "ftaas-open-access"


def with_api_path(base_url: str) -> str:
    """`http://host:8000` → `http://host:8000/v1`: the SDK's paths are relative to /v1."""
    parts = urlsplit(base_url.rstrip("/"))
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1")
    return urlunsplit(parts)


@dataclass(frozen=True)
class Connection:
    base_url: str | None = None
    api_key: str | None = None
    max_retries: int = 2
    timeout: float = 600.0

    def client(self) -> OpenAI:
        base_url = self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        api_key = self.api_key or os.environ.get("OPENAI_API_KEY") or OPEN_ACCESS_KEY
        return OpenAI(
            base_url=with_api_path(base_url),
            api_key=api_key,
            max_retries=self.max_retries,
            timeout=self.timeout,
        )
