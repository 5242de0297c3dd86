"""Python graders in their sandbox: escapes tried, each scoring 0 with the right flag while
this process stays fine. Needs bubblewrap (`apt-get install bubblewrap`); without it the
sandbox refuses python graders, which the last tests check."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from training.graders import (
    Graders,
    PythonSandbox,
    SandboxLimits,
    SandboxUnavailable,
    parse_grader,
    sample_from_text,
)
from training.graders import sandbox as sandbox_module

LIMITS = SandboxLimits(timeout_s=3, memory_bytes=1024**3, disk_bytes=64 * 1024**2)


def _bubblewrap_works() -> str:
    try:
        PythonSandbox("bubblewrap", LIMITS).check()
    except SandboxUnavailable as error:
        return str(error)
    return ""


needs_bubblewrap = pytest.mark.skipif(bool(_bubblewrap_works()), reason=_bubblewrap_works())


def run(
    source: str, n: int = 1, sandbox: PythonSandbox | None = None, item: Any = None
) -> list[Any]:
    grader = parse_grader({"type": "python", "name": "p", "source": source})
    pairs = [(sample_from_text(f"answer {i}"), item or {"i": i}) for i in range(n)]
    box = sandbox or PythonSandbox("bubblewrap", LIMITS)
    return asyncio.run(Graders(sandbox=box).grade_many(grader, pairs))


def runtime_error(result: Any) -> str:
    assert result.reward == 0.0
    assert result.errors.python_grader_runtime_error, result
    return str(result.errors.python_grader_runtime_error_details)


@needs_bubblewrap
def test_a_grader_grades_a_batch_in_one_process() -> None:
    source = (
        "import numpy\n"
        "def grade(sample, item):\n"
        "    return float(numpy.float32(item['i'])) + len(sample['output_text']) / 100\n"
    )
    results = run(source, n=3)
    assert [r.reward for r in results] == [0.08, 1.08, 2.08]
    assert not any(r.errors.any for r in results)
    pid = run("import os\ndef grade(s, i):\n    return float(os.getpid())", n=2)
    assert pid[0].reward == pid[1].reward  # one process for the batch


@needs_bubblewrap
def test_the_state_folder_and_server_files_are_invisible(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "secrets").mkdir(parents=True)
    (home / "secrets" / "ray_auth_token").write_text("token")
    box = PythonSandbox("bubblewrap", LIMITS, hidden=[home])
    for path in [home / "secrets" / "ray_auth_token", Path(__file__), Path("/etc/passwd")]:
        source = f"def grade(s, i):\n    return len(open({str(path)!r}).read())\n"
        assert "No such file" in runtime_error(run(source, sandbox=box)[0])
    listing = "import os\ndef grade(s, i):\n    return float(len(os.listdir('/')))\n"
    assert run(listing, sandbox=box)[0].reward <= 12  # tmp dev proc sandbox usr root + links


@needs_bubblewrap
def test_a_state_folder_inside_a_bound_folder_is_masked() -> None:
    """FTAAS_HOME inside the virtual environment (bound read-only) is an empty folder."""
    inside = Path(sys.prefix) / "lib"
    box = PythonSandbox("bubblewrap", LIMITS, hidden=[inside])
    source = f"import os\ndef grade(s, i):\n    return float(len(os.listdir({str(inside)!r})))\n"
    assert run(source, sandbox=box)[0].reward == 0.0
    assert run(source)[0].reward > 0  # unmasked, it is there


@needs_bubblewrap
def test_the_servers_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTAAS_API_KEYS", "sk-server-secret:org")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-secret")
    source = (
        "import os\n"
        "def grade(s, i):\n"
        "    seen = ' '.join(f'{k}={v}' for k, v in os.environ.items())\n"
        "    return 1.0 if 'secret' in seen or 'FTAAS' in seen else 0.5\n"
    )
    assert run(source)[0].reward == 0.5


@needs_bubblewrap
def test_no_network_even_to_this_machine() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        source = (
            "import socket\n"
            "def grade(s, i):\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    return 1.0\n"
        )
        assert "Connection refused" in runtime_error(run(source)[0])
    dns = "import socket\ndef grade(s, i):\n    return len(socket.getaddrinfo('example.com', 80))\n"
    runtime_error(run(dns)[0])


@needs_bubblewrap
def test_a_fork_bomb_is_stopped() -> None:
    source = "import os\ndef grade(s, i):\n    while True:\n        os.fork()\n"
    results = run(source, n=2)
    for result in results:
        details = runtime_error(result)
        assert "Resource temporarily unavailable" in details or "time limit" in details


@needs_bubblewrap
def test_an_endless_loop_is_killed_and_the_batch_goes_on() -> None:
    source = "def grade(s, i):\n    while i['i'] == 1:\n        pass\n    return 1.0\n"
    results = run(source, n=3)
    assert results[0].reward == 1.0 and results[2].reward == 1.0
    assert "longer than 3 s" in runtime_error(results[1])


@needs_bubblewrap
def test_memory_and_disk_are_bounded() -> None:
    allocate = "def grade(s, i):\n    x = bytearray(10 * 1024**3)\n    return 1.0\n"
    assert "MemoryError" in runtime_error(run(allocate)[0])
    write = (
        "def grade(s, i):\n"
        "    with open('/tmp/big', 'wb') as f:\n"
        "        for _ in range(1000):\n"
        "            f.write(b'x' * 1024 * 1024)\n"
        "    return 1.0\n"
    )
    details = runtime_error(run(write)[0])
    assert "File too large" in details or "No space left" in details


# Writes a reply for a later request straight to the runner's protocol pipe.
FORGER = """import os
def grade(s, i):
    for fd in range(3, 8):
        try:
            os.write(fd, b'{"n": 2, "reward": 1.0}\\n')
        except OSError:
            pass
    return 1.0
"""


@needs_bubblewrap
@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def grade(s, i):\n    return float('nan')\n", "not a finite float"),
        ("def grade(s, i):\n    return 'a'\n", "returned str"),
        ("def grade(s, i):\n    return None\n", "returned NoneType"),
        ("def grade(s, i):\n    raise KeyError('oops')\n", "KeyError: 'oops'"),
        ("import sys\ndef grade(s, i):\n    sys.exit(3)\n", "SystemExit"),
        ("import os\ndef grade(s, i):\n    os._exit(3)\n", "exit code 3"),
        ("raise ValueError('at import')\ndef grade(s, i):\n    return 1.0\n", "at import"),
        (FORGER, "protocol"),
    ],
)
def test_garbage_and_crashes_score_zero(source: str, message: str) -> None:
    results = run(source, n=2)
    for result in results:
        assert message in runtime_error(result)


@needs_bubblewrap
def test_any_float_is_a_reward() -> None:
    assert run("def grade(s, i):\n    return 2.5\n")[0].reward == 2.5
    assert run("def grade(s, i):\n    return -3\n")[0].reward == -3.0
    assert run("def grade(s, i):\n    print('noise')\n    return 0.5\n")[0].reward == 0.5


def test_without_a_sandbox_python_graders_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: no bubblewrap, no python grader (unless the operator chose rlimits)."""
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda _name: None)
    box = PythonSandbox("bubblewrap", LIMITS)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        box.check()
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"ftaas-ran-{os.getpid()}"
    source = f"def grade(s, i):\n    open({str(marker)!r}, 'w').write('ran')\n    return 1.0\n"
    result = run(source, sandbox=box)[0]
    assert result.reward == 0.0 and result.errors.python_grader_server_error
    assert result.errors.python_grader_server_error_type == "sandbox_unavailable"
    assert "bubblewrap" in str(result.details) and not marker.exists()
    off = run(source, sandbox=PythonSandbox("off", LIMITS))[0]
    assert off.errors.python_grader_server_error and not marker.exists()


def test_the_weaker_rlimits_sandbox_runs_graders_or_says_why_not() -> None:
    """The operator's explicit weaker choice: limits, an empty environment and an
    unprivileged user. As root it needs the Python installation readable by that user
    (here pyenv under /root is not): it refuses, clearly, rather than running as root."""
    box = PythonSandbox("rlimits", LIMITS)
    try:
        box.check()
    except SandboxUnavailable as error:
        assert "readable by uid" in str(error)
        return
    assert run("def grade(s, i):\n    return 0.25\n", sandbox=box)[0].reward == 0.25
