"""What the command prints: rich on a terminal, plain lines anywhere else.

Plain means what a script or a CI log can take: no escape codes, no carriage returns, one
record per line, the command's result (an id, a model name) on the last line. Errors go to
stderr as `error: …`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


class Output:
    """stdout, as a terminal (rich) or as plain lines."""

    def __init__(self, terminal: bool | None = None) -> None:
        self.terminal = stdout_is_terminal() if terminal is None else terminal
        self.console = Console(highlight=False, soft_wrap=True) if self.terminal else None

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.console is not None:
            self.console.print(text, style=style, markup=False)
        else:
            click.echo(text)

    def result(self, text: str) -> None:
        """The command's answer (an id, a model name): always the last line, unstyled."""
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)
        else:
            click.echo(text)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A rich table on a terminal; tab-separated lines, a header first, in a pipe."""
        cells = [[cell_text(cell) for cell in row] for row in rows]
        if self.console is not None:
            table = Table(*columns, show_edge=False, box=None, pad_edge=False)
            for row in cells:
                table.add_row(*(Text(cell) for cell in row))
            self.console.print(table)
        else:
            click.echo("\t".join(columns))
            for row in cells:
                click.echo("\t".join(row))

    def json(self, value: Any) -> None:
        text = json.dumps(value, indent=2, ensure_ascii=False)
        if self.console is not None:
            self.console.print_json(text)
        else:
            click.echo(text)


def cell_text(value: Any) -> str:
    if value is None:
        return "-"
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def when(moment: int | float | None) -> str:
    """A Unix time as UTC, to the minute: `2026-12-05 07:26`."""
    if not moment:
        return "-"
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M")


def duration(seconds: float | None) -> str:
    """`0:01:05`; `-` when unknown."""
    if seconds is None:
        return "-"
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "-"
    value = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n_bytes} B"


def warn(text: str) -> None:
    """A note on stderr (styled only when stderr is a terminal)."""
    click.secho(text, err=True, fg="yellow")
