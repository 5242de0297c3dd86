"""/console: the web console's page and its two files (clients/console/), served to anyone
(they hold no data; every call the page makes is an API call with the user's key).

A strict Content-Security-Policy keeps the page to this server: its own script and style
only, requests only to this origin, no frames.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from clients.console import ASSETS, PAGE
from service.errors import NotFound

CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/console")
def console_page() -> Response:
    return Response(
        PAGE.read_bytes(), media_type="text/html; charset=utf-8", headers=CONSOLE_HEADERS
    )


@router.get("/console/{name}")
def console_asset(name: str) -> Response:
    asset = ASSETS.get(name)  # a name from the page, looked up: no path is built from it
    if asset is None:
        raise NotFound(f"No console file named '{name[:64]}'.")
    path, media_type = asset
    return Response(path.read_bytes(), media_type=media_type, headers=CONSOLE_HEADERS)
