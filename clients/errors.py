"""Failures as the user reads them: one `error: …` line on stderr and a non-zero exit, never
a traceback. An API error shows OpenAI's envelope (message, param, code)."""

from __future__ import annotations

from typing import IO, Any

import click
import openai
from pydantic import ValidationError

# Exit statuses: 0 done, 1 the API refused or the job failed, 2 a usage error (click's),
# 3 the job was cancelled, 130 interrupted.
FAILED = 1
CANCELLED = 3
INTERRUPTED = 130


class CommandFailed(click.ClickException):
    exit_code = FAILED

    def show(self, file: IO[Any] | None = None) -> None:
        click.secho(f"error: {self.format_message()}", err=True, fg="red")


class JobCancelled(CommandFailed):
    exit_code = CANCELLED


class Interrupted(CommandFailed):
    exit_code = INTERRUPTED


def error_details(message: str, param: str | None = None, code: str | None = None) -> str:
    """`message (param: x, code: y)`, the parts that are set."""
    extra = [f"param: {param}" if param else "", f"code: {code}" if code else ""]
    shown = ", ".join(part for part in extra if part)
    return f"{message} ({shown})" if shown else message


def api_failure(error: openai.APIError, base_url: str) -> CommandFailed:
    """The SDK's exception as one line: the server's message, its param and code."""
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return CommandFailed(f"cannot reach the ftaas server at {base_url}: {cause}")
    body = error.body if isinstance(error.body, dict) else {}
    message = body.get("message") or error.message
    status = f"HTTP {error.status_code}: " if isinstance(error, openai.APIStatusError) else ""
    return CommandFailed(status + error_details(str(message), body.get("param"), body.get("code")))


def usage_error(error: ValidationError) -> click.UsageError:
    """A request the API's own model refused, its fields named as the flags that set them."""
    problems = "; ".join(
        f"--{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}"
        if problem["loc"]
        else problem["msg"]
        for problem in error.errors()
    )
    return click.UsageError(problems)
