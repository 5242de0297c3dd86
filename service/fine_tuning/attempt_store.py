"""A job's attempts in the artifact store: their folders, and everything the scheduler and
the trainer say to each other there.

Each attempt has its own folder (`jobs/<job>/attempt-<n>`): the scheduler writes the
attempt's TrainingSpec and the copy of the organization's W&B key it may read, and asks
for a pause there; the trainer writes its numbered progress records, checkpoints and
adapter there. The store is the one place every role reaches on a cluster with no disk in
common, it keeps what was said across a restart of the service, of the trainer or of Ray
itself, and it needs nothing else running. The scheduler and housekeeping reach a job's
objects only through this class, so the layout is written down once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from service.models.weights_header import read_header
from training.control import request_pause
from training.progress import ProgressBatch, ProgressLog
from training.spec import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TrainingSpec,
    job_folder,
    wandb_secret_key,
)
from training.storage import ArtifactStore, join

logger = logging.getLogger(__name__)


def attempt_folder(job_id: str, number: int) -> str:
    """Attempt `number`'s own folder: an earlier attempt's progress log is never read as
    a later one's."""
    return join(job_folder(job_id), f"attempt-{number}")


class AttemptStore:
    def __init__(self, store: ArtifactStore):
        self.store = store

    # --- to the trainer
    def save_spec(self, spec: TrainingSpec) -> None:
        spec.save(self.store)

    def hand_over_secret(self, output_key: str, secret: dict[str, Any]) -> str:
        """A copy of an organization's W&B key that only this attempt's trainer reads
        (its driver deletes it; `forget_secret` sweeps what a killed one left)."""
        key = wandb_secret_key(output_key)
        self.store.put_bytes(key, json.dumps(secret).encode())
        return key

    def request_pause(self, output_key: str) -> None:
        request_pause(self.store, output_key)

    # --- from the trainer
    def read(self, output_key: str, offset: int) -> ProgressBatch:
        return ProgressLog(self.store, output_key).read_from(offset)

    def adapter_config(self, adapter_folder: str) -> dict[str, Any]:
        """An adapter folder's adapter_config.json; FileNotFoundError once it is gone."""
        raw = self.store.get_bytes(join(adapter_folder, ADAPTER_CONFIG))
        return json.loads(raw)  # type: ignore[no-any-return]

    def adapter_weights(self, adapter_folder: str) -> dict[str, tuple[list[int], str]]:
        """The shapes and dtypes of an adapter's weights, from their safetensors header
        alone (its first bytes, not the file)."""
        key = join(adapter_folder, ADAPTER_WEIGHTS)
        sizes = {item.key: item.size for item in self.store.list(adapter_folder)}
        if key not in sizes:
            raise FileNotFoundError(key)
        size = sizes[key]
        with self.store.open(key) as stream:
            tensors = read_header(stream.read, size)
        return {name: (list(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}

    # --- clearing up
    def forget_secret(self, job_id: str, number: int) -> bool:
        """Deletes attempt `number`'s copy of the W&B key; whether there was one."""
        key = wandb_secret_key(attempt_folder(job_id, number))
        if not self.store.exists(key):
            return False
        self.store.delete(key)
        return True

    def delete_checkpoint(self, path: str) -> None:
        """A pruned checkpoint's files, once serving has dropped it."""
        try:
            self.store.delete(path)
        except Exception:  # the checkpoint is unlisted already; only storage is wasted
            logger.warning("could not delete %s from the artifact store", path, exc_info=True)

    def job_bytes(self, job_id: str) -> int:
        """What every attempt of the job holds in the store (the storage quota counts it)."""
        return sum(item.size for item in self.store.list(job_folder(job_id)))

    def delete_job(self, job_id: str) -> None:
        self.store.delete(job_folder(job_id))
