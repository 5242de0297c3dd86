"""The console's files as the API serves them (the page itself is driven in a real browser
by tests/e2e/test_console.py)."""

from __future__ import annotations

import re

import pytest

from clients.console import ASSETS, PAGE


def test_the_console_page_and_its_files_are_served_under_a_strict_policy(client):
    page = client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, (_, media_type) in ASSETS.items():
        asset = client.get(f"/console/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"] == media_type
        assert asset.headers["content-security-policy"] == policy


@pytest.mark.parametrize("name", ["index.py", "..%2F__init__.py", "console.jsx", "%2e%2e"])
def test_only_the_consoles_own_files_are_served(client, name):
    answer = client.get(f"/console/{name}")
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_the_console_fetches_nothing_from_elsewhere():
    """No third-party asset: the only URLs in the page are this server's paths (and the
    SVG namespace, a name rather than a request)."""
    texts = [PAGE.read_text()] + [path.read_text() for path, _ in ASSETS.values()]
    for text in texts:
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert urls == set()
        assert not re.search(r"""(src|href)=["']//""", text)
    assert 'src="/console/console.js"' in texts[0] and 'href="/console/console.css"' in texts[0]


def test_the_console_puts_what_it_is_given_on_the_page_as_text():
    """Job names, events and answers come from users and models: never parsed as HTML."""
    script = ASSETS["console.js"][0].read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script and "new Function" not in script
