"""Start-up as a sequence of named steps, each failing with one line a user can act on.

`python -m service serve` runs the steps before it serves (bind the port, build the test
model, start or join Ray, open the job store). A failure prints which step failed, why, and
where the full log is, instead of a traceback, and exits non-zero.
"""

from __future__ import annotations

import fcntl
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.config import Settings

logger = logging.getLogger("ftaas")
# Tracebacks go to the log file only: the console gets the one-line StartupError.
trace_logger = logging.getLogger("ftaas.trace")
trace_logger.propagate = False


class StartupError(RuntimeError):
    """A start-up step failed; `str()` is the one message shown to the user."""

    def __init__(self, step: str, reason: str, log: Path | None = None):
        self.step, self.reason, self.log = step, reason, log
        where = f" (log: {log})" if log is not None else ""
        super().__init__(f"ftaas could not start: {step} failed: {reason}{where}")


def server_log(settings: Settings) -> Path:
    return settings.home / "logs" / "server.log"


def one_line(error: BaseException) -> str:
    """The most telling single line of an exception: its last non-empty line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


@contextmanager
def startup_step(step: str, settings: Settings) -> Iterator[None]:
    """Run one step; any error becomes a StartupError naming it (traceback to the log)."""
    logger.info("%s…", step)
    try:
        yield
    except StartupError:
        raise
    except Exception as error:
        trace_logger.error("%s failed", step, exc_info=True)
        raise StartupError(step, one_line(error), server_log(settings)) from error


@contextmanager
def one_at_a_time(settings: Settings) -> Iterator[None]:
    """Only one process prepares a FTAAS_HOME at a time (builds the test model, starts the
    embedded head, migrates the store). Another started beside it (`uvicorn --workers 2`,
    a second `serve` on the same home) waits here, then finds everything done and reuses
    it, instead of starting a second Ray head or building into the same folder."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "startup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def bind_port(settings: Settings) -> socket.socket:
    """Bind the API's port first, so that a taken port fails in a second, not after Ray."""
    with startup_step(f"binding {settings.host}:{settings.port}", settings):
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, settings.port))
        except OSError as error:
            sock.close()
            raise OSError(f"{error.strerror} (set PORT or FTAAS_PORT to use another)") from error
        sock.set_inheritable(True)
        return sock


def log_to_file(settings: Settings) -> Path:
    """Everything the server logs, tracebacks included, also goes to $FTAAS_HOME/logs."""
    path = server_log(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    trace_logger.addHandler(handler)
    return path
