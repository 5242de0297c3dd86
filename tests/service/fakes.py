"""A launcher that runs nothing: the reconciler's tests decide what Ray would answer."""

from __future__ import annotations

from collections.abc import Callable

from service.fine_tuning.launcher import (
    LauncherUnavailable,
    LaunchInfo,
    LaunchState,
    SubmissionExists,
)


class FakeLauncher:
    def __init__(self) -> None:
        self.states: dict[str, LaunchState] = {}
        self.submitted: list[str] = []
        self.envs: dict[str, dict[str, str]] = {}  # what each submission's runtime_env held
        self.stopped: list[str] = []
        self.unavailable = False
        # Called inside `submit`, before it returns: a test's chance to race it.
        self.during_submit: Callable[[str], None] | None = None
        self.refuse_submit: Exception | None = None

    def _answer(self) -> None:
        if self.unavailable:
            raise LauncherUnavailable("Ray's job API did not answer: connection refused")

    def submit(
        self, submission_id: str, storage_url: str, spec_key: str, env: dict[str, str]
    ) -> None:
        self._answer()
        if self.refuse_submit is not None:
            raise self.refuse_submit
        if submission_id in self.states:
            raise SubmissionExists(submission_id)
        self.states[submission_id] = LaunchState.RUNNING
        self.submitted.append(submission_id)
        self.envs[submission_id] = dict(env)
        if self.during_submit is not None:
            self.during_submit(submission_id)

    def info(self, submission_id: str) -> LaunchInfo:
        self._answer()
        return LaunchInfo(self.states.get(submission_id, LaunchState.UNKNOWN))

    def stop(self, submission_id: str) -> None:
        self._answer()
        self.stopped.append(submission_id)
        if self.states.get(submission_id, LaunchState.UNKNOWN).active:
            self.states[submission_id] = LaunchState.STOPPED

    def logs_tail(self, submission_id: str, lines: int = 20) -> str:
        return ""

    def tidy(self) -> None:
        pass

    def end(self, submission_id: str, state: LaunchState = LaunchState.SUCCEEDED) -> None:
        """The trainer's process exits (after its last record)."""
        self.states[submission_id] = state

    def alive(self) -> list[str]:
        return [sid for sid, state in self.states.items() if state.active]
