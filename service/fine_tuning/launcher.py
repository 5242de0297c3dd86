"""The launcher: training attempts as Ray jobs, through Ray's job submission API.

Every call has a timeout, and its failures are typed: `LauncherUnavailable` when Ray does
not answer (the scheduler waits for it, failing nothing), `LaunchState.UNKNOWN` when Ray
answers that it does not know a submission (its cluster restarted, or the submission
never arrived), `SubmissionExists` when a submission id is already taken (adopt it).
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0


class LaunchState(StrEnum):
    """Ray's JobStatus values, and UNKNOWN for a submission Ray does not know."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"

    @property
    def active(self) -> bool:
        return self in (LaunchState.PENDING, LaunchState.RUNNING)


@dataclass(frozen=True)
class LaunchInfo:
    state: LaunchState
    message: str = ""


class LauncherUnavailable(RuntimeError):
    """Ray's job API did not answer (in time): nothing can be learned or changed now."""


class SubmissionExists(RuntimeError):
    """Ray already has a job with this submission id (an earlier try reached it)."""


class Launcher(Protocol):
    def submit(
        self, submission_id: str, storage_url: str, spec_key: str, env: dict[str, str]
    ) -> None: ...
    def info(self, submission_id: str) -> LaunchInfo: ...
    def stop(self, submission_id: str) -> None: ...
    def logs_tail(self, submission_id: str, lines: int = 20) -> str: ...
    def tidy(self) -> None:
        """Asked once per scheduler tick: whatever upkeep the launcher needs."""


def training_package() -> str:
    """The folder of the `training` package, shipped with every job (Ray's `py_modules`),
    so the trainer runs this service's version of the code on any node."""
    import training

    return str(Path(training.__file__).parent)


class RayLauncher:
    def __init__(
        self,
        dashboard_url: str,
        env: dict[str, str] | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ):
        self.client = _client_with_timeout(dashboard_url, timeout_s)
        # Variables every trainer gets (Ray's token authentication among them).
        self.env = env or {}

    def submit(
        self, submission_id: str, storage_url: str, spec_key: str, env: dict[str, str]
    ) -> None:
        # The cluster's `python` (its image, or the embedded head's virtualenv): the code
        # of the `training` package comes with the job, its dependencies with the image.
        entrypoint = shlex.join(["python", "-m", "training.entrypoint", storage_url, spec_key])
        runtime_env = self.trainer_runtime_env(env)
        response = self._request(
            "POST",
            "/api/jobs/",
            json_data={
                "entrypoint": entrypoint,
                "submission_id": submission_id,
                "runtime_env": runtime_env,
                "entrypoint_num_cpus": 0,
            },
        )
        if response.status_code == 200:
            return
        if "already exists" in response.text:  # Ray's 400 for a taken submission id
            raise SubmissionExists(submission_id)
        raise RuntimeError(f"Ray refused the job ({response.status_code}): {response.text}")

    def trainer_runtime_env(self, env: dict[str, str]) -> dict[str, Any]:
        """A trainer's runtime_env: its variables, and the `training` package uploaded to
        the cluster (once per version: content-addressed) and named by its URI."""
        runtime_env: dict[str, Any] = {
            "env_vars": {**self.env, **env},
            "py_modules": [training_package()],
        }
        try:
            self.client._upload_py_modules_if_needed(runtime_env)
        except Exception as error:
            raise LauncherUnavailable(f"could not upload the training code: {error}") from error
        return runtime_env

    def info(self, submission_id: str) -> LaunchInfo:
        response = self._request("GET", f"/api/jobs/{submission_id}")
        if response.status_code == 404:
            return LaunchInfo(LaunchState.UNKNOWN, "Ray does not know this job")
        if response.status_code != 200:
            raise LauncherUnavailable(f"Ray answered {response.status_code}: {response.text}")
        details = response.json()
        return LaunchInfo(LaunchState(details["status"]), details.get("message") or "")

    def stop(self, submission_id: str) -> None:
        response = self._request("POST", f"/api/jobs/{submission_id}/stop")
        if response.status_code not in (200, 404):  # 404: nothing left to stop
            raise LauncherUnavailable(f"Ray answered {response.status_code}: {response.text}")

    def tidy(self) -> None:
        pass  # Ray cleans up after its jobs

    def logs_tail(self, submission_id: str, lines: int = 20) -> str:
        try:
            response = self._request("GET", f"/api/jobs/{submission_id}/logs")
        except LauncherUnavailable:
            return ""
        if response.status_code != 200:
            return ""
        return "\n".join(response.json().get("logs", "").splitlines()[-lines:])

    def _request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        import requests

        try:
            return self.client._do_request(method, endpoint, **kwargs)
        except requests.RequestException as error:
            raise LauncherUnavailable(f"Ray's job API did not answer: {error}") from error


def _client_with_timeout(dashboard_url: str, timeout_s: float) -> Any:
    """Ray's own job client (auth headers, cookies, TLS), with a timeout on every call:
    its public methods have none, so a hung dashboard would hang the scheduler."""
    from ray.job_submission import JobSubmissionClient

    class TimedJobSubmissionClient(JobSubmissionClient):  # type: ignore[misc]
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return TimedJobSubmissionClient(dashboard_url)
