"""`ftaas chat MODEL [-m TEXT]` and `ftaas compare BASE TUNED -m TEXT`."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
from openai import OpenAI, Stream
from openai.types.chat import ChatCompletionChunk
from rich.table import Table
from rich.text import Text

from clients.context import CommandContext, pass_context

EXIT_WORDS = ("/exit", "/quit")


def sampling_options(command: Any) -> Any:
    for option in reversed(
        [
            click.option("--system", help="a system message first"),
            click.option("--temperature", type=click.FloatRange(0, 2), help="0 for greedy"),
            click.option("--max-tokens", type=click.IntRange(1), help="longest answer"),
        ]
    ):
        command = option(command)
    return command


def _settings(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    chosen = {"temperature": temperature, "max_tokens": max_tokens}
    return {key: value for key, value in chosen.items() if value is not None}


def _opening(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def answer(client: OpenAI, model: str, messages: list[dict[str, str]], **settings: Any) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, **settings)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def _prompt(terminal_in: bool) -> str | None:
    """The next line the user typed, or None at the end (EOF); the prompt on stderr, so
    that stdout holds the answers alone."""
    if terminal_in:
        click.secho("> ", err=True, nl=False, fg="cyan", bold=True)
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


@click.command("chat")
@click.argument("model")
@click.option("-m", "--message", help="ask this once and print the answer")
@sampling_options
@pass_context
def chat_command(
    ctx: CommandContext,
    model: str,
    message: str | None,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> None:
    """Chat with a model: one answer with -m; otherwise a conversation read from stdin,
    each answer streamed as it comes (/exit or end of input ends it)."""
    settings = _settings(temperature, max_tokens)
    history = _opening(system)
    if message is not None:
        history.append({"role": "user", "content": message})
        ctx.output.result(answer(ctx.client, model, history, **settings))
        return
    terminal_in = sys.stdin.isatty()
    while (line := _prompt(terminal_in)) is not None:
        if line.strip() in EXIT_WORDS:
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        stream: Stream[ChatCompletionChunk] = ctx.client.chat.completions.create(
            model=model,
            messages=history,  # type: ignore[arg-type]
            stream=True,
            **settings,
        )  # type: ignore[assignment]
        parts: list[str] = []
        for chunk in stream:
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                parts.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(parts)})


@click.command("compare")
@click.argument("base")
@click.argument("tuned")
@click.option("-m", "--message", required=True, help="the question both models answer")
@sampling_options
@pass_context
def compare_command(
    ctx: CommandContext,
    base: str,
    tuned: str,
    message: str,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> None:
    """Ask two models the same question; their answers side by side."""
    settings = _settings(temperature, max_tokens)
    messages = [*_opening(system), {"role": "user", "content": message}]
    with ThreadPoolExecutor(max_workers=2) as pool:
        asked = [pool.submit(answer, ctx.client, m, messages, **settings) for m in (base, tuned)]
        answers = [future.result() for future in asked]
    console = ctx.output.console
    if console is not None:
        table = Table(title=Text(message), show_lines=True, expand=True)
        table.add_column(Text(f"base: {base}"), ratio=1)
        table.add_column(Text(f"tuned: {tuned}"), ratio=1)
        table.add_row(*(Text(text) for text in answers))
        console.print(table)
        return
    blocks = (("base", base, answers[0]), ("tuned", tuned, answers[1]))
    for number, (label, model, text) in enumerate(blocks):
        if number:
            ctx.output.line()
        ctx.output.line(f"[{label}] {model}")
        ctx.output.line(text)
