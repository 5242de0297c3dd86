"""Training jobs as Ray jobs, through Ray's job submission API."""

from __future__ import annotations

import contextlib
import shlex
import sys
from typing import Any

# Ray's JobStatus values while a job still runs (any other status means it has ended).
RAY_ACTIVE = {"PENDING", "RUNNING"}


class RayJobs:
    def __init__(
        self, dashboard_url: str, python: str = sys.executable, env: dict[str, str] | None = None
    ):
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(dashboard_url)
        # The cluster's own `python` may lack our packages: name this interpreter.
        self.python = python
        # Variables every trainer gets (Ray's token authentication among them).
        self.env = env or {}

    def submit(self, submission_id: str, spec_path: str, env: dict[str, str]) -> None:
        self.client.submit_job(
            entrypoint=f"{shlex.quote(self.python)} -m training.entrypoint "
            f"{shlex.quote(spec_path)}",
            submission_id=submission_id,
            runtime_env={"env_vars": {**self.env, **env}},
            entrypoint_num_cpus=0,
        )

    def info(self, submission_id: str) -> Any | None:
        """Ray's JobDetails, or None when Ray does not know the job (its cluster restarted)."""
        try:
            return self.client.get_job_info(submission_id)
        except RuntimeError as error:
            if "does not exist" in str(error) or "404" in str(error):
                return None
            raise

    def stop(self, submission_id: str) -> None:
        with contextlib.suppress(RuntimeError):  # already gone: nothing left to stop
            self.client.stop_job(submission_id)

    def logs_tail(self, submission_id: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.client.get_job_logs(submission_id).splitlines()[-lines:])
        except RuntimeError:
            return ""
