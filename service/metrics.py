"""GET /metrics: what an operator's Prometheus scrapes, in its text format.

Each API process keeps its own registry (Prometheus scrapes each process, as it does each
replica of any service): the requests it answered, their time to first token and tokens,
the calls it has in flight to serving and the ones it turned away. At scrape time it adds
what is not its own: every serving replica's latest snapshot (serving/stats.py: requests
inside its engine, adapters registered, adapter cache hits, loads and evictions per tier)
and the job store's count of jobs by status. Trained tokens are counted by the process
that holds the scheduler lease, as it reads the trainers' progress.

Model names are labels: one series per base model and tuned model that was asked for,
which stays within what Prometheus handles for thousands of models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.db import Database, JobRow
from service.fine_tuning.lifecycle import JobStatus

logger = logging.getLogger(__name__)
# No `_created` series beside each counter: they double what is scraped and say little.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Status of a request whose client went away before its answer was sent (nginx's 499).
CLIENT_CLOSED = 499
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SPEED_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class ServerMetrics:
    """One API process's metrics; `render` gives the /metrics text."""

    def __init__(
        self,
        db: Database | None = None,
        read_replicas: Callable[[], list[dict[str, Any]]] | None = None,
    ):
        self.registry = CollectorRegistry()
        model = ["base_model", "model"]
        self.requests = Counter(
            "ftaas_requests",
            "Chat and completion requests, by status (499: the client went away)",
            [*model, "kind", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "ftaas_request_errors",
            "Requests answered with an error, or whose stream failed after it began",
            [*model, "type"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "ftaas_time_to_first_token_seconds",
            "From the engine taking a streamed request to its first token (a non-streamed "
            "answer arrives whole: see ftaas_request_duration_seconds)",
            model,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "ftaas_request_duration_seconds",
            "From the request reaching the API to its last byte (or its failure)",
            model,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "ftaas_generated_tokens", "Tokens generated", model, registry=self.registry
        )
        self.prompt_tokens = Counter(
            "ftaas_prompt_tokens", "Prompt tokens read", model, registry=self.registry
        )
        self.decode_speed = Histogram(
            "ftaas_decode_tokens_per_second",
            "Each request's tokens after the first, per second of generating them",
            model,
            buckets=SPEED_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ftaas_serving_requests_in_flight",
            "Requests this API process has sent to serving and not finished (queued for a "
            "replica or being answered)",
            ["base_model"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "ftaas_serving_rejected_requests",
            "Requests answered 429 because every replica and the queue for them were full",
            ["base_model"],
            registry=self.registry,
        )
        self.trained_tokens = Counter(
            "ftaas_trained_tokens",
            "Tokens trained on (examples × epochs), as trainers report their steps",
            ["base_model", "method"],
            registry=self.registry,
        )
        if read_replicas is not None:
            self.registry.register(ReplicaCollector(read_replicas))
        if db is not None:
            self.registry.register(JobCollector(db))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_answer(self, base_model: str, model: str, stats: dict[str, Any]) -> None:
        """What a replica measured of one answer (serving.engine.RequestMeter.summary)."""
        ttft = stats.get("time_to_first_token_s")
        if ttft is not None:
            self.time_to_first_token.labels(base_model, model).observe(ttft)
        self.generated_tokens.labels(base_model, model).inc(stats.get("output_tokens") or 0)
        self.prompt_tokens.labels(base_model, model).inc(stats.get("prompt_tokens") or 0)
        speed = stats.get("decode_tokens_per_s")
        if speed is not None:
            self.decode_speed.labels(base_model, model).observe(speed)


class ReplicaCollector(Collector):
    """Every live serving replica's latest snapshot, read when scraped."""

    def __init__(self, read: Callable[[], list[dict[str, Any]]]):
        self.read = read

    def collect(self) -> Iterator[Metric]:
        engine = GaugeMetricFamily(
            "ftaas_serving_engine_requests",
            "Requests inside a replica's engine, running or waiting for a batch slot",
            labels=["base_model", "replica"],
        )
        generated = CounterMetricFamily(
            "ftaas_serving_engine_generated_tokens",
            "Tokens a replica's engine generated, for answers sent, failed or abandoned",
            labels=["base_model", "replica"],
        )
        registered = GaugeMetricFamily(
            "ftaas_serving_adapters_registered",
            "Adapters registered with a replica's engine (its host memory and accelerator "
            "slots hold the most recently used of them)",
            labels=["base_model", "replica"],
        )
        events = CounterMetricFamily(
            "ftaas_adapter_cache_events",
            "Adapter cache hits, loads and evictions per replica and tier (registry: "
            "registered with the engine; disk: the replica's copy, loaded from the store)",
            labels=["base_model", "replica", "tier", "event"],
        )
        try:
            snapshots = self.read()
        except Exception:
            logger.warning("serving replicas' stats could not be read", exc_info=True)
            snapshots = []
        for snap in snapshots:
            labels = [snap["base_model"], snap["replica"]]
            engine.add_metric(labels, snap["engine_requests"])
            generated.add_metric(labels, snap.get("engine_generated_tokens", 0))
            registered.add_metric(labels, snap["adapters_registered"])
            counts = snap["events"]
            lookups, loads = counts.get("registry_lookups", 0), counts.get("registry_loads", 0)
            for tier, event, value in (
                ("registry", "hit", max(0, lookups - loads)),
                ("registry", "load", loads),
                ("registry", "eviction", counts.get("registry_evictions", 0)),
                ("disk", "hit", counts.get("disk_hits", 0)),
                ("disk", "load", counts.get("store_fetches", 0)),
                ("disk", "eviction", counts.get("disk_evictions", 0)),
            ):
                events.add_metric([*labels, tier, event], value)
        yield from (engine, generated, registered, events)


class JobCollector(Collector):
    """Fine-tuning jobs by status, counted in the job store when scraped."""

    def __init__(self, db: Database):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "ftaas_fine_tuning_jobs", "Fine-tuning jobs by status", labels=["status"]
        )
        try:
            with self.db.session() as session:
                rows = session.execute(
                    select(JobRow.status, func.count()).group_by(JobRow.status)
                ).all()
        except Exception:
            logger.warning("jobs could not be counted", exc_info=True)
            rows = []
        counts = {str(status): count for status, count in rows}
        for status in JobStatus:  # every status, zero too: a dashboard's series never vanish
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
