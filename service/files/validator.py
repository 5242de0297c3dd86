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
from pathlib import Path

from training.data.validation import ValidationReport, validate_jsonl_file


def validate_here(path: Path) -> ValidationReport:
    """In this process: the default, for tests and tools."""
    return validate_jsonl_file(str(path))


class ProcessValidator:
    def __init__(self, processes: int = 1):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> ValidationReport:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
            pool = self._pool
        return pool.submit(validate_jsonl_file, str(path)).result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
