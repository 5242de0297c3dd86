"""The reconciler: steps every open job through the state table in `lifecycle`, once a tick.

Each state has one handler. A handler reads what it needs from the launcher (Ray) and the
trainer channel, then writes what it learned in one transaction; the job's version column
makes that write a compare-and-set, so a job that the API changed meanwhile (a cancel, a
pause) is left as the API made it and looked at again next tick. Starting an attempt is
two transactions around the launch: the intent (attempt, submission id, folder) is
committed first, so a crash in between is finished by the next tick, never repeated.

A handler that raises is retried next tick; after MAX_STEP_FAILURES in a row the job fails
with `internal_error` instead of being retried forever. Ray not answering fails nothing:
the tick reports it and the jobs wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from service.config import BaseModelConfig, Settings
from service.db import CheckpointRow, Database, EventRow, FileRow, JobRow, now
from service.fine_tuning.admission import Admission
from service.fine_tuning.attempt_store import AttemptStore
from service.fine_tuning.attempts import (
    Attempt,
    JobCannotStart,
    method_of,
    next_attempt,
    resolve_hyperparameters,
    training_spec,
)
from service.fine_tuning.events import add_event, metrics_message
from service.fine_tuning.launcher import (
    Launcher,
    LauncherUnavailable,
    LaunchInfo,
    LaunchState,
    SubmissionExists,
)
from service.fine_tuning.lease import LeaseLost
from service.fine_tuning.lifecycle import (
    TERMINAL,
    TRAINER_MAY_BE_ALIVE,
    JobStatus,
    transition,
)
from service.fine_tuning.registry import ModelRegistry, PrunedCheckpoint, ReadyModel
from service.metrics import ServerMetrics
from service.models.adapters import engine_base
from service.organization.secrets import WANDB, OrganizationSecrets
from serving.servable import Unservable, servable
from training.methods import METHODS
from training.progress import (
    Checkpoint,
    Evaluation,
    Failed,
    Metrics,
    Notice,
    Outcome,
    Paused,
    ProgressBatch,
    Started,
    Succeeded,
    without_server_paths,
)
from training.spec import checkpoint_adapter_key, spec_key
from training.storage import ArtifactStore

logger = logging.getLogger(__name__)

MAX_STEP_FAILURES = 10
# Runs of one job the scheduler starts again by itself because Ray lost it (a cluster
# gone); past this the job fails, since a job that takes its cluster down with it would
# otherwise take it down forever. A user's resumes are not counted.
MAX_LOST_RUNS = 3
# An attempt Ray runs (or holds pending) that has written nothing this long, not even its
# first record, is almost always waiting for resources the cluster does not have free (a
# GPU, or `training_worker_resources`): the user is told once, since nothing else moves.
NOT_STARTED_WARN_S = 600
# Ray must still not know a running job this long after it was first seen not to (one
# answer from a head that is restarting is not the job lost).
LOST_AFTER_S = 10
# An attempt submitted to another Ray cluster (an upgrade's old one, still training) is
# unknown to this cluster's Ray by nature: it is followed through the store, and taken
# for lost only once it has written nothing for this long (its cluster is gone).
FOREIGN_SILENT_S = 600
S = JobStatus


@dataclass
class TickReport:
    """What one tick did and what went wrong: nothing is swallowed silently."""

    ready: list[ReadyModel] = field(default_factory=list)
    # Jobs whose files were validated: queued now, they may start on a tick right away.
    queued: list[str] = field(default_factory=list)
    pruned: list[PrunedCheckpoint] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # job id → the step's exception
    conflicts: list[str] = field(default_factory=list)  # changed by another writer meanwhile
    launcher_unavailable: str | None = None
    lease_lost: bool = False  # another process schedules now: the tick stopped


def fail(session: Session, job: JobRow, code: str, message: str, param: str | None) -> None:
    # The one way a job fails: whatever the cause, the tenant sees no server path.
    message = without_server_paths(message)
    transition(job, S.FAILED)
    job.error = {"code": code, "message": message, "param": param}
    add_event(session, job, message, level="error")


class Reconciler:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        base_models: dict[str, BaseModelConfig],
        store: ArtifactStore,
        launcher: Launcher,
        attempt_store: AttemptStore | None = None,
        use_gpu: Callable[[], bool] = lambda: False,
        clock: Callable[[], int] = now,
        metrics: ServerMetrics | None = None,
        model_ready: Callable[[str], bool] = lambda model_id: True,
        cluster_id: str = "local",
    ):
        self.db = db
        # The Ray cluster `launcher` submits to: recorded with each attempt.
        self.cluster_id = cluster_id
        # Set for a tick by its caller: checks the scheduler lease in every write's
        # transaction (service/fine_tuning/lease.py), raising LeaseLost once it is gone.
        self._fence: Callable[[Session], None] | None = None
        self.metrics = metrics
        # An embedded base model is built in the background: its jobs wait in the queue.
        self.model_ready = model_ready
        self.settings = settings
        self.base_models = base_models
        self.store = store
        self.launcher = launcher
        # What the state machine hands off: the attempts' folders (the trainer channel),
        # the models a job makes, and which jobs may start.
        self.attempt_store = attempt_store or AttemptStore(store)
        self.registry = ModelRegistry(store)
        self.admission = Admission(settings)
        # Asked for each attempt as it starts: an autoscaling cluster may gain (or lose)
        # its GPU nodes while the service runs.
        self.use_gpu = use_gpu
        self.clock = clock
        self._pruned: list[PrunedCheckpoint] = []  # by the job being stepped
        # Calls to Ray the step being taken decided on, made once its transaction has
        # committed: never while a write transaction (SQLite's only writer lock, a job
        # row's lock on PostgreSQL) waits on Ray (review L3).
        self._after_commit: list[Callable[[], None]] = []
        self._trained_tokens: list[tuple[str, str, float]] = []  # (model, method, tokens)
        self._queued_now: list[str] = []
        self._warned_waiting: set[str] = set()
        # job → (attempt, when first seen running with no record of it, warned yet); in
        # memory: a restarted scheduler only starts counting again.
        self._silent_since: dict[str, tuple[int, int, bool]] = {}
        # Whether the records the step being taken applied hold a Paused one.
        self._paused_seen = False
        self._handlers: dict[JobStatus, Callable[[str], ReadyModel | None]] = {
            S.VALIDATING_FILES: self._validating_files,
            S.QUEUED: self._queued,
            S.STARTING: self._starting,
            S.RUNNING: self._running,
            S.PAUSING: self._winding_down,
            S.RESUMING: self._winding_down,
            S.CANCELLING: self._cancelling,
        }

    # --- the tick
    def tick(
        self,
        keep_lease: Callable[[], bool] | None = None,
        fence: Callable[[Session], None] | None = None,
    ) -> TickReport:
        """One step of every open job. `keep_lease`: asked before each job; once it says
        the scheduler's lease is lost, the tick stops (another process schedules).
        `fence`: run inside every write's transaction; it raises LeaseLost (the write
        rolls back and the tick stops) once another process holds the lease."""
        self._fence = fence
        try:
            return self._tick(keep_lease)
        finally:
            self._fence = None

    def _step(
        self,
        job_id: str,
        status: str,
        failures: int,
        handler: Callable[[str], ReadyModel | None],
        report: TickReport,
    ) -> None:
        """One job's step, and what it learned added to `report`."""
        self._pruned, self._trained_tokens, self._after_commit = [], [], []
        self._queued_now = []
        try:
            ready = handler(job_id)
        except LeaseLost:
            raise
        except LauncherUnavailable as error:  # Ray's fault, not the job's: it waits
            report.launcher_unavailable = str(error)
            self._warn_waiting(job_id)
            return
        except StaleDataError:  # another writer changed the job first: look again
            report.conflicts.append(job_id)
            return
        except Exception as error:
            logger.exception("could not step job %s (%s)", job_id, status)
            report.errors[job_id] = f"{type(error).__name__}: {error}"
            self._count_failure(job_id, error)
            return
        report.pruned += self._pruned  # unlisted for good: the step has committed
        report.queued += self._queued_now
        for call in self._after_commit:
            try:
                call()
            except Exception:  # Ray is asked again next tick where it still matters
                logger.warning("job %s: a call to Ray after the step failed", job_id, exc_info=True)
        for model, method, tokens in self._trained_tokens:
            assert self.metrics is not None
            self.metrics.trained_tokens.labels(model, method).inc(tokens)
        if failures:
            self._reset_failures(job_id)
        if ready is not None:
            report.ready.append(ready)

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        """A transaction of the scheduler: fenced by the lease when the tick is."""
        with self.db.session() as session:
            yield session
            if self._fence is not None:
                self._fence(session)

    def _tick(self, keep_lease: Callable[[], bool] | None) -> TickReport:
        report = TickReport()
        with self.db.session() as session:
            open_jobs = self.admission.in_turn(session)
        full = False
        for job_id, status, failures, _ in open_jobs:
            handler = self._handlers.get(JobStatus(status))
            if handler is None:  # paused: waits for the user
                continue
            if keep_lease is not None and not keep_lease():
                report.lease_lost = True
                logger.warning("the scheduler lease was lost mid-tick: stopping the tick")
                break
            if status == S.QUEUED:
                # Queued jobs come last: once the slots are full, none of the rest can start
                # this tick, and the tick costs nothing more for a long queue.
                full = full or self._slots_full()
                if full:
                    break
            try:  # every write of the step is fenced: its warnings and counts too
                self._step(job_id, status, failures, handler, report)
            except LeaseLost:
                report.lease_lost = True
                logger.warning("the scheduler lease was taken over: stopping the tick")
                break
        try:
            self.launcher.tidy()
        except LauncherUnavailable as error:
            report.launcher_unavailable = report.launcher_unavailable or str(error)
        except Exception:
            logger.warning("the launcher's upkeep failed", exc_info=True)
        if report.launcher_unavailable:
            logger.warning("Ray's job API is not answering: %s", report.launcher_unavailable)
        else:
            self._warned_waiting.clear()  # the outage is over; warn again on the next one
        return report

    def _warn_waiting(self, job_id: str) -> None:
        """One warn event per job and outage, so a user sees why the job does not move."""
        if job_id in self._warned_waiting:
            return
        self._warned_waiting.add(job_id)
        try:
            with self._session() as session:
                job = session.get(JobRow, job_id)
                if job is not None:
                    message = "Ray's job API is not answering; the job waits until it does"
                    add_event(session, job, message, level="warn")
        except StaleDataError:
            pass

    def _count_failure(self, job_id: str, error: Exception) -> None:
        # A tenant reads it: Ray's answers name the entrypoint and the store's URL.
        first_line = str(error).splitlines()[0] if str(error) else ""
        reason = without_server_paths(f"{type(error).__name__}: {first_line}")
        stop: str | None = None
        with self._session() as session:
            job = session.get(JobRow, job_id)
            if job is None or JobStatus(job.status) in TERMINAL:
                return
            job.step_failures += 1
            if job.step_failures == 1:
                add_event(
                    session, job, f"The scheduler hit an error ({reason}); retrying", level="warn"
                )
            if job.step_failures < MAX_STEP_FAILURES:
                return
            if JobStatus(job.status) in TRAINER_MAY_BE_ALIVE:
                stop = job.ray_submission_id
            if job.status == S.CANCELLING:
                transition(job, S.CANCELLED)
            else:
                message = (
                    f"The job could not be scheduled: {MAX_STEP_FAILURES} tries in a row "
                    f"failed ({reason[:300]})"
                )
                fail(session, job, "internal_error", message, None)
        if stop:
            self.stop(stop)

    def _reset_failures(self, job_id: str) -> None:
        try:
            with self._session() as session:
                job = session.get(JobRow, job_id)
                if job is not None:
                    job.step_failures = 0
        except StaleDataError:
            pass  # changed meanwhile; the next successful step resets it

    # --- validating_files → queued | failed
    def _validating_files(self, job_id: str) -> None:
        with self._session() as session:
            job = self._job(session, job_id, S.VALIDATING_FILES)
            if job is None:
                return
            if job.model not in self.base_models:
                return fail(session, job, *self._model_gone(job))
            method = METHODS[method_of(job)]
            for param, file_id, row in _job_files(session, job):
                if row is None:
                    message = f"File {file_id} was deleted"
                    return fail(session, job, "invalid_file", message, param)
                if row.status == "error":
                    message = f"Invalid {param} {file_id}: {row.status_details}"
                    return fail(session, job, f"invalid_{param}", message, param)
                if row.data_format not in method.formats:
                    message = (
                        f"{param} {file_id} holds {row.data_format} examples; the "
                        f"{method.name} method needs {method.formats_described} examples"
                    )
                    return fail(session, job, f"invalid_{param}", message, param)
                least = method.min_examples
                if param == "training_file" and (row.n_examples or 0) < least:
                    message = (
                        f"Training file has {row.n_examples} example(s), "
                        f"but must have at least {least} examples"
                    )
                    return fail(session, job, "invalid_n_examples", message, param)
            transition(job, S.QUEUED)
            add_event(session, job, "Files validated, moving job to queued state")
        self._queued_now.append(job_id)
        return None

    # --- queued → starting (the intent, committed) → running
    def _queued(self, job_id: str) -> None:
        with self._session() as session:
            job = self._job(session, job_id, S.QUEUED)
            if job is None or not self.model_ready(job.model):
                return
            if self.admission.slots_full(session):
                return
            try:
                self._commit_intent(session, job)
            except JobCannotStart as cannot:
                return fail(session, job, cannot.code, cannot.message, cannot.param)
        self._starting(job_id)  # launch in the same tick
        return None

    def _commit_intent(self, session: Session, job: JobRow) -> None:
        base = self.base_models.get(job.model)
        if base is None:
            raise JobCannotStart(*self._model_gone(job))
        files: dict[str, tuple[str, str | None]] = {}
        n_examples = 0
        for param, file_id, row in _job_files(session, job):
            if row is None:
                raise JobCannotStart(
                    f"invalid_{param}",
                    f"The {param.replace('_', ' ')} {file_id} was deleted before the job "
                    "could start",
                    param,
                )
            files[param] = (row.blob_key, row.data_format)
            if param == "training_file":
                n_examples = row.n_examples or 0
        hyperparameters = resolve_hyperparameters(
            job, base, n_examples, self._start_adapter_config(job)
        )
        attempt = next_attempt(job)
        spec = training_spec(
            job, attempt, base, files, hyperparameters, self.settings, self.store.url,
            self.use_gpu(),
        )  # fmt: skip
        if spec.wandb is not None:
            spec = spec.model_copy(update={"wandb_secret": self._hand_over_wandb_key(job, attempt)})
        # The spec is written before the intent commits: a crash in between leaves an
        # object the same attempt, computed again, overwrites.
        self.attempt_store.save_spec(spec)
        job.attempts = attempt.number
        job.cluster_id = self.cluster_id
        job.ray_submission_id = attempt.submission_id
        job.output_dir = attempt.output_key
        job.progress_offset = 0
        job.resolved_hyperparameters = hyperparameters.model_dump()
        job.pause_requested_at = None
        job.stop_requested_at = None
        transition(job, S.STARTING)

    def _hand_over_wandb_key(self, job: JobRow, attempt: Attempt) -> str | None:
        """The organization's own W&B key, as an object in the attempt's folder only its
        trainer reads (service/organization/secrets.py); None when it registered none."""
        registered = OrganizationSecrets(self.db).get(job.organization, WANDB)
        if registered is None:
            return None
        secret = {"api_key": registered.value, **(registered.settings or {})}
        return self.attempt_store.hand_over_secret(attempt.output_key, secret)

    def _starting(self, job_id: str) -> None:
        with self._session() as session:
            job = self._job(session, job_id, S.STARTING)
            if job is None:
                return
            submission_id, output_dir = job.ray_submission_id, job.output_dir
            foreign = self._foreign(job)
        assert submission_id and output_dir
        # Adopt what the launcher already has (a crash after the submission), else submit.
        # An intent another cluster's scheduler committed is never submitted here: that
        # scheduler may have submitted it (`_running` follows it, or finds it lost).
        if not foreign and self.launcher.info(submission_id).state == LaunchState.UNKNOWN:
            with contextlib.suppress(SubmissionExists):  # an earlier try reached Ray
                self.launcher.submit(submission_id, self.store.url, spec_key(output_dir), env={})
        with self._session() as session:
            job = self._job(session, job_id, S.STARTING)
            if job is None:  # cancelled or paused meanwhile: that state's handler takes over
                return
            transition(job, S.RUNNING)
            if job.resume_from:
                name = os.path.basename(job.resume_from)
                add_event(session, job, f"Fine-tuning job resumed from {name}")
            else:
                add_event(session, job, "Fine-tuning job started")
        return None

    # --- running → succeeded | failed | queued (the launcher lost it)
    def _running(self, job_id: str) -> ReadyModel | None:
        with self._session() as session:
            job = self._job(session, job_id, S.RUNNING)
            if job is None:
                self._silent_since.pop(job_id, None)
                return None
            offset = job.progress_offset
            info, outcome = self._observe(session, job)
            if outcome is not None:
                self._silent_since.pop(job_id, None)
                return self._finish(session, job, outcome)
            if info.state == LaunchState.UNKNOWN:
                if self._foreign(job):
                    self._foreign_not_known(session, job, job.progress_offset != offset)
                else:
                    self._not_known(session, job)
                return None
            job.lost_seen_at = None
            if not info.state.active:
                self._ended_without_outcome(session, job, info)
            else:
                self._warn_if_not_started(session, job)
            return None

    def _warn_if_not_started(self, session: Session, job: JobRow) -> None:
        """One warn event when an attempt has written nothing for NOT_STARTED_WARN_S."""
        if job.progress_offset > 0:  # its trainer writes: it started
            self._silent_since.pop(job.id, None)
            return
        attempt, since, warned = self._silent_since.get(job.id, (job.attempts, self.clock(), False))
        if attempt != job.attempts:  # a new attempt counts from now
            attempt, since, warned = job.attempts, self.clock(), False
        waited = self.clock() - since
        self._silent_since[job.id] = (attempt, since, warned or waited >= NOT_STARTED_WARN_S)
        if warned or waited < NOT_STARTED_WARN_S:
            return
        add_event(
            session,
            job,
            f"Training has not started {waited // 60} minutes after Ray was given the job: "
            "the cluster may not have the resources it asks for free (a GPU, or the "
            "configured training_worker_resources); it starts once they are",
            level="warn",
        )

    def _not_known(self, session: Session, job: JobRow) -> None:
        """Ray does not know the running job: lost once that lasts, run again a bounded
        number of times."""
        if job.lost_seen_at is None:
            job.lost_seen_at = self.clock()
            return
        if self.clock() - job.lost_seen_at < LOST_AFTER_S:
            return
        self._run_again(session, job)

    def _foreign(self, job: JobRow) -> bool:
        """Whether the job's attempt went to another Ray cluster than this scheduler's."""
        return job.cluster_id is not None and job.cluster_id != self.cluster_id

    def _foreign_not_known(self, session: Session, job: JobRow, progressed: bool) -> None:
        """An attempt on another cluster, which this one's Ray cannot know: followed
        through the store (its records are applied as any attempt's), and run again here
        only once it has written nothing for FOREIGN_SILENT_S."""
        if job.lost_seen_at is None:
            logger.info(
                "job %s runs on Ray cluster %s, not %s: following it through the store",
                job.id, job.cluster_id, self.cluster_id,
            )  # fmt: skip
        if self._foreign_silent(job, progressed):
            self._run_again(session, job)

    def _foreign_silent(self, job: JobRow, progressed: bool) -> bool:
        """Whether another cluster's attempt has written nothing for FOREIGN_SILENT_S (its
        cluster is gone, or its trainer ended without a word)."""
        if progressed or job.lost_seen_at is None:
            job.lost_seen_at = self.clock()
            return False
        return self.clock() - job.lost_seen_at >= FOREIGN_SILENT_S

    def _run_again(self, session: Session, job: JobRow) -> None:
        """The job's attempt is lost: queued for a new one, a bounded number of times."""
        job.lost_seen_at = None
        if job.lost_runs >= MAX_LOST_RUNS:
            fail(
                session,
                job,
                "cluster_lost",
                f"Ray lost this job {job.lost_runs + 1} times (its cluster went away while it "
                "ran each time), so it is not run again automatically",
                None,
            )
            return
        job.lost_runs += 1
        transition(job, S.QUEUED)
        add_event(session, job, "Ray no longer knows this job; it is queued to run again")

    # --- pausing → paused, resuming → queued, once the trainer has stopped
    def _winding_down(self, job_id: str) -> ReadyModel | None:
        with self._session() as session:
            job = session.get(JobRow, job_id)
            if job is None or job.status not in (S.PAUSING, S.RESUMING):
                return None
            assert job.output_dir and job.ray_submission_id
            if job.pause_requested_at is None:  # the grace period counts from here
                self.attempt_store.request_pause(job.output_dir)
                job.pause_requested_at = self.clock()
            offset, self._paused_seen = job.progress_offset, False
            info, outcome = self._observe(session, job)
            if outcome is not None:  # it ended before it saw the pause request
                return self._finish(session, job, outcome)
            if info.state == LaunchState.UNKNOWN and self._foreign(job):
                # Another cluster's trainer: this Ray can neither see nor stop it, but it
                # hears the pause through the store, and its Paused record is its last.
                progressed = job.progress_offset != offset
                if not self._paused_seen and not self._foreign_silent(job, progressed):
                    return None
                job.lost_seen_at = None
                paused_cleanly = self._paused_seen
            elif info.state.active:
                self._stop_after_grace(session, job)
                return None
            else:
                paused_cleanly = (
                    info.state == LaunchState.SUCCEEDED and job.stop_requested_at is None
                )
            if not paused_cleanly and job.stop_requested_at is None:
                add_event(
                    session,
                    job,
                    "The trainer stopped before saving its pause checkpoint "
                    f"({info.state.value}); the job will continue "
                    f"{self._resume_point(session, job)}",
                    level="warn",
                )
            transition(job, S.PAUSED if job.status == S.PAUSING else S.QUEUED)
            return None

    def _stop_after_grace(self, session: Session, job: JobRow) -> None:
        submission_id = job.ray_submission_id
        assert submission_id
        if job.stop_requested_at is not None:  # asked already; again until it has stopped
            self._after_commit.append(lambda: self.stop(submission_id))
            return
        asked = job.pause_requested_at if job.pause_requested_at is not None else self.clock()
        if self.clock() - asked < self.settings.pause_grace_s:
            return
        self._after_commit.append(lambda: self.launcher.stop(submission_id))
        job.stop_requested_at = self.clock()
        add_event(
            session,
            job,
            f"The trainer did not pause within {self.settings.pause_grace_s:.0f} s and was "
            f"stopped; the job will continue {self._resume_point(session, job)}",
            level="warn",
        )

    # --- cancelling → cancelled, once the trainer has stopped
    def _cancelling(self, job_id: str) -> None:
        with self._session() as session:
            job = self._job(session, job_id, S.CANCELLING)
            if job is None:
                return
            assert job.ray_submission_id and job.output_dir
            info = self.launcher.info(job.ray_submission_id)
            if info.state == LaunchState.UNKNOWN and self._foreign(job):
                # Another cluster's trainer: the pause request in the store is the only
                # stop it hears; cancelled once it has paused, ended or gone silent.
                if job.stop_requested_at is None:
                    self.attempt_store.request_pause(job.output_dir)
                    job.stop_requested_at = self.clock()
                offset, self._paused_seen = job.progress_offset, False
                _, outcome = self._observe(session, job)
                progressed = job.progress_offset != offset
                ended = outcome is not None or self._paused_seen
                if not ended and not self._foreign_silent(job, progressed):
                    return
                job.lost_seen_at = None
            elif info.state.active:
                submission_id = job.ray_submission_id  # stopped again each tick until it ends
                self._after_commit.append(lambda: self.launcher.stop(submission_id))
                if job.stop_requested_at is None:
                    job.stop_requested_at = self.clock()
                return
            transition(job, S.CANCELLED)
        return None

    # --- what the trainer said
    def _observe(self, session: Session, job: JobRow) -> tuple[LaunchInfo, Outcome | None]:
        """Ray first, then the log: once Ray reports the job ended, the log read after it
        holds every record the trainer will ever write.

        A failure recorded by a trainer whose cluster then went away is most likely the
        cluster's doing (its workers died with it): it is not the job's outcome, and the
        job runs again, a bounded number of times. Success is success, whatever happened
        to the cluster since."""
        assert job.ray_submission_id and job.output_dir
        info = self.launcher.info(job.ray_submission_id)
        batch = self.attempt_store.read(job.output_dir, job.progress_offset)
        outcome = self._apply(session, job, batch)
        lost = info.state == LaunchState.UNKNOWN
        if lost and isinstance(outcome, Failed) and job.lost_runs < MAX_LOST_RUNS:
            return info, None
        return info, outcome

    def _apply(self, session: Session, job: JobRow, batch: ProgressBatch) -> Outcome | None:
        job.progress_offset = batch.offset
        for bad in batch.bad_lines:
            add_event(
                session,
                job,
                f"Skipped a malformed progress record (number {bad.offset}): {bad.reason}",
                level="warn",
            )
        outcome: Outcome | None = None
        # Steps re-run after a restart from an older checkpoint (a worker failure, a pause
        # that had to be stopped, a lost Ray job) were reported the first time: once each.
        reported = self._last_reported_step(session, job) if batch.records else 0
        for record in batch.records:
            if isinstance(record, Started):
                job.trained_tokens = record.trained_tokens
                if record.hyperparameters and job.resolved_hyperparameters:
                    job.resolved_hyperparameters = {
                        **job.resolved_hyperparameters,
                        **record.hyperparameters,
                    }
                if record.n_truncated:
                    add_event(
                        session,
                        job,
                        f"{record.n_truncated} example(s) were longer than the model's "
                        "context and were truncated from the end",
                        level="warn",
                    )
                if record.n_dropped:
                    add_event(
                        session,
                        job,
                        f"{record.n_dropped} example(s) had nothing left to learn within "
                        "the model's context once truncated, and were left out",
                        level="warn",
                    )
            elif isinstance(record, Metrics):
                if record.step > reported:
                    self._add_metrics(session, job, record)
                    self._count_trained_tokens(job, record.step - reported, record.total_steps)
                    reported = record.step
            elif isinstance(record, Checkpoint):
                self._pruned += self.registry.add_checkpoint(session, job, record)
            elif isinstance(record, Evaluation):
                # A message event with the figures as data, not a metrics event: those
                # are one per step from 1, as OpenAI's (the result file merges the end's
                # figures into the last step's row).
                data = {"step": record.step, "stage": record.stage, **record.metrics}
                add_event(session, job, record.message(), data=data)
            elif isinstance(record, Paused):
                job.resume_from = record.path
                self._paused_seen = True
                message = f"Checkpoint saved at step {record.step}; ready to resume"
                add_event(session, job, message)
            elif isinstance(record, Notice):
                add_event(session, job, record.message)
            elif isinstance(record, Succeeded | Failed):
                outcome = record
        return outcome

    def _add_metrics(self, session: Session, job: JobRow, record: Metrics) -> None:
        data: dict[str, Any] = {"step": record.step, "total_steps": record.total_steps}
        data.update(record.values)
        add_event(session, job, metrics_message(data), event_type="metrics", data=data)
        done = record.steps_this_run if record.steps_this_run is not None else record.step
        if job.status == S.RUNNING and done > 0 and record.step < record.total_steps:
            remaining = record.total_steps - record.step
            job.estimated_finish = record.time + int(record.elapsed_s / done * remaining)

    def _count_trained_tokens(self, job: JobRow, steps: int, total_steps: int) -> None:
        """/metrics' trained tokens: the run's tokens spread evenly over its steps."""
        if self.metrics is None or not job.trained_tokens or total_steps <= 0:
            return
        method = method_of(job)
        tokens = job.trained_tokens * min(steps, total_steps) / total_steps
        # Counted once the step commits (`_tick`): a conflict rolls the step back and the
        # next tick reads these records again (review L14).
        self._trained_tokens.append((job.model, method, tokens))

    def _ended_without_outcome(self, session: Session, job: JobRow, info: LaunchInfo) -> None:
        job_id, submission_id = job.id, job.ray_submission_id
        assert submission_id
        self._after_commit.append(lambda: self._log_tail(job_id, submission_id, info))
        message = f"The training process ended unexpectedly ({info.state.value})"
        fail(session, job, "training_error", f"{message}: {info.message}".rstrip(": "), None)

    def _log_tail(self, job_id: str, submission_id: str, info: LaunchInfo) -> None:
        """For the operator: what the trainer printed last (Ray's logs, up to 10 s)."""
        try:
            tail = self.launcher.logs_tail(submission_id)
        except Exception as error:
            tail = f"(its log could not be read: {error})"
        logger.warning("training job %s ended %s without an outcome:\n%s", job_id, info, tail)

    def _finish(self, session: Session, job: JobRow, outcome: Outcome) -> ReadyModel | None:
        if isinstance(outcome, Failed):
            fail(session, job, outcome.code, outcome.message, None)
            return None
        ready = self.registry.register_tuned_model(session, job, outcome.adapter_dir)
        transition(job, S.SUCCEEDED)
        add_event(session, job, "The job has successfully completed")
        unservable = self._unservable(job, outcome.adapter_dir)
        if unservable is not None:  # checked at creation; the engine's settings changed since
            add_event(
                session,
                job,
                f"The engine serving {job.model} cannot load this model as it is configured "
                f"now ({unservable}); its adapter can still be downloaded",
                level="warn",
            )
            return None  # no eager load to fail: the operator's change is named here
        return ready

    def _unservable(self, job: JobRow, adapter_dir: str) -> str | None:
        """Why the engine could not serve the adapter a job made (serving/servable.py, the
        check of job creation and import, on the adapter itself), or None."""
        base = self.base_models.get(job.model)
        if base is None:
            return None
        try:
            config = self.attempt_store.adapter_config(adapter_dir)
            weights = self.attempt_store.adapter_weights(adapter_dir)
        except (FileNotFoundError, ValueError):  # nothing to check: serving's load reports
            logger.warning("could not read the adapter of %s to check it", job.id)
            return None
        try:
            servable(engine_base(base), config, weights)
        except Unservable as refused:
            return refused.message
        return None

    # --- helpers
    @staticmethod
    def _job(session: Session, job_id: str, status: JobStatus) -> JobRow | None:
        """The job, if it is (still) in `status`."""
        job = session.get(JobRow, job_id)
        return job if job is not None and job.status == status else None

    @staticmethod
    def _last_reported_step(session: Session, job: JobRow) -> int:
        steps = select(EventRow.data).where(EventRow.job_id == job.id, EventRow.type == "metrics")
        last = session.scalars(steps.order_by(EventRow.seq.desc()).limit(1)).first()
        return int((last or {}).get("step", 0))

    def _slots_full(self) -> bool:
        with self.db.session() as session:
            return self.admission.slots_full(session)

    def _model_gone(self, job: JobRow) -> tuple[str, str, str]:
        available = ", ".join(sorted(self.base_models)) or "none"
        message = (
            f"The base model {job.model} is no longer configured on this server "
            f"(available: {available})"
        )
        return "model_not_available", message, "model"

    @staticmethod
    def _resume_point(session: Session, job: JobRow) -> str:
        step = session.scalar(
            select(func.max(CheckpointRow.step_number)).where(CheckpointRow.job_id == job.id)
        )
        if job.resume_from and step:
            return f"from its last checkpoint (step {step})"
        return "from its last checkpoint" if job.resume_from else "from the start"

    def _start_adapter_config(self, job: JobRow) -> dict[str, Any] | None:
        """The config of the adapter a job trains on top of (None: a new adapter)."""
        if job.start_adapter is None:
            return None
        # A resumed attempt goes on from its own checkpoint (the same LoRA shape), which
        # outlives the tuned model it started from.
        folder = checkpoint_adapter_key(job.resume_from) if job.resume_from else job.start_adapter
        try:
            return self.attempt_store.adapter_config(folder)
        except FileNotFoundError:
            raise JobCannotStart(
                "model_not_available",
                f"The adapter of {job.parent_model} is no longer available",
                "model",
            ) from None

    def stop(self, submission_id: str) -> None:
        """Best effort (the API's cancel, a job given up on): the reconciler makes sure of
        it next tick where it still matters."""
        try:
            self.launcher.stop(submission_id)
        except Exception:
            logger.warning("could not stop %s at once", submission_id, exc_info=True)


def _job_files(session: Session, job: JobRow) -> list[tuple[str, str, FileRow | None]]:
    """(param, file id, its row or None if deleted) of the job's training and validation
    files."""
    named = [("training_file", job.training_file), ("validation_file", job.validation_file)]
    return [(param, id_, session.get(FileRow, id_)) for param, id_ in named if id_ is not None]
