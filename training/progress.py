"""The trainer's progress log: an append-only JSONL file beside the job's outputs.

The trainer appends records (started, metrics, succeeded, failed); the service's scheduler
reads them from the byte offset it reached last time and turns them into job events. The
log outlives both processes, so a restarted service picks up exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

RecordType = Literal["started", "metrics", "checkpoint", "notice", "paused", "succeeded", "failed"]


class ProgressLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record_type: RecordType, **fields: Any) -> None:
        record = {"type": record_type, "time": int(time.time()), **fields}
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write() on an O_APPEND descriptor: the driver and rank 0 may both append.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Complete records after `offset`, and the offset after the last one."""
        if not self.path.exists():
            return [], offset
        with open(self.path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next read
        records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return records, offset + end
