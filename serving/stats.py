"""What each serving replica tells the API's /metrics about itself.

Per-request figures (time to first token, tokens) travel back with each answer. What
belongs to a replica rather than a request (requests inside its engine, adapters it
holds, its adapter cache's loads, hits and evictions) is posted every second to one small
named actor per cluster, the board, which the API reads when /metrics is scraped: Serve
offers no way to ask every replica, and the board keeps working as replicas come and go.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import ray

BOARD_NAME = "ftaas-serving-stats"
BOARD_NAMESPACE = "ftaas"
# A replica that has not posted for this long is gone (stopped, scaled down, dead).
STALE_AFTER_S = 30.0

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


@ray.remote(num_cpus=0)
class StatsBoard:
    """The latest snapshot each replica posted."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[float, dict[str, Any]]] = {}

    def post(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.snapshots[replica] = (time.monotonic(), snapshot)

    def read(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        for replica, (posted, _) in list(self.snapshots.items()):
            if now - posted > STALE_AFTER_S:
                del self.snapshots[replica]
        return [snapshot for _, snapshot in self.snapshots.values()]


def board() -> Any:
    """The cluster's board (made by the first caller; lives as long as the cluster)."""
    return StatsBoard.options(  # type: ignore[attr-defined]
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()
