"""`ftaas models list|get|delete|download|import`: tuned models, and adapters out and in
(README "Adapters out and in")."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
from openai.types import Model
from pydantic import ValidationError

from clients.context import CommandContext, pass_context
from clients.errors import usage_error
from clients.files import file_id
from clients.output import when


@click.group("models")
def models_group() -> None:
    """List, delete, download and import models."""


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="the API's objects, as JSON")
@pass_context
def list_command(ctx: CommandContext, as_json: bool) -> None:
    """Base models and this organization's tuned and imported ones."""
    found = list(ctx.client.models.list())
    if as_json:
        ctx.output.json([model.model_dump(mode="json") for model in found])
        return
    ctx.output.table(
        ["id", "owned_by", "created"], [[m.id, m.owned_by, when(m.created)] for m in found]
    )


@models_group.command("get")
@click.argument("model")
@pass_context
def get_command(ctx: CommandContext, model: str) -> None:
    """Show a model object (JSON)."""
    ctx.output.json(ctx.client.models.retrieve(model).model_dump(mode="json"))


@models_group.command("delete")
@click.argument("model")
@pass_context
def delete_command(ctx: CommandContext, model: str) -> None:
    """Delete a tuned or imported model (or a checkpoint's)."""
    ctx.client.models.delete(model)
    ctx.output.line(f"Deleted {model}")


def archive_name(model: str) -> str:
    """`ft:ftaas-tiny:org:demo:AbC` → `ft-ftaas-tiny-org-demo-AbC.tar.gz`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") + ".tar.gz"


@models_group.command("download")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    "destination",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="where to write the .tar.gz ('-': stdout); default: named after the model",
)
@pass_context
def download_command(ctx: CommandContext, model: str, destination: Path | None) -> None:
    """Download a tuned model's (or checkpoint's) LoRA adapter as a .tar.gz of a PEFT
    folder (adapter_config.json, adapter_model.safetensors)."""
    archive = ctx.client.get(f"/models/{model}/adapter", cast_to=bytes)
    if destination is not None and str(destination) == "-":
        sys.stdout.buffer.write(archive)
        sys.stdout.buffer.flush()
        return
    path = destination or Path(archive_name(model))
    path.write_bytes(archive)
    ctx.output.line(f"Wrote {model}'s adapter ({len(archive)} bytes)")
    ctx.output.result(str(path))


@models_group.command("import")
@click.argument("adapter", metavar="PATH|FILE_ID")
@click.option("--base-model", required=True, help="a configured base model")
@click.option("--suffix", help="part of the model's name")
@pass_context
def import_command(ctx: CommandContext, adapter: str, base_model: str, suffix: str | None) -> None:
    """Register a LoRA adapter archive (tar or zip of adapter_config.json and
    adapter_model.safetensors) as a model of a base; a path is uploaded first."""
    from service.models.service import ImportAdapterRequest

    body = {"base_model": base_model, "adapter_file": "file-unchecked", "suffix": suffix}
    try:
        request = ImportAdapterRequest.model_validate(body)
    except ValidationError as error:
        raise usage_error(error) from None
    adapter_file = file_id(ctx, adapter, purpose="user_data")
    payload = request.model_dump(mode="json", exclude_none=True)
    payload["adapter_file"] = adapter_file
    model = ctx.client.post("/models", body=payload, cast_to=Model)
    ctx.output.line(f"Imported {adapter} as a model of {base_model}")
    ctx.output.result(model.id)
