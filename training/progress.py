"""The trainer's progress log: typed records, appended to a JSONL file beside the job's
outputs, and the one schema both the trainer (writer) and the service (reader) use.

The trainer appends records (started, metrics, checkpoint, notice, paused, succeeded,
failed); the service's scheduler reads them from the byte offset it reached last time and
turns them into job events. The log outlives both processes, so a restarted service picks
up exactly where it stopped. A line that is not a valid record (a torn write, a record
from a newer trainer) is reported as a `BadLine` and skipped, never retried forever.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


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


class Notice(_Record):
    type: Literal["notice"] = "notice"
    message: str


class Paused(_Record):
    type: Literal["paused"] = "paused"
    step: int
    path: str


class Succeeded(_Record):
    type: Literal["succeeded"] = "succeeded"
    adapter_dir: str


class Failed(_Record):
    type: Literal["failed"] = "failed"
    code: str = "training_error"
    message: str


ProgressRecord = Annotated[
    Started | Metrics | Checkpoint | Notice | Paused | Succeeded | Failed,
    Field(discriminator="type"),
]
Outcome = Succeeded | Failed
_RECORD: TypeAdapter[ProgressRecord] = TypeAdapter(ProgressRecord)


def parse_record(line: bytes | str) -> ProgressRecord:
    """One log line as a record; ValueError (pydantic's, or JSON's) when it is not one."""
    return _RECORD.validate_json(line)


@dataclass(frozen=True)
class BadLine:
    offset: int
    reason: str


@dataclass
class ProgressBatch:
    records: list[ProgressRecord] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    offset: int = 0


class ProgressLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: ProgressRecord) -> None:
        line = (record.model_dump_json() + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write() on an O_APPEND descriptor: the driver and rank 0 may both append.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_from(self, offset: int) -> ProgressBatch:
        """Complete records after `offset`, the lines that were not records, and the
        offset after the last complete line (a half-written last line waits)."""
        if not self.path.exists():
            return ProgressBatch(offset=offset)
        with open(self.path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
        end = data.rfind(b"\n") + 1
        batch = ProgressBatch(offset=offset + end)
        position = offset
        for line in data[:end].splitlines(keepends=True):
            if line.strip():
                try:
                    batch.records.append(parse_record(line))
                except (ValidationError, ValueError) as error:
                    batch.bad_lines.append(BadLine(position, _reason(error)))
            position += len(line)
        return batch


def _reason(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(error).splitlines()[0]
