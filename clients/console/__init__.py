"""The web console: one page (HTML, a script, a style sheet) that the API serves at
/console (service/console.py) and that talks to the API like any other client, with the
API key the user signs in with, kept in the browser's session storage only.

No build step and no third-party assets: the page is plain ES2020 and draws its own curves
as SVG, so it works offline and under a strict Content-Security-Policy.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent

# Every file the console is made of, by the name the page asks for, and its media type.
# The server serves these and nothing else (no path is built from a request).
ASSETS: dict[str, tuple[Path, str]] = {
    "console.js": (HERE / "console.js", "text/javascript; charset=utf-8"),
    "console.css": (HERE / "console.css", "text/css; charset=utf-8"),
}
PAGE = HERE / "index.html"
