"""What every command gets: where the server is, and how to print."""

from __future__ import annotations

from dataclasses import dataclass, field

import click
from openai import OpenAI

from clients.connection import Connection
from clients.output import Output


@dataclass
class CommandContext:
    connection: Connection
    output: Output
    _client: OpenAI | None = field(default=None, repr=False)

    @property
    def client(self) -> OpenAI:
        if self._client is None:
            self._client = self.connection.client()
        return self._client


pass_context = click.make_pass_decorator(CommandContext)
