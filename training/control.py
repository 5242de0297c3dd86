"""Requests from the service to a running trainer, as objects in the artifact store.

The progress log carries news from the trainer to the service; this is the other
direction. Only one request exists: pause (save a checkpoint at the next step, then stop).
Cancel needs no cooperation: the service stops the Ray job outright. The request lives in
the store, like everything else between the roles, so it survives a restart of either
side and needs no disk in common; rank 0 looks for it at most every PAUSE_POLL_S.
"""

from __future__ import annotations

import time

from training.storage import ArtifactStore, join

PAUSE_POLL_S = 1.0


def _pause_key(output_key: str) -> str:
    return join(output_key, "control", "pause")


def request_pause(store: ArtifactStore, output_key: str) -> None:
    store.put_bytes(_pause_key(output_key), b"pause")


def pause_requested(store: ArtifactStore, output_key: str) -> bool:
    return store.exists(_pause_key(output_key))


class PauseWatch:
    """Whether a pause was requested, asking the store at most once per `interval_s`."""

    def __init__(self, store: ArtifactStore, output_key: str, interval_s: float = PAUSE_POLL_S):
        self.store, self.output_key, self.interval_s = store, output_key, interval_s
        self._asked_at = float("-inf")

    def requested(self) -> bool:
        if time.monotonic() - self._asked_at < self.interval_s:
            return False
        self._asked_at = time.monotonic()
        return pause_requested(self.store, self.output_key)
