"""`ftaas files upload|list|get|delete`, and the upload `jobs create` and `models import`
make of a local path."""

from __future__ import annotations

from pathlib import Path

import click
from openai.types import FileObject

from clients.context import CommandContext, pass_context
from clients.errors import CommandFailed
from clients.output import size, when

FILE_PURPOSES = ("fine-tune", "user_data", "batch", "assistants", "vision", "evals")


def upload(ctx: CommandContext, path: Path, purpose: str) -> FileObject:
    """Uploads `path` and says whether the server validated it; a file the server stored
    with `status: "error"` is a failure naming the line, as its status_details do."""
    output = ctx.output
    with path.open("rb") as stream:
        if output.console is not None:
            with output.console.status(f"Uploading {path.name} ({size(path.stat().st_size)})"):
                uploaded = ctx.client.files.create(file=(path.name, stream), purpose=purpose)  # type: ignore[arg-type]
        else:
            uploaded = ctx.client.files.create(file=(path.name, stream), purpose=purpose)  # type: ignore[arg-type]
    if uploaded.status not in ("processed", "error"):
        uploaded = ctx.client.files.wait_for_processing(uploaded.id, poll_interval=1.0)
    if uploaded.status == "error":
        raise CommandFailed(
            f"{path.name} was uploaded as {uploaded.id} but did not validate: "
            f"{uploaded.status_details or 'no details given'}"
        )
    output.line(
        f"Uploaded {path.name} as {uploaded.id} ({size(uploaded.bytes)}): {uploaded.status}"
    )
    return uploaded


def file_id(ctx: CommandContext, value: str, purpose: str = "fine-tune") -> str:
    """A local path is uploaded first; anything else is taken for a file id."""
    path = Path(value).expanduser()
    if path.is_file():
        return upload(ctx, path, purpose).id
    if value.startswith("file-"):
        return value
    raise click.BadParameter(f"no such file: {value} (nor a file id, which starts with file-)")


@click.group("files")
def files_group() -> None:
    """Upload, list and delete files."""


@files_group.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--purpose", type=click.Choice(FILE_PURPOSES), default="fine-tune", show_default=True)
@pass_context
def upload_command(ctx: CommandContext, path: Path, purpose: str) -> None:
    """Upload a file; prints its id last."""
    ctx.output.result(upload(ctx, path, purpose).id)


@files_group.command("list")
@click.option("--purpose", default=None, help="only files of this purpose")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="the API's objects, as JSON")
@pass_context
def list_command(ctx: CommandContext, purpose: str | None, limit: int, as_json: bool) -> None:
    """List files, newest first."""
    options = {"purpose": purpose} if purpose else {}
    found: list[FileObject] = []
    for item in ctx.client.files.list(limit=min(limit, 100), **options):  # type: ignore[arg-type]
        found.append(item)
        if len(found) >= limit:
            break
    if as_json:
        ctx.output.json([item.model_dump(mode="json") for item in found])
        return
    ctx.output.table(
        ["id", "filename", "purpose", "bytes", "status", "created"],
        [[f.id, f.filename, f.purpose, f.bytes, f.status, when(f.created_at)] for f in found],
    )


@files_group.command("get")
@click.argument("file_id")
@pass_context
def get_command(ctx: CommandContext, file_id: str) -> None:
    """Show a file object (JSON)."""
    ctx.output.json(ctx.client.files.retrieve(file_id).model_dump(mode="json"))


@files_group.command("delete")
@click.argument("file_ids", nargs=-1, required=True)
@pass_context
def delete_command(ctx: CommandContext, file_ids: tuple[str, ...]) -> None:
    """Delete files."""
    for one in file_ids:
        ctx.client.files.delete(one)
        ctx.output.line(f"Deleted {one}")
