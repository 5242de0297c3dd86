"""Training-file validation in a separate process.

Validation is CPU-bound Python (JSON and pydantic per line: about 16 s per GB here). In a
thread of the API process it would hold the interpreter lock that the event loop needs
to answer every other request, so a large upload would stall health checks and chat
streams; in its own process it costs the API nothing. The process starts on first use
(`spawn`: the API process runs Ray's threads, which must not be forked).
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor

from training.data.validation import ValidationReport, bounded_lines, validate_jsonl
from training.storage import open_store


def validate_stored(storage_url: str, key: str) -> ValidationReport:
    """Validate the object at `key`, streamed from the artifact store."""
    with open_store(storage_url).open(key) as stream:
        return validate_jsonl(bounded_lines(stream))


def validate_here(storage_url: str, key: str) -> ValidationReport:
    """In this process: the default, for tests and tools."""
    return validate_stored(storage_url, key)


class ProcessValidator:
    def __init__(self, processes: int = 1):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, storage_url: str, key: str) -> ValidationReport:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
            pool = self._pool
        return pool.submit(validate_stored, storage_url, key).result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
