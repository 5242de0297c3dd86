"""`ftaas jobs create|list|get|events|cancel|pause|resume|follow`."""

from __future__ import annotations

from typing import Any

import click
from openai.types.fine_tuning import FineTuningJob
from pydantic import ValidationError

from clients.context import CommandContext, pass_context
from clients.errors import usage_error
from clients.files import file_id
from clients.follow import events_oldest_first
from clients.follow import follow as follow_job
from clients.hyperparameter_flags import hyperparameter_options, hyperparameters
from clients.output import when
from service.fine_tuning.schemas import CreateFineTuningJobRequest
from training.methods import METHODS, TrainingMethod

poll_interval_option = click.option(
    "--poll-interval",
    type=click.FloatRange(0.05, 60),
    default=2.0,
    show_default=True,
    help="seconds between two looks at the job",
)


def _request(
    model: str,
    training_file: str,
    validation_file: str | None,
    suffix: str | None,
    seed: int | None,
    metadata: tuple[str, ...],
    method: TrainingMethod,
    method_hyperparameters: dict[str, Any],
) -> CreateFineTuningJobRequest:
    """The request as the API's own model checks it, before anything is uploaded."""
    pairs: dict[str, str] = {}
    for pair in metadata:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        pairs[key] = value
    body: dict[str, Any] = {
        "model": model,
        "training_file": training_file,
        "method": {"type": method, method: {"hyperparameters": method_hyperparameters}},
    }
    optional = {
        "validation_file": validation_file,
        "suffix": suffix,
        "seed": seed,
        "metadata": pairs or None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    try:
        return CreateFineTuningJobRequest.model_validate(body)
    except ValidationError as error:
        raise usage_error(error) from None


def _finished(ctx: CommandContext, job: FineTuningJob) -> None:
    ctx.output.line(f"Job {job.id} succeeded", style="bold green")
    ctx.output.result(job.fine_tuned_model or "")


@click.group("jobs")
def jobs_group() -> None:
    """Create, follow and control fine-tuning jobs."""


@jobs_group.command("create")
@click.option("--model", required=True, help="the base model (or a tuned one to train on)")
@click.option(
    "--training-file", required=True, metavar="PATH|FILE_ID", help="uploaded first if a path"
)
@click.option("--validation-file", metavar="PATH|FILE_ID", help="uploaded first if a path")
@click.option("--suffix", help="part of the tuned model's name")
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default="supervised",
    show_default=True,
    help="the training method",
)
@click.option("--seed", type=int)
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="may be repeated")
@hyperparameter_options
@click.option("--follow", is_flag=True, help="show the job's progress until it ends")
@poll_interval_option
@pass_context
def create_command(
    ctx: CommandContext,
    model: str,
    training_file: str,
    validation_file: str | None,
    suffix: str | None,
    method: TrainingMethod,
    seed: int | None,
    metadata: tuple[str, ...],
    follow: bool,
    poll_interval: float,
    **flags: Any,
) -> None:
    """Create a fine-tuning job; local files are uploaded first.

    Prints the job's id last; with --follow, the tuned model's name once it succeeded (exit
    0), or the job's error on stderr when it failed (exit 1) or was cancelled (exit 3)."""
    chosen = hyperparameters(method, flags)
    # Checked whole before any upload: a typo costs no upload.
    request = _request(model, "file-unchecked", None, suffix, seed, metadata, method, chosen)
    training_id = file_id(ctx, training_file)
    validation_id = file_id(ctx, validation_file) if validation_file else None
    body = request.model_dump(mode="json", exclude_none=True, exclude_unset=True)
    body["training_file"] = training_id
    if validation_id:
        body["validation_file"] = validation_id
    job = ctx.client.fine_tuning.jobs.create(**body)
    ctx.output.line(f"Created job {job.id} ({job.status})")
    if not follow:
        ctx.output.result(job.id)
        return
    _finished(ctx, follow_job(ctx.client, job.id, ctx.output, poll_interval))


@jobs_group.command("follow")
@click.argument("job_id")
@poll_interval_option
@pass_context
def follow_command(ctx: CommandContext, job_id: str, poll_interval: float) -> None:
    """Show a job's progress until it ends (exit statuses as `create --follow`)."""
    _finished(ctx, follow_job(ctx.client, job_id, ctx.output, poll_interval))


@jobs_group.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="the API's objects, as JSON")
@pass_context
def list_command(ctx: CommandContext, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    found: list[FineTuningJob] = []
    for job in ctx.client.fine_tuning.jobs.list(limit=min(limit, 100)):
        found.append(job)
        if len(found) >= limit:
            break
    if as_json:
        ctx.output.json([job.model_dump(mode="json") for job in found])
        return
    ctx.output.table(
        ["id", "model", "status", "fine_tuned_model", "created"],
        [[j.id, j.model, j.status, j.fine_tuned_model, when(j.created_at)] for j in found],
    )


@jobs_group.command("get")
@click.argument("job_id")
@pass_context
def get_command(ctx: CommandContext, job_id: str) -> None:
    """Show a job object (JSON)."""
    ctx.output.json(ctx.client.fine_tuning.jobs.retrieve(job_id).model_dump(mode="json"))


@jobs_group.command("events")
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="the API's objects, as JSON")
@pass_context
def events_command(ctx: CommandContext, job_id: str, limit: int, as_json: bool) -> None:
    """A job's latest events, oldest first."""
    events = list(events_oldest_first(ctx.client, job_id, limit))
    if as_json:
        ctx.output.json([event.model_dump(mode="json") for event in events])
        return
    ctx.output.table(
        ["created", "level", "message"],
        [[when(e.created_at), e.level, e.message] for e in events],
    )


def _control(ctx: CommandContext, verb: str, job_id: str) -> None:
    action = getattr(ctx.client.fine_tuning.jobs, verb)
    job = action(job_id)
    ctx.output.line(f"Job {job.id}: {job.status}")


@jobs_group.command("cancel")
@click.argument("job_id")
@pass_context
def cancel_command(ctx: CommandContext, job_id: str) -> None:
    """Cancel a job."""
    _control(ctx, "cancel", job_id)


@jobs_group.command("pause")
@click.argument("job_id")
@pass_context
def pause_command(ctx: CommandContext, job_id: str) -> None:
    """Pause a running job (it checkpoints, and resumes from there)."""
    _control(ctx, "pause", job_id)


@jobs_group.command("resume")
@click.argument("job_id")
@pass_context
def resume_command(ctx: CommandContext, job_id: str) -> None:
    """Resume a paused job."""
    _control(ctx, "resume", job_id)
