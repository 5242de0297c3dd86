"""`--follow`: a job's progress until it ends, from the job object and its events.

Each poll reads the job, then the events newer than the last one shown (the events API
lists newest first). Metrics events carry the step, the total and the losses (or the
reward); the job's `estimated_finish` gives the ETA. On a terminal a rich progress bar with
the live loss, the other events printed above it; in a pipe one plain line per event, and
one progress line per poll that brought metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from clients.errors import CommandFailed, Interrupted, JobCancelled, error_details
from clients.output import Output, duration

TERMINAL_STATUSES = {"succeeded", "failed", "cancelled"}
VALID_LOSSES = ("full_valid_loss", "valid_loss")


@dataclass
class JobProgress:
    """What the progress line shows, kept up to date from the job and its events."""

    status: str = "-"
    step: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    reward: tuple[str, float] | None = None
    created_at: int | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def see_job(self, job: FineTuningJob) -> None:
        self.status = job.status
        self.created_at = job.created_at
        self.finished_at = job.finished_at
        self.estimated_finish = job.estimated_finish

    def see_metrics(self, data: dict[str, Any]) -> None:
        self.step = int(data.get("step", self.step))
        self.total_steps = int(data.get("total_steps") or 0) or self.total_steps
        if isinstance(data.get("train_loss"), int | float):
            self.train_loss = float(data["train_loss"])
        for name in VALID_LOSSES:
            if isinstance(data.get(name), int | float):
                self.valid_loss = float(data[name])
                break
        rewards = [k for k, v in data.items() if "reward" in k and isinstance(v, int | float)]
        if rewards:
            name = min(rewards, key=len)  # `train_reward` before `train_reward_std`
            self.reward = (name, float(data[name]))

    @property
    def elapsed_s(self) -> float | None:
        if self.created_at is None:
            return None
        return (self.finished_at or self.clock()) - self.created_at

    @property
    def eta_s(self) -> float | None:
        if self.estimated_finish is None or self.status in TERMINAL_STATUSES:
            return None
        if self.total_steps and self.step >= self.total_steps:
            return 0.0  # the last step is done: the adapter is being saved
        return max(0.0, self.estimated_finish - self.clock())

    def figures(self) -> str:
        """`train loss 0.4521  valid loss 0.5123  elapsed 0:00:12  ETA 0:00:30`."""
        parts = []
        if self.train_loss is not None:
            parts.append(f"train loss {self.train_loss:.4f}")
        if self.valid_loss is not None:
            parts.append(f"valid loss {self.valid_loss:.4f}")
        if self.reward is not None:
            parts.append(f"{self.reward[0].replace('_', ' ')} {self.reward[1]:.4f}")
        parts.append(f"elapsed {duration(self.elapsed_s)}")
        parts.append(f"ETA {duration(self.eta_s)}")
        return "  ".join(parts)

    def line(self) -> str:
        """The plain progress line: `running  step 3/12  train loss …`."""
        steps = f"step {self.step}/{self.total_steps}" if self.total_steps else "step -"
        return f"{self.status}  {steps}  {self.figures()}"


def new_events(client: OpenAI, job_id: str, last_seen: str | None) -> list[FineTuningJobEvent]:
    """The events after `last_seen`, oldest first (the SDK pages through newest first)."""
    fresh: list[FineTuningJobEvent] = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
        if event.id == last_seen:
            break
        fresh.append(event)
    fresh.reverse()
    return fresh


def _event_data(event: FineTuningJobEvent) -> dict[str, Any]:
    return event.data if isinstance(event.data, dict) else {}


class _PlainView:
    def __init__(self, output: Output) -> None:
        self.output = output
        self.status: str | None = None

    def __enter__(self) -> _PlainView:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def show(self, progress: JobProgress, events: list[FineTuningJobEvent]) -> None:
        if progress.status != self.status:
            self.status = progress.status
            self.output.line(f"status: {progress.status}")
        metrics = False
        for event in events:
            if event.type == "metrics":
                metrics = True
            else:
                self.output.line(event.message)
        if metrics:
            self.output.line(progress.line())


class _TerminalView:
    def __init__(self, output: Output, job_id: str) -> None:
        assert output.console is not None
        self.progress = Progress(
            TextColumn("[bold]{task.fields[status]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            console=output.console,
            transient=False,
            refresh_per_second=4,
        )
        self.task: TaskID = self.progress.add_task(job_id, total=None, status="", figures="")

    def __enter__(self) -> _TerminalView:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def show(self, progress: JobProgress, events: list[FineTuningJobEvent]) -> None:
        for event in events:
            if event.type != "metrics":
                style = "yellow" if event.level in ("warn", "error") else "dim"
                self.progress.console.print(event.message, style=style, markup=False)
        total = progress.total_steps
        completed = progress.step if total else 0
        if progress.status == "succeeded" and total:
            completed = total
        self.progress.update(
            self.task,
            total=total,
            completed=completed,
            status=progress.status,
            figures=progress.figures(),
        )


def follow(
    client: OpenAI,
    job_id: str,
    output: Output,
    poll_interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> FineTuningJob:
    """Shows the job until it ends; returns it when it succeeded, raises CommandFailed
    (the job's error) when it failed or was cancelled."""
    view = _TerminalView(output, job_id) if output.terminal else _PlainView(output)
    try:
        job = _watch(client, job_id, view, poll_interval, sleep)
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped following; the job goes on (ftaas jobs follow {job_id})"
        ) from None
    return ended(job)


def _watch(
    client: OpenAI,
    job_id: str,
    view: _PlainView | _TerminalView,
    poll_interval: float,
    sleep: Callable[[float], None],
) -> FineTuningJob:
    progress = JobProgress()
    last_seen: str | None = None
    with view:
        while True:
            # Events first, then the job: the job is then at least as new as its steps
            # shown (their ETA); once it has ended, the events it ended with are read too.
            events = new_events(client, job_id, last_seen)
            if events:
                last_seen = events[-1].id
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status in TERMINAL_STATUSES:
                events += new_events(client, job_id, last_seen)
                if events:
                    last_seen = events[-1].id
            progress.see_job(job)
            for event in events:
                if event.type == "metrics":
                    progress.see_metrics(_event_data(event))
            view.show(progress, events)
            if job.status in TERMINAL_STATUSES:
                return job
            sleep(poll_interval)


def ended(job: FineTuningJob) -> FineTuningJob:
    if job.status == "succeeded":
        return job
    if job.status == "cancelled":
        raise JobCancelled(f"job {job.id} was cancelled")
    error = job.error
    if error is None:
        raise CommandFailed(f"job {job.id} failed")
    details = error_details(error.message, error.param, error.code)
    raise CommandFailed(f"job {job.id} failed: {details}")


def events_oldest_first(client: OpenAI, job_id: str, limit: int) -> Iterator[FineTuningJobEvent]:
    """The newest `limit` events, oldest first."""
    page = client.fine_tuning.jobs.list_events(job_id, limit=min(limit, 1000))
    yield from reversed(page.data[:limit])
