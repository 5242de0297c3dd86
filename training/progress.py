"""The trainer's progress log: typed records in the artifact store, and the one schema
both the trainer (writer) and the service (reader) use.

The trainer writes records (started, metrics, checkpoint, notice, paused, succeeded,
failed), each as one object numbered in order under `<attempt>/progress/`; the service's
scheduler reads those after the number it reached last time and turns them into job
events. The store outlives both processes and needs no disk in common, so a restarted
service picks up exactly where it stopped, wherever the trainer ran. One writer at a time:
rank 0 while training runs (a restarted rank 0 continues the numbering), then the Ray
job's driver for the outcome, once training has returned. A record that does not parse (a
record from a newer trainer) is reported as a `BadLine` and skipped, never retried forever.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from training.storage import ArtifactStore, join

RECORD_SUFFIX = ".json"


def _now() -> int:
    return int(time.time())


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    time: int = Field(default_factory=_now)


class Started(_Record):
    type: Literal["started"] = "started"
    total_steps: int
    resumed_from_step: int = 0
    n_examples: int
    n_truncated: int = 0
    # Examples left out: nothing left to learn once truncated to max_length.
    n_dropped: int = 0
    trained_tokens: int
    # The run-size hyperparameters the trainer used (it resolves some itself).
    hyperparameters: dict[str, int] | None = None


class Metrics(_Record):
    """One optimizer step. The metric values (train_loss, valid_loss, ...) are the
    record's other fields, flat, as OpenAI's metrics events carry them."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["metrics"] = "metrics"
    step: int
    total_steps: int
    elapsed_s: float = 0.0
    steps_this_run: int | None = None

    @property
    def values(self) -> dict[str, float]:
        extra = self.model_extra or {}
        return {
            k: float(v)
            for k, v in extra.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


class Checkpoint(_Record):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    epoch: int
    path: str
    metrics: dict[str, float | int] = Field(default_factory=dict)


class Evaluation(_Record):
    """The validation examples scored (training/evaluation.py) on the model the job starts
    from, before its first step (`start`), or on the tuned model after its last (`end`,
    with the start's figures beside it)."""

    type: Literal["evaluation"] = "evaluation"
    stage: Literal["start", "end"]
    step: int
    metrics: dict[str, float]
    start_metrics: dict[str, float] = Field(default_factory=dict)

    def message(self) -> str:
        """`Validation loss 2.31 → 0.42, token accuracy 41% → 97%, … (the model it
        started from → the tuned model)`, or the start's figures alone."""
        if self.stage == "start":
            shown = [f"{label} {form.format(self.metrics[name])}" for name, label, form in
                     EVALUATION_FIGURES if name in self.metrics]  # fmt: skip
            return "Before training, on the validation file: " + ", ".join(shown)
        before, after = self.start_metrics, self.metrics
        shown = [
            f"{label} {form.format(before[name])} → {form.format(after[name])}"
            for name, label, form in EVALUATION_FIGURES
            if name in before and name in after
        ]
        if not shown:
            return "After training, on the validation file: " + ", ".join(
                f"{label} {form.format(after[name])}"
                for name, label, form in EVALUATION_FIGURES
                if name in after
            )
        return "Validation: " + ", ".join(shown) + " (the model it started from → the tuned model)"


# What an Evaluation's message shows: metric, its name for people, its format.
EVALUATION_FIGURES = (
    ("full_valid_loss", "loss", "{:.2f}"),
    ("full_valid_mean_token_accuracy", "token accuracy", "{:.0%}"),
    ("full_valid_exact_match", "exact answers", "{:.0%}"),
    ("full_valid_contains", "answers containing the reference", "{:.0%}"),
    ("full_valid_similarity", "similarity to the reference", "{:.2f}"),
    ("full_valid_reward_mean", "mean reward", "{:.2f}"),  # reinforcement: the grader's
)


class Notice(_Record):
    type: Literal["notice"] = "notice"
    message: str


class Paused(_Record):
    type: Literal["paused"] = "paused"
    step: int
    path: str


class Succeeded(_Record):
    type: Literal["succeeded"] = "succeeded"
    adapter_dir: str  # the adapter folder's key in the artifact store


class Failed(_Record):
    type: Literal["failed"] = "failed"
    code: str = "training_error"
    message: str


# Where things are on the server is not the tenant's business: an exception's text often
# names a folder (`[Errno 2] No such file or directory: '/srv/…/blobs/files/file-…'`), a
# store URL, a database URL with its password, or the dashboard's address.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*:/[^\s'\"]*")
# Two or more segments, not after a word (`and/or`, `Qwen/Qwen2.5`); `:` may precede one
# (`PATH=/usr/bin:/srv/bin`). The API's own routes (`/v1/files`) are not server paths.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.-])/(?!v1/)(?:[\w.@+~-]+/)+([\w.@+~-]*)")


def without_server_paths(text: str) -> str:
    """`text` for a tenant: a URL keeps only its last path segment (no scheme, host or
    credentials), an absolute path likewise (`…/file-abc`, which still says what was
    missing)."""
    text = _URL.sub(lambda m: "…/" + _last_segment(m.group(0)), text)
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(1), text)


def _last_segment(url: str) -> str:
    rest = url.split("://", 1)[-1] if "://" in url else url.split(":", 1)[-1]
    _, slash, path = rest.partition("/")  # the host (and any user:password@) goes
    return path.rstrip("/").rsplit("/", 1)[-1] if slash else ""


ProgressRecord = Annotated[
    Started | Metrics | Checkpoint | Evaluation | Notice | Paused | Succeeded | Failed,
    Field(discriminator="type"),
]
Outcome = Succeeded | Failed
_RECORD: TypeAdapter[ProgressRecord] = TypeAdapter(ProgressRecord)


def parse_record(line: bytes | str) -> ProgressRecord:
    """One log line as a record; ValueError (pydantic's, or JSON's) when it is not one."""
    return _RECORD.validate_json(line)


@dataclass(frozen=True)
class BadLine:
    offset: int  # the record's number
    reason: str


@dataclass
class ProgressBatch:
    records: list[ProgressRecord] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    offset: int = 0


class ProgressLog:
    """The records of one attempt, under `<output_key>/progress/` in `store`."""

    def __init__(self, store: ArtifactStore, output_key: str, gap: int = 0):
        """`gap`: numbers this writer leaves free after the last record it finds, for a
        writer that may run while another still writes (the driver recording a failure
        while a worker it lost touch of goes on): the two must never take the same
        number, or one record overwrites the other."""
        self.store, self.folder = store, join(output_key, "progress")
        self._gap = gap
        self._next: int | None = None

    def _number(self, key: str) -> int | None:
        name = key.rsplit("/", 1)[-1].removesuffix(RECORD_SUFFIX)
        return int(name) if name.isdigit() else None

    def _key(self, number: int) -> str:
        return join(self.folder, f"{number:010d}{RECORD_SUFFIX}")

    def write(self, record: ProgressRecord) -> None:
        if self._next is None:  # continue after whatever an earlier writer left
            numbers = [self._number(item.key) for item in self.store.list(self.folder)]
            self._next = max((n for n in numbers if n is not None), default=-1) + 1 + self._gap
        self.store.put_bytes(self._key(self._next), record.model_dump_json().encode())
        self._next += 1

    def read_from(self, offset: int) -> ProgressBatch:
        """Records numbered `offset` and after, the ones that did not parse, and the number
        to read from next time."""
        batch = ProgressBatch(offset=offset)
        after = self._key(offset - 1) if offset > 0 else None
        for item in self.store.list(self.folder, after=after):
            number = self._number(item.key)
            if number is None or number < offset:
                continue
            try:
                batch.records.append(parse_record(self.store.get_bytes(item.key)))
            except FileNotFoundError:
                continue  # its attempt's folder was just deleted
            except (ValidationError, ValueError) as error:
                batch.bad_lines.append(BadLine(number, _reason(error)))
            batch.offset = number + 1
        return batch


def _reason(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(error).splitlines()[0]
