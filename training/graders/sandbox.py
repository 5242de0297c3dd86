"""Python graders run here: a separate process, in a bubblewrap sandbox, with OpenAI's
limits (shared/reference/openai-rft-and-webhooks.md, sections 1.3 and 6).

The sandbox process gets an explicit minimal environment (none of the server's
variables: no API keys, Ray token or database URL), a new mount namespace holding only
the Python installation read-only and a private size-limited /tmp (none of the server's
files or state folder), no network (its own empty network namespace), its own PID
namespace, and limits set before the grader's code runs (sandbox_runner.py): memory,
file size, processes, CPU seconds and cores. Each grade has its own wall-clock limit;
one process grades a whole batch and is started again only after a grade that timed
out or killed it.

When bubblewrap cannot make a sandbox, python graders are refused (fail closed), unless
the operator chose the weaker `rlimits` sandbox: the same process, environment and
limits, an unprivileged user when the server is root, but the host's file system and
network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

SandboxKind = Literal["bubblewrap", "rlimits", "off"]
RUNNER = Path(__file__).with_name("sandbox_runner.py")
# Answers longer than this (a grader writing to the protocol itself) end the process.
MAX_LINE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """OpenAI's limits for one python grader, by default."""

    timeout_s: float = 120.0  # wall clock per grade
    memory_bytes: int = 2 * 1024**3  # RLIMIT_AS of the grader's process
    disk_bytes: int = 1024**3  # the private /tmp, and RLIMIT_FSIZE
    processes: int = 32  # RLIMIT_NPROC (threads count): no fork bomb
    cpus: int = 2  # cores the process may run on
    uid: int = 65534  # who a root server's sandbox runs as (nobody)


class SandboxUnavailable(RuntimeError):
    """No sandbox can be made here; python graders are refused."""


@dataclass
class PythonOutcome:
    """One grade: a reward, or what went wrong (`server`: the sandbox, `runtime`: the
    grader's code)."""

    reward: float = 0.0
    error: Literal["server", "runtime"] | None = None
    details: str | None = None
    seconds: float = 0.0


def _safe_env(home: str = "/tmp") -> dict[str, str]:
    # Nothing of the server's environment: only what Python and numeric libraries need.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _ancestors(path: Path) -> list[Path]:
    return [p for p in reversed(path.parents) if p != Path("/")]


class PythonSandbox:
    """Runs python graders' `grade(sample, item)` calls in batches, one process per
    batch (started again after a grade that timed out or crashed it)."""

    def __init__(
        self,
        kind: SandboxKind = "bubblewrap",
        limits: SandboxLimits | None = None,
        hidden: Sequence[Path] = (),
    ):
        self.kind = kind
        self.limits = limits or SandboxLimits()
        # Folders that must stay out of sight even when inside a bound one (FTAAS_HOME).
        self.hidden = [Path(p).resolve() for p in hidden]
        self._checked: str | None = None

    # --- can a sandbox be made here?
    def check(self) -> None:
        """Raise SandboxUnavailable, with the reason, when no sandbox can be made."""
        if self._checked is None:
            self._checked = self._probe()
        if self._checked:
            raise SandboxUnavailable(self._checked)

    def _probe(self) -> str:
        if self.kind == "off":
            return "python graders are turned off on this server (FTAAS_PYTHON_GRADER_SANDBOX=off)"
        weaker = (
            "set FTAAS_PYTHON_GRADER_SANDBOX=rlimits to accept a weaker sandbox (limits, an "
            "empty environment and a separate user, but the host's files and network)"
        )
        if self.kind == "bubblewrap" and shutil.which("bwrap") is None:
            return (
                "python graders need bubblewrap (`bwrap`), which is not installed on this "
                f"server; install it, or {weaker}"
            )
        # One real grade, through the runner, as every grade will go.
        source = "import datetime, json\ndef grade(sample, item):\n    return 1.0\n"
        lines = [{"n": 0, "source": source}, {"n": 1, "sample": {}, "item": {}}]
        scratch = self._scratch()
        try:
            done = subprocess.run(
                self._command(scratch, self._runner_args(1)),
                input="".join(json.dumps(line) + "\n" for line in lines).encode(),
                env=self._env(scratch),
                cwd=scratch,
                capture_output=True,
                timeout=60,
                check=False,
            )
            answer = done.stdout.decode(errors="replace")
            reason = (done.stderr.decode(errors="replace").strip() or answer)[-500:]
        except (OSError, subprocess.TimeoutExpired) as error:
            answer, reason = "", str(error)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if '"reward": 1.0' in answer:
            return ""
        if self.kind == "bubblewrap":
            return (
                f"bubblewrap could not make a sandbox here ({reason or 'no answer'}); user "
                f"namespaces may be unavailable to this container. Install what is missing, or "
                f"{weaker}"
            )
        return (
            f"the rlimits sandbox could not run a grader ({reason or 'no answer'}); the "
            f"Python installation ({sys.base_prefix}) must be readable by uid "
            f"{self.limits.uid} when the server runs as root"
        )

    def _env(self, scratch: Path) -> dict[str, str]:
        return _safe_env("/tmp" if self.kind == "bubblewrap" else str(scratch))

    def _scratch(self) -> Path:
        """A private working folder (the rlimits sandbox's; bubblewrap's /tmp is its own)."""
        scratch = Path(tempfile.mkdtemp(prefix="ftaas-grader-"))
        if self.kind == "rlimits" and os.geteuid() == 0:
            os.chown(scratch, self.limits.uid, self.limits.uid)
        return scratch

    # --- the sandbox's command line
    def _command(self, scratch: Path, python_args: list[str]) -> list[str]:
        python = [sys.executable, "-I", *python_args]
        if self.kind == "rlimits":
            return python
        args = ["bwrap", "--die-with-parent", "--new-session"]
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        args += ["--unshare-cgroup-try", "--ro-bind", "/usr", "/usr"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64"):
            path = Path("/") / top
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        # The private /tmp first: a Python installation under /tmp (a clone there) is then
        # bound over it, not hidden by it.
        args += ["--perms", "1777", "--size", str(self.limits.disk_bytes), "--tmpfs", "/tmp"]
        made: set[Path] = {Path("/tmp")}
        roots = sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix)})
        for root in roots:
            if root.is_relative_to("/usr"):
                continue
            for parent in _ancestors(root):
                if parent not in made:  # readable by the unprivileged user
                    args += ["--perms", "0755", "--dir", str(parent)]
                    made.add(parent)
            args += ["--ro-bind", str(root), str(root)]
        for hidden in self.hidden:
            if any(hidden.is_relative_to(root) for root in [Path("/usr"), *roots]):
                args += ["--tmpfs", str(hidden)]  # an empty folder over it
        args += ["--ro-bind", str(RUNNER), "/sandbox/runner.py"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--chdir", "/tmp"]
        if os.geteuid() == 0:  # the runner drops to an unprivileged user itself
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return args + python

    def _runner_args(self, grades: int) -> list[str]:
        runner = "/sandbox/runner.py" if self.kind == "bubblewrap" else str(RUNNER)
        cpu_s = math.ceil(self.limits.timeout_s) * max(1, grades) + 5
        limits = {**asdict(self.limits), "cpu_s": cpu_s}
        return [runner, json.dumps(limits)]

    # --- grading
    async def grade_many(
        self, source: str, pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]
    ) -> list[PythonOutcome]:
        """`grade(sample, item)` for each pair, in order; never raises for the grader's
        faults (they are outcomes), SandboxUnavailable aside."""
        await asyncio.to_thread(self.check)
        outcomes: list[PythonOutcome] = []
        while len(outcomes) < len(pairs):
            outcomes += await self._one_process(source, pairs[len(outcomes) :])
        return outcomes

    async def _one_process(
        self, source: str, pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]
    ) -> list[PythonOutcome]:
        """Grades from the first pair on until all are done or one ends the process
        (that one's outcome is the last returned)."""
        scratch = self._scratch()
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._command(scratch, self._runner_args(len(pairs))),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=self._env(scratch),
                    cwd=scratch,
                    start_new_session=True,  # its whole group is killed after
                    limit=MAX_LINE_BYTES,
                )
            except OSError as error:
                return [
                    PythonOutcome(error="server", details=f"the sandbox did not start: {error}")
                ]
            stderr = asyncio.ensure_future(_tail(process.stderr))
            try:
                return await self._converse(process, source, pairs, stderr)
            finally:
                _kill_group(process)
                await process.wait()
                stderr.cancel()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _converse(
        self,
        process: asyncio.subprocess.Process,
        source: str,
        pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
        stderr: asyncio.Future[str],
    ) -> list[PythonOutcome]:
        assert process.stdin is not None and process.stdout is not None
        timeout = self.limits.timeout_s
        started = time.monotonic()
        reply = await self._exchange(process, {"n": 0, "source": source}, timeout, stderr)
        if reply.get("ready") is not True:
            # The source does not load: every pair fails the same way.
            failed = _outcome(reply, time.monotonic() - started)
            return [failed for _ in pairs]
        outcomes = []
        for number, (sample, item) in enumerate(pairs, start=1):
            started = time.monotonic()
            request = {"n": number, "sample": sample, "item": item}
            reply = await self._exchange(process, request, timeout, stderr)
            outcomes.append(_outcome(reply, time.monotonic() - started))
            if reply.get("ended"):
                break
        return outcomes

    async def _exchange(
        self,
        process: asyncio.subprocess.Process,
        message: dict[str, Any],
        timeout: float,
        stderr: asyncio.Future[str],
    ) -> dict[str, Any]:
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write((json.dumps(message) + "\n").encode())
            await process.stdin.drain()
            line = await asyncio.wait_for(process.stdout.readline(), timeout)
        except TimeoutError:
            return {"ended": True, "error": f"grade took longer than {timeout:g} s (time limit)"}
        except (BrokenPipeError, ConnectionResetError, ValueError) as error:
            line, reason = b"", str(error)
        else:
            reason = ""
        if line:
            try:
                reply = json.loads(line)
            except ValueError:
                reply = None
            if isinstance(reply, dict) and reply.get("n") == message["n"]:
                return reply
            return {"ended": True, "error": "the grader wrote to the sandbox's protocol"}
        _kill_group(process)
        code = await process.wait()
        why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        with contextlib.suppress(asyncio.TimeoutError):
            tail = await asyncio.wait_for(asyncio.shield(stderr), 1)
            reason = tail or reason
        return {"ended": True, "error": f"the grader's process ended ({why}): {reason}"[-2000:]}


def _outcome(reply: dict[str, Any], seconds: float) -> PythonOutcome:
    if "reward" in reply:
        return PythonOutcome(reward=float(reply["reward"]), seconds=seconds)
    return PythonOutcome(error="runtime", details=str(reply.get("error")), seconds=seconds)


async def _tail(stream: asyncio.StreamReader | None, keep: int = 2000) -> str:
    """The last `keep` characters the process wrote to stderr (read as it goes, so a
    chatty grader never blocks on a full pipe)."""
    kept = b""
    while stream is not None:
        chunk = await stream.read(65536)
        if not chunk:
            break
        kept = (kept + chunk)[-keep:]
    return kept.decode(errors="replace").strip()


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """The sandbox's process group, only while its leader has not been reaped: once it
    has, its pid (the group's id) may be another process's, whose group this would kill
    (seen: a test run beside the grader tests killed whole)."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
