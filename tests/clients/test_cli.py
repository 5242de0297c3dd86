"""`ftaas` driven as a user drives it, against a real API (tests/clients/conftest.py):
through a pipe (plain lines, byte for byte) and under a real terminal (tmux) for the
progress view, while the test plays the trainer."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from service.fine_tuning.launcher import LaunchState
from tests.clients.conftest import FTAAS, Finished, LiveServer
from tests.conftest import memorisation_jsonl
from training.progress import Failed, Metrics, Started, Succeeded

FOLLOW = ("--poll-interval", "0.1")


class Running:
    """`ftaas` in a subprocess whose stdout the test reads as it comes."""

    def __init__(self, server: LiveServer, *args: str) -> None:
        self.process = server.ftaas(*args)
        self.stdout = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for chunk in iter(lambda: self.process.stdout.read1(4096), b""):  # type: ignore[union-attr]
            self.stdout += chunk

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.stdout:
            assert self.process.poll() is None or self.reader.is_alive(), self.stdout
            assert time.monotonic() < deadline, f"{text!r} never shown: {self.stdout!r}"
            time.sleep(0.05)

    def finish(self, timeout: float = 30) -> Finished:
        assert self.process.stderr is not None
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return Finished(self.process.returncode, self.stdout, self.process.stderr.read())


def training_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(memorisation_jsonl())
    return path


def start_training(server: LiveServer, job_id: str, total_steps: int = 4) -> None:
    server.tick()  # validating_files → queued
    server.tick()  # queued → running
    log = server.trainer(job_id)
    log.write(Started(total_steps=total_steps, n_examples=12, trained_tokens=480))


def train_steps(server: LiveServer, job_id: str, steps: range, total_steps: int = 4) -> None:
    log = server.trainer(job_id)
    for step in steps:
        values = {"train_loss": 2.0 / step}
        if step % 2 == 0:
            values["valid_loss"] = 3.0 / step
        log.write(Metrics(step=step, total_steps=total_steps, elapsed_s=30.0 * step, **values))
    server.tick()


def succeed(server: LiveServer, job_id: str) -> str:
    server.trainer(job_id).write(Succeeded(adapter_dir="adapter"))
    server.ray.end(job_id)
    server.tick()
    model = server.sdk.fine_tuning.jobs.retrieve(job_id).fine_tuned_model
    assert model
    return model


def assert_plain(stream: bytes) -> None:
    assert b"\x1b" not in stream and b"\r" not in stream, stream


def test_create_follow_in_a_pipe_prints_plain_lines_and_the_model_last(
    server: LiveServer, tmp_path: Path
):
    running = Running(
        server,
        *("jobs", "create", "--model", "ftaas-tiny", "--suffix", "demo"),
        *("--training-file", str(training_file(tmp_path)), "--n-epochs", "2", "--follow"),
        *FOLLOW,
    )
    job_id = server.wait_for_job()
    start_training(server, job_id)
    train_steps(server, job_id, range(1, 3))
    running.wait_for("step 2/4")
    train_steps(server, job_id, range(3, 5))
    running.wait_for("step 4/4")
    model = succeed(server, job_id)
    done = running.finish()

    print(done.stdout.decode())  # what a CI log shows (pytest -s)
    assert done.returncode == 0, done.error
    assert_plain(done.stdout)
    assert_plain(done.stderr)
    lines = done.lines
    assert lines[-1] == model and re.fullmatch(r"ft:ftaas-tiny:local:demo:\w{8}", model)
    assert re.fullmatch(r"Uploaded train\.jsonl as file-\w+ \(\d+\.\d kB\): processed", lines[0])
    assert lines[1] == f"Created job {job_id} (validating_files)"
    assert "status: running" in lines and "Fine-tuning job started" in lines
    progress = [line for line in lines if line.startswith("running  step 2/4")]
    assert re.fullmatch(
        r"running  step 2/4  train loss 1\.0000  valid loss 1\.5000  "
        r"elapsed \d:\d\d:\d\d  ETA 0:0\d:\d\d",
        progress[0],
    ), progress
    last = [line for line in lines if line.startswith("running  step 4/4")]
    assert last and last[0].endswith("ETA 0:00:00"), last
    assert "status: succeeded" in lines and "The job has successfully completed" in lines
    job = server.sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.hyperparameters.n_epochs == 2  # the flag reached the job


def test_a_failed_job_exits_non_zero_with_its_error_on_stderr(server: LiveServer, tmp_path: Path):
    running = Running(
        server,
        *("jobs", "create", "--model", "ftaas-tiny", "--follow", *FOLLOW),
        *("--training-file", str(training_file(tmp_path))),
    )
    job_id = server.wait_for_job()
    start_training(server, job_id)
    train_steps(server, job_id, range(1, 2))
    running.wait_for("step 1/4")
    message = "The trainer ran out of memory at step 2"
    server.trainer(job_id).write(Failed(code="out_of_memory", message=message))
    server.ray.end(job_id, LaunchState.FAILED)
    server.tick()
    done = running.finish()

    assert done.returncode == 1
    assert_plain(done.stdout)
    assert "status: failed" in done.lines
    assert done.error == f"error: job {job_id} failed: {message} (code: out_of_memory)\n"


def test_following_a_job_that_is_cancelled_exits_3(server: LiveServer, tmp_path: Path):
    upload = server.sdk.files.create(file=training_file(tmp_path), purpose="fine-tune")
    job_id = server.sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=upload.id).id
    running = Running(server, "jobs", "follow", job_id, *FOLLOW)
    start_training(server, job_id)
    running.wait_for("status: running")
    server.sdk.fine_tuning.jobs.cancel(job_id)
    server.tick()
    done = running.finish()
    assert done.returncode == 3 and done.error == f"error: job {job_id} was cancelled\n"


def test_an_interrupted_follow_says_the_job_goes_on(server: LiveServer, tmp_path: Path):
    upload = server.sdk.files.create(file=training_file(tmp_path), purpose="fine-tune")
    job_id = server.sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=upload.id).id
    running = Running(server, "jobs", "follow", job_id, *FOLLOW)
    running.wait_for("status: validating_files")
    running.process.send_signal(signal.SIGINT)
    done = running.finish()
    assert done.returncode == 130
    assert done.error == f"error: stopped following; the job goes on (ftaas jobs follow {job_id})\n"
    assert server.sdk.fine_tuning.jobs.retrieve(job_id).status == "validating_files"


def test_a_file_that_does_not_validate_is_named_by_line_and_no_job_is_made(
    server: LiveServer, tmp_path: Path
):
    bad = tmp_path / "bad.jsonl"
    lines = memorisation_jsonl().decode().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}'
    bad.write_text("\n".join(lines) + "\n")
    done = server.run(
        "jobs", "create", "--model", "ftaas-tiny", "--training-file", str(bad), "--follow"
    )
    assert done.returncode == 1 and done.stdout == b""
    assert re.fullmatch(
        r"error: bad\.jsonl was uploaded as file-\w+ but did not validate: Invalid file: "
        r"line 3, field `messages\[1\]`: an assistant message needs content, .*\n",
        done.error,
    ), done.error
    assert "Traceback" not in done.error
    assert server.sdk.fine_tuning.jobs.list().data == []


def test_api_errors_are_one_line_with_message_param_and_code(server: LiveServer):
    done = server.run("jobs", "get", "ftjob-nonesuch")
    assert done.returncode == 1 and done.stdout == b""
    assert done.error.startswith("error: HTTP 404: ") and done.error.count("\n") == 1
    assert "ftjob-nonesuch" in done.error and "param: " in done.error
    assert "Traceback" not in done.error

    for chat in (("chat", "ftaas-tiny", "-m", "hi"), ("chat", "ftaas-tiny")):
        unserved = server.run(*chat, stdin="hi\n")  # serving is off in these tests
        assert unserved.returncode == 1 and unserved.stdout == b"", unserved.stdout
        assert re.fullmatch(r"error: HTTP 5\d\d: .+\n", unserved.error), unserved.error

    unreachable = subprocess.run(
        [FTAAS, "--base-url", "http://127.0.0.1:9", "--max-retries", "0", "models", "list"],
        capture_output=True,
        env=server.env(),
        timeout=60,
    )
    assert unreachable.returncode == 1
    assert unreachable.stderr.decode().startswith(
        "error: cannot reach the ftaas server at http://127.0.0.1:9/v1/"
    )


def test_bad_flags_are_refused_by_the_services_own_models_before_any_upload(
    server: LiveServer, tmp_path: Path
):
    path = str(training_file(tmp_path))
    create = ("jobs", "create", "--model", "ftaas-tiny", "--training-file", path)
    done = server.run(*create, "--n-epochs", "0")
    assert done.returncode == 2 and "--n-epochs: Input should be" in done.error
    done = server.run(*create, "--beta", "0.2")
    assert done.returncode == 2 and "--beta: not a hyperparameter of the supervised method" in (
        done.error
    )
    done = server.run(*create, "--suffix", "no spaces allowed")
    assert done.returncode == 2 and "--suffix: String should match pattern" in done.error
    assert server.sdk.files.list().data == []  # refused before anything was uploaded


def test_dpo_flags_reach_the_job(server: LiveServer, tmp_path: Path):
    from tests.conftest import preference_jsonl

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(preference_jsonl())
    done = server.run(
        *("jobs", "create", "--model", "ftaas-tiny", "--method", "dpo"),
        *("--training-file", str(pairs), "--beta", "0.25", "--rpo-alpha", "0"),
        *("--target-modules", "q_proj,v_proj", "--use-rslora"),
    )
    assert done.returncode == 0, done.error
    job_id = done.lines[-1]
    method = server.sdk.fine_tuning.jobs.retrieve(job_id).method
    assert method is not None and method.type == "dpo"
    hyperparameters = method.model_dump()["dpo"]["hyperparameters"]
    assert hyperparameters["beta"] == 0.25 and hyperparameters["rpo_alpha"] == 0
    assert hyperparameters["use_rslora"] is True


def test_files_jobs_and_events_listed_in_plain_columns(server: LiveServer, tmp_path: Path):
    uploaded = server.run("files", "upload", str(training_file(tmp_path)))
    assert uploaded.returncode == 0, uploaded.error
    file_id = uploaded.lines[-1]
    assert file_id.startswith("file-")
    listed = server.run("files", "list")
    assert_plain(listed.stdout)
    assert listed.lines[0] == "id\tfilename\tpurpose\tbytes\tstatus\tcreated"
    assert listed.lines[1].split("\t")[:5] == [
        file_id,
        "train.jsonl",
        "fine-tune",
        str(len(memorisation_jsonl())),
        "processed",
    ]
    created = server.run("jobs", "create", "--model", "ftaas-tiny", "--training-file", file_id)
    job_id = created.lines[-1]
    jobs = server.run("jobs", "list")
    assert jobs.lines[1].split("\t")[:4] == [job_id, "ftaas-tiny", "validating_files", "-"]
    events = server.run("jobs", "events", job_id)
    assert events.lines[0] == "created\tlevel\tmessage"
    assert events.lines[1].endswith(f"\tinfo\tCreated fine-tuning job: {job_id}")  # oldest first
    as_json = json.loads(server.run("jobs", "get", job_id).stdout)
    assert as_json["id"] == job_id and as_json["status"] == "validating_files"
    server.tick()
    cancelled = server.run("jobs", "cancel", job_id)
    assert cancelled.lines == [f"Job {job_id}: cancelled"]
    deleted = server.run("files", "delete", file_id)
    assert deleted.lines == [f"Deleted {file_id}"] and server.sdk.files.list().data == []


def test_an_adapter_imports_downloads_back_and_deletes(
    server: LiveServer, tmp_path: Path, tiny_model_dir: Path
):
    from tests.adapters import archive, random_adapter

    parts = server.parts
    base = parts["base_models"]["ftaas-tiny"]
    parts["models"].base_models["ftaas-tiny"] = base.model_copy(
        update={"path": str(tiny_model_dir)}
    )
    parts["files"].max_upload_bytes = 10_000_000
    folder = random_adapter(tiny_model_dir, tmp_path / "mine", seed=1, rank=4)
    tar = tmp_path / "mine.tar.gz"
    tar.write_bytes(archive(folder))

    imported = server.run(
        "models", "import", str(tar), "--base-model", "ftaas-tiny", "--suffix", "mine"
    )
    assert imported.returncode == 0, imported.error
    model = imported.lines[-1]
    assert model.startswith("ft:ftaas-tiny:local:mine:")
    assert model in server.run("models", "list").stdout.decode()

    target = tmp_path / "back.tar.gz"
    downloaded = server.run("models", "download", model, "-o", str(target))
    assert downloaded.returncode == 0, downloaded.error and downloaded.lines[-1] == str(target)
    with tarfile.open(target) as tar_file:
        names = {Path(name).name for name in tar_file.getnames()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names

    assert server.run("models", "delete", model).lines == [f"Deleted {model}"]
    gone = server.run("models", "download", model)
    assert gone.returncode == 1 and gone.error.startswith("error: HTTP 404: ")


def test_follow_under_a_terminal_draws_a_progress_bar_with_the_live_loss(
    server: LiveServer, tmp_path: Path
):
    socket = f"ftaas-cli-test-{threading.get_ident()}"
    tmux = ["tmux", "-L", socket]
    env = " ".join(
        f"{key}={shlex.quote(value)}"
        for key, value in server.env(TERM="xterm-256color").items()
        if key in ("HOME", "OPENAI_BASE_URL", "TERM", "PATH")
    )
    command = shlex.join(
        [
            FTAAS,
            *("jobs", "create", "--model", "ftaas-tiny", "--suffix", "tty"),
            *("--training-file", str(training_file(tmp_path)), "--follow", *FOLLOW),
        ]
    )
    script = f"env -i {env} {command}; echo EXIT=$?; sleep 600"
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", "120", "-y", "40", "-s", "cli", script], check=True
    )

    def screen(escapes: bool = False) -> str:
        flags = ["-p", "-e"] if escapes else ["-p"]
        return subprocess.run(
            [*tmux, "capture-pane", "-t", "cli", *flags], capture_output=True, text=True
        ).stdout

    def wait_for(pattern: str) -> str:
        deadline = time.monotonic() + 30
        while not re.search(pattern, shown := screen()):
            assert time.monotonic() < deadline, f"{pattern!r} never on screen:\n{shown}"
            time.sleep(0.1)
        return shown

    try:
        job_id = server.wait_for_job()
        start_training(server, job_id)
        train_steps(server, job_id, range(1, 3))
        shown = wait_for(r"2/4 +train loss 1\.0000  valid loss 1\.5000  elapsed")
        print(shown)
        bar = next(line for line in shown.splitlines() if "2/4" in line)
        assert bar.startswith("running") and "━" in bar and "ETA 0:0" in bar, bar
        assert "Uploaded train.jsonl as file-" in shown and "Fine-tuning job started" in shown
        assert "\x1b[" in screen(escapes=True)  # styled: rich drew it
        train_steps(server, job_id, range(3, 5))
        model = succeed(server, job_id)
        shown = wait_for("EXIT=")
        print(shown)
        lines = [line for line in shown.splitlines() if line.strip()]
        assert lines[-1] == "EXIT=0" and lines[-2] == model, shown
        assert any(line.startswith("succeeded") and "4/4" in line for line in lines), shown
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)


@pytest.mark.parametrize("settings", [{"admin_keys": "admin-key:acme"}], indirect=True)
def test_an_admin_makes_lists_and_revokes_keys(server: LiveServer):
    admin = ("--api-key", "admin-key")
    created = server.run(*admin, "keys", "create", "ci")
    assert created.returncode == 0, created.error
    key = created.lines[-1]
    assert key.startswith("sk-ftaas-") and created.lines[0].startswith("Created member key key_")
    key_id = created.lines[0].split()[3]
    listed = server.run(*admin, "keys", "list")
    assert_plain(listed.stdout)
    rows = [line.split("\t") for line in listed.lines[1:]]
    assert [row[1:3] for row in rows if row[0] == key_id] == [["ci", "member"]]
    assert key not in listed.stdout.decode()  # shown once only

    assert server.run("--api-key", key, "files", "list").returncode == 0
    assert server.run(*admin, "keys", "revoke", key_id).lines == [f"Revoked {key_id}"]
    refused = server.run("--api-key", key, "files", "list")
    assert refused.returncode == 1 and refused.error.startswith("error: HTTP 401: ")
    no_key = subprocess.run(
        [FTAAS, "files", "list"], capture_output=True, env=server.env(), timeout=60
    )
    assert no_key.returncode == 1 and no_key.stderr.startswith(b"error: HTTP 401: ")
