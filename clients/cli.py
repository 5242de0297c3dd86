"""`ftaas`: upload, create and follow fine-tuning jobs, chat with the tuned models.

Built on the official `openai` SDK (OPENAI_BASE_URL, OPENAI_API_KEY) and the service's own
schemas (the method table, the hyperparameter models, the request models). On a terminal it
uses rich; in a pipe it prints plain lines. API errors are one `error: …` line on stderr.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import openai

from clients.chat import chat_command, compare_command
from clients.connection import DEFAULT_BASE_URL, Connection
from clients.context import CommandContext
from clients.errors import INTERRUPTED, api_failure
from clients.files import files_group
from clients.jobs import jobs_group
from clients.keys import keys_group
from clients.models import models_group
from clients.output import Output


class Commands(click.Group):
    """The root group: turns the SDK's exceptions into `error: …` and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except openai.APIError as error:
            command = ctx.find_object(CommandContext)
            base_url = str(command.client.base_url) if command is not None else "?"
            raise api_failure(error, base_url) from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(INTERRUPTED)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--base-url",
    envvar="OPENAI_BASE_URL",
    show_envvar=True,
    help=f"the server's API root [default: {DEFAULT_BASE_URL}]",
)
@click.option(
    "--api-key",
    envvar="OPENAI_API_KEY",
    show_envvar=True,
    help="your key (a server in open access takes none)",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="the SDK's retries of a failed request",
)
@click.version_option(package_name="ftaas")
@click.pass_context
def cli(ctx: click.Context, base_url: str | None, api_key: str | None, max_retries: int) -> None:
    """Fine-tune models on an ftaas server and talk to them."""
    ctx.obj = CommandContext(Connection(base_url, api_key, max_retries), Output())


for command in (jobs_group, files_group, models_group, keys_group, chat_command, compare_command):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="ftaas")


if __name__ == "__main__":
    main()
