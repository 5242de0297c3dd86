"""The trainer channel: progress records in, control requests out.

Both travel through the artifact store, in the attempt's folder: numbered progress records
(`training.progress`, the schema the trainer writes with) and a pause request the trainer
looks for while it trains (`training.control`). The store is the one place every role
reaches on a cluster with no disk in common, it keeps what was said across a restart of
the service, of the trainer or of Ray itself, and it needs nothing else to be running.
The scheduler is this channel's only user in the service.
"""

from __future__ import annotations

from training.control import request_pause
from training.progress import ProgressBatch, ProgressLog
from training.storage import ArtifactStore


class TrainerChannel:
    def __init__(self, store: ArtifactStore):
        self.store = store

    def read(self, output_key: str, offset: int) -> ProgressBatch:
        return ProgressLog(self.store, output_key).read_from(offset)

    def request_pause(self, output_key: str) -> None:
        request_pause(self.store, output_key)
