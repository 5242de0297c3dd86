"""The trainer channel: progress records in, control requests out.

Both travel through files in the attempt's output folder (`progress.jsonl`, and a pause
flag the trainer checks every step); the record schema is `training.progress`, the one
the trainer writes with. The scheduler is this channel's only user in the service.
"""

from __future__ import annotations

from training.control import request_pause
from training.progress import ProgressBatch, ProgressLog
from training.spec import progress_path


class TrainerChannel:
    def read(self, output_dir: str, offset: int) -> ProgressBatch:
        return ProgressLog(progress_path(output_dir)).read_from(offset)

    def request_pause(self, output_dir: str) -> None:
        request_pause(output_dir)
