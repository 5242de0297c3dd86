"""What each serving replica tells the API's /metrics about itself.

Per-request figures (time to first token, tokens) travel back with each answer. What
belongs to a replica rather than a request (requests inside its engine, adapters it
holds, its adapter cache's loads, hits and evictions) is posted every second to one small
named actor per cluster, the board, which the API reads when /metrics is scraped: Serve
offers no way to ask every replica, and the board keeps working as replicas come and go.

The board also carries what the API must tell every replica: the adapters of deleted
models (retirements). Each replica reads them in answer to its post, stops serving them,
and confirms in its next snapshot; the API deletes a model's files only after that
(serving/deployment.py LLMServer.retire).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray

BOARD_NAME = "ftaas-serving-stats"
BOARD_NAMESPACE = "ftaas"
# A replica that has not posted for this long is gone (stopped, scaled down, dead).
STALE_AFTER_S = 30.0
# A retirement is announced this long: far longer than a replica takes to see it, and a
# retired name is never used again (model names carry a unique id).
RETIREMENT_KEPT_S = 600.0

# The adapter cache's events, by tier (see serving/deployment.py).
ADAPTER_EVENTS = (
    "registry_lookups",  # a request (or an eager load) asked for its adapter
    "registry_loads",  # ... which was not registered with the engine: registered now
    "registry_evictions",  # unregistered to make room (least recently used)
    "disk_hits",  # a registration found the adapter on the replica's disk
    "store_fetches",  # ... did not: fetched from the artifact store
    "disk_evictions",  # deleted from the replica's disk to make room (least recently used)
)


class AdapterEvents(Counter[str]):
    """Counts of ADAPTER_EVENTS; only these names are counted."""

    def add(self, event: str, count: int = 1) -> None:
        if event not in ADAPTER_EVENTS:
            raise ValueError(f"unknown adapter event {event}")
        self[event] += count


@dataclass(frozen=True)
class Retirements:
    """The adapters announced as retired, up to a point of the board's history: `stamp`
    is (the board's identity, how many announcements it has had)."""

    stamp: tuple[str, int]
    names: frozenset[str]


def confirmed(snapshot: dict[str, Any], stamp: tuple[str, int]) -> bool:
    """Whether the replica that posted `snapshot` has applied every retirement up to `stamp`
    (a board that restarted has a new identity: nothing it announced before is confirmed)."""
    board_id, count = snapshot.get("retired_through") or ("", -1)
    return bool(board_id == stamp[0] and count >= stamp[1])


@ray.remote(num_cpus=0)
class StatsBoard:
    """The latest snapshot each replica posted, and the retirements announced lately."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[float, dict[str, Any]]] = {}
        self.identity = uuid.uuid4().hex
        self.announcements = 0
        self.retired: dict[str, float] = {}  # adapter name → when it was announced

    def post(self, replica: str, snapshot: dict[str, Any]) -> Retirements:
        now = time.monotonic()
        self.snapshots[replica] = (now, snapshot)
        for name, announced in list(self.retired.items()):
            if now - announced > RETIREMENT_KEPT_S:
                del self.retired[name]
        return Retirements((self.identity, self.announcements), frozenset(self.retired))

    def retire(self, names: list[str]) -> tuple[str, int]:
        """Announce deleted models' adapters; replicas confirm this stamp once applied."""
        now = time.monotonic()
        self.retired.update(dict.fromkeys(names, now))
        self.announcements += 1
        return self.identity, self.announcements

    def read(self, within_s: float = STALE_AFTER_S) -> list[dict[str, Any]]:
        """Snapshots of the replicas that posted within the last `within_s` seconds."""
        now = time.monotonic()
        for replica, (posted, _) in list(self.snapshots.items()):
            if now - posted > STALE_AFTER_S:
                del self.snapshots[replica]
        return [s for posted, s in self.snapshots.values() if now - posted <= within_s]


def board() -> Any:
    """The cluster's board (made by the first caller; lives as long as the cluster)."""
    return StatsBoard.options(  # type: ignore[attr-defined]
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()
