"""The reconciler stepped tick by tick: every transition of the state table and every
fault, with a launcher that runs nothing (the test plays Ray and the trainer) and a real
SQLite job store. A tick's report must show no error unless the test caused one."""

from __future__ import annotations

import sqlite3

import pytest
from openai import OpenAI
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from service.db import EventRow, JobRow, ModelRow
from service.fine_tuning.attempt_store import AttemptStore
from service.fine_tuning.launcher import LauncherUnavailable, LaunchState
from service.fine_tuning.lease import Lease, LeaseLost
from service.fine_tuning.reconciler import (
    FOREIGN_SILENT_S,
    LOST_AFTER_S,
    MAX_LOST_RUNS,
    MAX_STEP_FAILURES,
    NOT_STARTED_WARN_S,
    Reconciler,
    TickReport,
)
from tests.conftest import memorisation_jsonl
from tests.service.fakes import FakeLauncher
from training.control import pause_requested
from training.progress import (
    Checkpoint,
    Evaluation,
    Metrics,
    Paused,
    ProgressBatch,
    ProgressLog,
    Started,
    Succeeded,
)


class World:
    """The API (through the SDK, in-process), the reconciler, and the test as Ray."""

    def __init__(self, sdk: OpenAI, parts: dict, settings):  # type: ignore[no-untyped-def]
        self.sdk, self.parts, self.settings = sdk, parts, settings
        self.reconciler: Reconciler = parts["reconciler"]
        self.ray: FakeLauncher = parts["launcher"]
        self.clock = 1_000_000
        self.reconciler.clock = lambda: self.clock

    def job(self, **create: object) -> str:
        upload = self.sdk.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
        return self.sdk.fine_tuning.jobs.create(
            model="ftaas-tiny", training_file=upload.id, **create
        ).id

    def tick(self, errors: bool = False) -> TickReport:
        report = self.reconciler.tick()
        assert bool(report.errors) == errors, report.errors
        return report

    def row(self, job_id: str) -> JobRow:
        with self.parts["db"].session() as session:
            job = session.get(JobRow, job_id)
            assert job is not None
            return job

    def status(self, job_id: str) -> str:
        return self.row(job_id).status

    def wire(self, job_id: str) -> str:
        return self.sdk.fine_tuning.jobs.retrieve(job_id).status

    def trainer(self, job_id: str) -> ProgressLog:
        output_dir = self.row(job_id).output_dir
        assert output_dir is not None
        return ProgressLog(self.parts["blobs"], output_dir)

    def events(self, job_id: str) -> list[EventRow]:
        with self.parts["db"].session() as session:
            return list(session.query(EventRow).filter_by(job_id=job_id).order_by(EventRow.seq))

    def running(self) -> str:
        job_id = self.job()
        self.tick()  # validating_files → queued
        self.tick()  # queued → starting (committed) → submitted → running
        assert self.status(job_id) == "running"
        return job_id

    def lose(self, job_id: str) -> None:
        """Ticks over which Ray, which no longer knows the job, is believed."""
        self.tick()
        self.clock += LOST_AFTER_S
        self.tick()

    def train(self, job_id: str, steps: int = 2) -> None:
        log = self.trainer(job_id)
        log.write(Started(total_steps=steps, n_examples=12, trained_tokens=100))
        for step in range(1, steps + 1):
            log.write(Metrics(step=step, total_steps=steps, train_loss=1.0 / step))


@pytest.fixture
def world(sdk: OpenAI, parts: dict, settings) -> World:  # type: ignore[no-untyped-def]
    return World(sdk, parts, settings)


def test_the_whole_path_one_transition_per_tick(world: World):
    job_id = world.job()
    assert world.status(job_id) == "validating_files"
    report = world.tick()
    assert world.status(job_id) == "queued"
    assert report.queued == [job_id]  # the scheduler ticks again at once: it starts now
    report = world.tick()
    assert world.status(job_id) == "running" and world.ray.submitted == [job_id]
    assert report.queued == []
    world.train(job_id, steps=2)
    log = world.trainer(job_id)
    log.write(Checkpoint(step=2, epoch=1, path=f"{world.row(job_id).output_dir}/c"))
    world.tick()
    steps = [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]
    assert steps == [1, 2] and world.status(job_id) == "running"
    assert world.sdk.fine_tuning.jobs.retrieve(job_id).trained_tokens is None  # as OpenAI's
    log.write(Succeeded(adapter_dir="/adapter"))
    world.ray.end(job_id)
    report = world.tick()
    assert world.status(job_id) == "succeeded"
    assert world.sdk.fine_tuning.jobs.retrieve(job_id).trained_tokens == 100
    assert [m.name for m in report.ready] == [world.row(job_id).fine_tuned_model]
    world.tick()  # nothing more happens, and nothing twice
    steps = [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]
    assert steps == [1, 2]


def test_a_crash_after_ray_accepted_the_job_is_adopted_not_submitted_again(world: World):
    job_id = world.job()
    world.tick()

    def crash(_: str) -> None:
        raise RuntimeError("the API process died here")

    world.ray.during_submit = crash
    world.tick(errors=True)
    assert world.status(job_id) == "starting" and world.wire(job_id) == "queued"
    world.ray.during_submit = None
    world.tick()
    assert world.status(job_id) == "running" and world.ray.submitted == [job_id]


def test_a_submission_ray_never_got_is_submitted_on_the_next_tick(world: World):
    job_id = world.job()
    world.tick()
    world.ray.unavailable = True
    report = world.tick()
    assert report.launcher_unavailable and world.status(job_id) == "starting"
    assert world.row(job_id).step_failures == 0  # Ray's outage is not the job's fault
    world.tick()
    warnings = [e.message for e in world.events(job_id) if e.level == "warn"]
    assert warnings == ["Ray's job API is not answering; the job waits until it does"]
    world.ray.unavailable = False
    world.tick()
    assert world.status(job_id) == "running" and world.ray.submitted == [job_id]


@pytest.mark.parametrize("when", ["before Ray has it", "after Ray has it"])
def test_cancel_racing_the_submission_ends_cancelled_with_no_trainer(world: World, when: str):
    job_id = world.job()
    world.tick()
    answers: list[str] = []

    def cancel(submission_id: str) -> None:
        if when == "before Ray has it":
            del world.ray.states[submission_id]  # the request is still on its way
        answers.append(world.sdk.fine_tuning.jobs.cancel(job_id).status)
        world.ray.states.setdefault(submission_id, LaunchState.RUNNING)  # ...and arrives

    world.ray.during_submit = cancel
    world.tick()
    assert answers == ["cancelled"] and world.wire(job_id) == "cancelled"
    for _ in range(3):
        world.tick()
    assert world.status(job_id) == "cancelled" and world.ray.alive() == []
    assert "Fine-tuning job started" not in [e.message for e in world.events(job_id)]


def test_pause_racing_the_submission_pauses_the_trainer(world: World):
    job_id = world.job()
    world.tick()
    world.ray.during_submit = lambda _: world.sdk.fine_tuning.jobs.pause(job_id)
    world.tick()
    world.ray.during_submit = None
    assert world.status(job_id) == "pausing" and world.wire(job_id) == "paused"
    world.tick()
    output_dir = world.row(job_id).output_dir or ""
    # The trainer is asked through its channel.
    assert pause_requested(world.parts["blobs"], output_dir)
    world.trainer(job_id).write(Paused(step=1, path=f"{output_dir}/paused/step-000001"))
    world.ray.end(job_id)
    world.tick()
    assert world.status(job_id) == "paused" and world.ray.alive() == []
    assert world.sdk.fine_tuning.jobs.resume(job_id).status == "queued"
    world.tick()
    resumed = world.row(job_id)
    assert resumed.status == "running" and resumed.ray_submission_id == f"{job_id}-2"
    assert resumed.resume_from == f"{output_dir}/paused/step-000001"


def test_cancel_racing_success_keeps_the_cancel(world: World):
    job_id = world.running()
    world.trainer(job_id).write(Succeeded(adapter_dir="/adapter"))
    world.ray.end(job_id)
    assert world.sdk.fine_tuning.jobs.cancel(job_id).status == "cancelled"
    world.tick()
    assert world.status(job_id) == "cancelled"
    with world.parts["db"].session() as session:
        assert session.query(ModelRow).count() == 0


def test_a_scheduler_write_on_a_job_the_api_changed_meanwhile_is_not_applied(world: World):
    job_id = world.running()
    world.train(job_id, steps=1)

    class CancelWhileReading(AttemptStore):
        def read(self, output_dir: str, offset: int) -> ProgressBatch:
            world.sdk.fine_tuning.jobs.cancel(job_id)  # commits between read and write
            return super().read(output_dir, offset)

    world.reconciler.attempt_store = CancelWhileReading(world.parts["blobs"])
    report = world.tick()
    assert report.conflicts == [job_id]
    assert world.status(job_id) == "cancelling"  # the scheduler's write was refused
    assert not [e for e in world.events(job_id) if e.type == "metrics"]  # nothing half-done


def test_a_training_file_deleted_while_queued_fails_the_job_with_a_code(world: World):
    world.settings.max_running_jobs = 0
    job_id = world.job()
    world.tick()
    world.sdk.files.delete(world.row(job_id).training_file)
    world.settings.max_running_jobs = 1
    world.tick()
    job = world.sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "was deleted" in job.error.message and "/" not in job.error.message
    assert world.ray.submitted == []


def test_a_base_model_removed_from_the_configuration_fails_the_job(world: World):
    world.settings.max_running_jobs = 0
    job_id = world.job()
    world.tick()
    world.reconciler.base_models = {}
    world.settings.max_running_jobs = 1
    world.tick()
    job = world.sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "failed" and job.error and job.error.code == "model_not_available"


def test_malformed_progress_records_are_skipped_with_a_warning(world: World):
    job_id = world.running()
    log = world.trainer(job_id)
    log.write(Started(total_steps=2, n_examples=12, trained_tokens=100))
    store, folder = world.parts["blobs"], f"{world.row(job_id).output_dir}/progress"
    store.put_bytes(f"{folder}/0000000001.json", b'{"type":"metr')  # not a record
    store.put_bytes(f"{folder}/0000000002.json", b'{"type":"metrics","step":"x"}')
    log = world.trainer(job_id)  # a new writer (a restarted rank 0) continues after them
    log.write(Metrics(step=2, total_steps=2, train_loss=0.5))
    log.write(Succeeded(adapter_dir="/adapter"))
    world.ray.end(job_id)
    world.tick()
    assert world.status(job_id) == "succeeded"
    warnings = [e.message for e in world.events(job_id) if e.level == "warn"]
    assert len(warnings) == 2 and all("Skipped a malformed progress record" in w for w in warnings)


def test_a_trainer_that_dies_while_pausing_leaves_the_job_paused_and_says_so(world: World):
    job_id = world.running()
    world.sdk.fine_tuning.jobs.pause(job_id)
    world.tick()
    world.ray.end(job_id, LaunchState.FAILED)  # OOM-killed before it saved
    world.tick()
    assert world.status(job_id) == "paused"
    assert any("stopped before saving" in e.message for e in world.events(job_id))


def test_a_trainer_that_does_not_pause_in_time_is_stopped(world: World):
    job_id = world.running()
    world.sdk.fine_tuning.jobs.pause(job_id)
    world.clock += 1
    world.tick()
    assert world.ray.stopped == []
    world.clock += int(world.settings.pause_grace_s) + 10
    world.tick()
    assert world.ray.stopped == [job_id] and world.ray.alive() == []
    world.tick()
    assert world.status(job_id) == "paused"
    [warning] = [e.message for e in world.events(job_id) if e.level == "warn"]
    assert "did not pause within" in warning and "from the start" in warning


def test_resume_while_still_pausing_waits_for_the_trainer_then_runs_again(world: World):
    job_id = world.running()
    world.sdk.fine_tuning.jobs.pause(job_id)
    assert world.sdk.fine_tuning.jobs.resume(job_id).status == "queued"
    assert world.status(job_id) == "resuming"
    world.tick()
    assert world.status(job_id) == "resuming" and world.ray.submitted == [job_id]
    world.trainer(job_id).write(Paused(step=1, path="/p"))
    world.ray.end(job_id)
    world.tick()
    assert world.status(job_id) == "queued"
    world.tick()
    assert world.status(job_id) == "running" and world.ray.alive() == [f"{job_id}-2"]


def test_a_job_ray_lost_runs_again_as_a_new_attempt(world: World):
    job_id = world.running()
    del world.ray.states[job_id]  # the cluster restarted
    world.lose(job_id)
    assert world.status(job_id) == "queued"
    world.tick()
    assert world.row(job_id).ray_submission_id == f"{job_id}-2"


def test_ray_not_knowing_a_job_for_one_moment_is_not_the_job_lost(world: World):
    job_id = world.running()
    state = world.ray.states.pop(job_id)  # a head restarting answers 404 once
    world.tick()
    world.ray.states[job_id] = state
    world.clock += LOST_AFTER_S
    world.tick()
    del world.ray.states[job_id]
    world.tick()
    assert world.status(job_id) == "running" and world.row(job_id).lost_runs == 0


def test_a_job_its_cluster_keeps_losing_fails_after_a_bound(world: World):
    job_id = world.running()
    for run in range(1, MAX_LOST_RUNS + 2):
        del world.ray.states[world.row(job_id).ray_submission_id]
        world.lose(job_id)
        if run <= MAX_LOST_RUNS:
            assert world.status(job_id) == "queued"
            world.tick()  # submitted again
            assert world.row(job_id).ray_submission_id == f"{job_id}-{run + 1}"
    job = world.sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "failed" and job.error and job.error.code == "cluster_lost"
    assert f"Ray lost this job {MAX_LOST_RUNS + 1} times" in job.error.message


def test_a_step_that_keeps_raising_fails_the_job_after_a_bound(world: World):
    job_id = world.job()
    world.tick()
    world.ray.refuse_submit = RuntimeError(
        "Ray refused the job (500): runtime env failed for python -m training.entrypoint "
        "s3://secret-bucket/ftaas/jobs/x/spec.json in /srv/ftaas/home"
    )
    for _ in range(MAX_STEP_FAILURES):
        world.tick(errors=True)
    job = world.sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "failed" and job.error and job.error.code == "internal_error"
    assert "runtime env failed" in job.error.message
    [warning] = [e for e in world.events(job_id) if e.level == "warn"]
    for shown in (warning.message, job.error.message):  # the first warning too (review L1)
        assert "secret-bucket" not in shown and "/srv/ftaas" not in shown, shown
    world.tick()  # a failed job is never stepped again


def test_max_running_jobs_counts_every_job_whose_trainer_may_be_alive(world: World):
    first = world.running()
    world.sdk.fine_tuning.jobs.pause(first)  # pausing: its trainer still holds the slot
    second = world.job()
    world.tick()
    world.tick()
    assert world.status(second) == "queued" and world.ray.submitted == [first]
    world.ray.end(first, LaunchState.SUCCEEDED)
    world.trainer(first).write(Paused(step=1, path="/p"))
    world.tick()
    assert world.status(first) == "paused"
    world.tick()
    assert world.status(second) == "running"


def test_a_launcher_error_is_typed_for_ray_not_answering(world: World):
    world.ray.unavailable = True
    with pytest.raises(LauncherUnavailable):
        world.ray.info("x")


def test_one_lease_holder_at_a_time_and_a_dead_holders_lease_is_taken_over(parts: dict):
    now = [100.0]
    first = Lease(parts["db"], ttl_s=10, holder="a", clock=lambda: now[0])
    second = Lease(parts["db"], ttl_s=10, holder="b", clock=lambda: now[0])
    assert first.hold() and not second.hold()
    now[0] += 5
    assert first.hold() and not second.hold()  # renewed
    now[0] += 11  # "a" died: no renewal
    assert second.hold() and not first.hold()
    second.release()
    assert first.hold()


def test_a_slow_tick_keeps_renewing_its_lease_and_stops_once_it_is_lost(world: World, parts):
    now = [100.0]
    mine = Lease(parts["db"], ttl_s=9, holder="a", clock=lambda: now[0])
    other = Lease(parts["db"], ttl_s=9, holder="b", clock=lambda: now[0])
    assert mine.hold()
    now[0] += 2
    assert mine.keep()  # within a third of its time: not even asked again
    now[0] += 6  # a slow housekeeping sweep, a slow job: renewed, not lost
    assert mine.keep() and not other.hold()
    now[0] += 8
    assert not other.hold()  # still renewed 8 s ago, within its 9
    jobs = [world.job() for _ in range(3)]
    asked: list[bool] = []

    def keep() -> bool:  # lost after the first job of the tick (taken over meanwhile)
        asked.append(True)
        return len(asked) == 1

    report = world.reconciler.tick(keep_lease=keep)
    assert report.lease_lost and len(asked) == 2
    assert [world.status(j) for j in jobs].count("queued") == 1  # one job stepped, no more


def test_a_stalled_holder_whose_lease_was_taken_over_writes_nothing(world: World, parts):
    """Review M4's fence: a scheduler that stalled past its lease (and still believes it
    holds it) steps no job once another holds the lease; the new holder's writes land."""
    now = [100.0]
    stalled = Lease(parts["db"], ttl_s=9, holder="a", clock=lambda: now[0])
    other = Lease(parts["db"], ttl_s=9, holder="b", clock=lambda: now[0])
    assert stalled.hold() and stalled.generation == 1
    job_id = world.job()
    now[0] += 10  # "a" stalls past its time; "b" takes over
    assert other.hold() and other.generation == 2
    report = world.reconciler.tick(keep_lease=lambda: True, fence=stalled.fence)
    assert report.lease_lost and world.status(job_id) == "validating_files"
    assert not report.errors and not report.conflicts
    report = world.reconciler.tick(keep_lease=other.keep, fence=other.fence)
    assert not report.lease_lost and world.status(job_id) == "queued"
    assert other.hold() and other.generation == 2  # renewing keeps the generation


def test_a_lease_lost_while_counting_a_failed_step_stops_the_tick_cleanly(world: World):
    """The fence also guards what a step writes after its handler raised (the failure
    count, its warning): the tick stops and reports it, and nothing is written."""
    job_id = world.job()
    world.tick()  # validating_files → queued
    world.ray.refuse_submit = RuntimeError("Ray refused the job")
    fenced: list[bool] = []

    def lost_at_the_third_write(session: object) -> None:
        fenced.append(True)  # the intent, the launch's read, then the failure count
        if len(fenced) == 3:
            raise LeaseLost("taken over")

    report = world.reconciler.tick(fence=lost_at_the_third_write)
    assert report.lease_lost and len(fenced) == 3
    assert world.row(job_id).step_failures == 0 and world.events(job_id)[-1].level != "warn"


def test_an_attempt_on_another_ray_cluster_is_followed_through_the_store(world: World):
    """An upgrade: the new cluster's scheduler takes the lease while the old cluster still
    trains. Its Ray does not know the attempt, which is not the job lost: the records the
    old trainer writes are followed, and the job succeeds; nothing is submitted twice."""
    job_id = world.running()
    with world.parts["db"].session() as session:
        session.get(JobRow, job_id).cluster_id = "old-cluster"  # type: ignore[union-attr]
    del world.ray.states[job_id]  # this cluster's Ray never knew it
    world.tick()
    for _ in range(3):
        world.clock += FOREIGN_SILENT_S // 2
        world.train(job_id, steps=1)  # the old cluster's trainer goes on
        world.tick()
        assert world.status(job_id) == "running"
    world.trainer(job_id).write(Succeeded(adapter_dir="/adapter"))
    world.tick()
    assert world.status(job_id) == "succeeded" and world.ray.submitted == [job_id]


def foreign_running(world: World) -> str:
    """A job whose attempt another Ray cluster runs (an upgrade's old one)."""
    job_id = world.running()
    with world.parts["db"].session() as session:
        session.get(JobRow, job_id).cluster_id = "old-cluster"  # type: ignore[union-attr]
    del world.ray.states[job_id]  # this cluster's Ray never knew it
    world.train(job_id, steps=1)
    world.tick()
    return job_id


def test_pausing_another_clusters_attempt_waits_for_its_pause_record(world: World):
    """This cluster's Ray cannot see the old trainer: its unknown is not "stopped". The
    trainer hears the pause through the store, and the job is paused once it has said so,
    with its checkpoint to resume from."""
    job_id = foreign_running(world)
    world.sdk.fine_tuning.jobs.pause(job_id)
    for _ in range(3):
        world.clock += 60
        world.tick()
        assert world.status(job_id) == "pausing"
    assert pause_requested(world.parts["blobs"], world.row(job_id).output_dir or "")
    world.trainer(job_id).write(Paused(step=1, path="ckpt/step-1"))
    world.tick()
    row = world.row(job_id)
    assert (row.status, row.resume_from) == ("paused", "ckpt/step-1")
    assert [e for e in world.events(job_id) if e.level == "warn"] == []
    assert world.ray.stopped == [] and world.ray.submitted == [job_id]


def test_pausing_another_clusters_attempt_that_went_silent_pauses_and_says_so(world: World):
    job_id = foreign_running(world)
    world.sdk.fine_tuning.jobs.pause(job_id)
    world.tick()
    world.clock += FOREIGN_SILENT_S
    world.tick()
    assert world.status(job_id) == "paused"
    assert any("stopped before saving" in e.message for e in world.events(job_id))


def test_cancelling_another_clusters_attempt_stops_its_trainer_through_the_store(world: World):
    job_id = foreign_running(world)
    world.sdk.fine_tuning.jobs.cancel(job_id)
    world.tick()
    world.clock += 60
    world.tick()
    assert world.status(job_id) == "cancelling"
    assert pause_requested(world.parts["blobs"], world.row(job_id).output_dir or "")
    world.trainer(job_id).write(Paused(step=1, path="ckpt/step-1"))
    world.tick()
    assert world.status(job_id) == "cancelled" and world.ray.submitted == [job_id]


def test_an_attempt_on_a_cluster_gone_silent_runs_again_here(world: World):
    job_id = world.running()
    with world.parts["db"].session() as session:
        session.get(JobRow, job_id).cluster_id = "old-cluster"  # type: ignore[union-attr]
    del world.ray.states[job_id]
    world.lose(job_id)  # this cluster's short wait: not lost yet
    assert world.status(job_id) == "running"
    world.clock += FOREIGN_SILENT_S
    world.tick()
    assert world.status(job_id) == "queued" and world.row(job_id).lost_runs == 1
    world.tick()
    row = world.row(job_id)
    assert row.ray_submission_id == f"{job_id}-2" and row.cluster_id == "local"
    assert world.ray.alive() == [f"{job_id}-2"]


def test_an_intent_another_clusters_scheduler_committed_is_not_submitted_here(world: World):
    job_id = world.job()
    world.tick()  # validating_files → queued
    world.ray.refuse_submit = RuntimeError("this cluster's Ray is unreachable mid-launch")
    world.tick(errors=True)  # the intent is committed, the launch fails
    assert world.status(job_id) == "starting"
    world.ray.refuse_submit = None
    with world.parts["db"].session() as session:
        session.get(JobRow, job_id).cluster_id = "old-cluster"  # type: ignore[union-attr]
    world.tick()
    assert world.status(job_id) == "running" and world.ray.submitted == []


def test_the_evaluation_is_a_message_and_the_result_file_has_one_row_per_step(world: World):
    job_id = world.running()
    start = {"full_valid_loss": 2.5, "full_valid_contains": 0.0}
    world.trainer(job_id).write(Evaluation(stage="start", step=0, metrics=start))
    world.train(job_id, steps=2)
    log = world.trainer(job_id)  # a new writer: it numbers on after the others' records
    end = {"full_valid_loss": 0.1, "full_valid_contains": 1.0}
    log.write(Evaluation(stage="end", step=2, metrics=end, start_metrics=start))
    log.write(Succeeded(adapter_dir="/adapter"))
    world.ray.end(job_id)
    world.tick()
    events = world.events(job_id)
    assert [e.data["step"] for e in events if e.type == "metrics"] == [1, 2]
    [comparison] = [e for e in events if e.message.startswith("Validation: loss 2.50 → 0.10")]
    assert comparison.type == "message" and comparison.data["full_valid_contains"] == 1.0
    [result_id] = world.sdk.fine_tuning.jobs.retrieve(job_id).result_files
    rows = world.sdk.files.content(result_id).text.splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    last = dict(zip(header, rows[2].split(","), strict=True))
    assert (last["full_valid_loss"], last["full_valid_contains"]) == ("0.10000", "1.00000")


def test_steps_run_again_after_a_restart_from_an_older_checkpoint_are_reported_once(
    world: World,
):
    job_id = world.running()
    world.train(job_id, steps=3)
    world.tick()
    del world.ray.states[job_id]  # lost: it runs again from its last checkpoint (step 1)
    world.lose(job_id)
    world.tick()
    log = world.trainer(job_id)
    for step in (2, 3, 4, 5):
        log.write(Metrics(step=step, total_steps=5, train_loss=0.1))
    world.tick()
    steps = [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]
    assert steps == [1, 2, 3, 4, 5]


def test_one_tenants_long_queue_does_not_starve_another(world: World, parts: dict):
    import io

    from service.auth import Tenant
    from service.fine_tuning.schemas import CreateFineTuningJobRequest

    def job_of(organization: str) -> str:
        tenant = Tenant(organization)
        upload = parts["files"].create(
            tenant, "t.jsonl", "fine-tune", io.BytesIO(memorisation_jsonl())
        )
        request = CreateFineTuningJobRequest(model="ftaas-tiny", training_file=upload.id)
        return parts["jobs"].create(tenant, request).id

    busy = [job_of("org-busy") for _ in range(3)]
    other = job_of("org-other")  # arrives last
    world.tick()  # all validated
    world.tick()
    assert world.ray.submitted == [busy[0]]
    world.trainer(busy[0]).write(Succeeded(adapter_dir="/a"))
    world.ray.end(busy[0])
    world.tick()  # busy[0] finishes; the next slot goes to the tenant with none running
    assert world.ray.submitted == [busy[0], other]


def test_a_failure_recorded_as_the_cluster_went_away_runs_again_a_real_one_fails(world: World):
    from training.progress import Failed

    lost = world.running()
    world.trainer(lost).write(Failed(message="Training failed: worker died"))
    del world.ray.states[lost]  # the cluster went away with the trainer
    world.lose(lost)
    assert world.status(lost) == "queued"
    world.tick()
    assert world.row(lost).ray_submission_id == f"{lost}-2"

    real = world.job()
    world.tick()
    world.ray.end(lost)
    world.trainer(lost).write(Succeeded(adapter_dir="/a"))
    world.tick()
    world.tick()
    world.trainer(real).write(Failed(message="Training failed: bad data"))
    world.ray.end(real, LaunchState.FAILED)
    world.tick()
    job = world.sdk.fine_tuning.jobs.retrieve(real)
    assert job.status == "failed" and job.error and "bad data" in job.error.message


def test_a_job_on_a_tuned_model_or_its_checkpoint_starts_from_that_adapter(world: World):
    import json

    from training.spec import TrainingSpec, spec_key
    from training.storage import join

    world.settings.max_running_jobs = 5
    first = world.running()
    world.train(first)
    out = world.row(first).output_dir
    checkpoint = f"{out}/checkpoints/step-000002"
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]}
    blobs = world.parts["blobs"]
    for folder in (f"{out}/adapter", f"{checkpoint}/adapter"):
        blobs.put_bytes(join(folder, "adapter_config.json"), json.dumps(lora).encode())
    log = world.trainer(first)
    log.write(Checkpoint(step=2, epoch=1, path=checkpoint))
    log.write(Succeeded(adapter_dir=f"{out}/adapter"))
    world.ray.end(first)
    world.tick()
    tuned = world.row(first).fine_tuned_model
    [saved] = world.sdk.fine_tuning.jobs.checkpoints.list(first).data
    upload = world.sdk.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")
    parents = [
        (tuned, f"{out}/adapter"),
        (saved.fine_tuned_model_checkpoint, f"{checkpoint}/adapter"),
    ]
    for parent, adapter in parents:
        job = world.sdk.fine_tuning.jobs.create(model=parent, training_file=upload.id)
        assert job.model == parent  # as the user named it
        world.tick()
        world.tick()
        assert world.status(job.id) == "running"
        row = world.row(job.id)
        assert (row.model, row.start_adapter) == ("ftaas-tiny", adapter)
        spec = TrainingSpec.load(blobs, spec_key(row.output_dir))
        assert spec.start_adapter == adapter and spec.base_model == "ftaas-tiny"
        hp = spec.hyperparameters  # the LoRA shape is the starting adapter's
        assert (hp.lora_r, hp.lora_alpha, hp.target_modules) == (4, 8, ["q_proj", "v_proj"])
        shown = world.sdk.fine_tuning.jobs.retrieve(job.id).method.supervised.hyperparameters
        assert shown.lora_r == 4  # type: ignore[union-attr]
    # A parent whose adapter is gone by the time the job starts fails it, naming `model`.
    blobs.delete(join(f"{out}/adapter", "adapter_config.json"))
    orphan = world.sdk.fine_tuning.jobs.create(model=tuned, training_file=upload.id)
    world.tick()
    world.tick()
    failed = world.sdk.fine_tuning.jobs.retrieve(orphan.id)
    assert failed.status == "failed" and failed.error.code == "model_not_available"
    assert failed.error.param == "model"


def test_the_sizes_a_trainer_resolved_itself_are_the_ones_the_job_shows(world: World):
    job_id = world.running()
    world.trainer(job_id).write(
        Started(
            total_steps=40, n_examples=20, trained_tokens=100,
            hyperparameters={"n_epochs": 5, "batch_size": 3},
        )
    )  # fmt: skip
    world.tick()
    shown = world.sdk.fine_tuning.jobs.retrieve(job_id).hyperparameters
    assert (shown.n_epochs, shown.batch_size) == (5, 3)


def test_deleting_a_model_removes_its_checkpoints_and_files_but_not_its_job(world: World):
    from service.auth import Tenant
    from service.errors import NotFound
    from training.spec import job_folder

    job_id = world.running()
    world.train(job_id)
    out = world.row(job_id).output_dir
    blobs = world.parts["blobs"]
    blobs.put_bytes(f"{out}/adapter/adapter_config.json", b"{}")
    log = world.trainer(job_id)
    log.write(Checkpoint(step=2, epoch=1, path=f"{out}/checkpoints/step-000002"))
    log.write(Succeeded(adapter_dir=f"{out}/adapter"))
    world.ray.end(job_id)
    world.tick()
    name = world.row(job_id).fine_tuned_model
    [checkpoint] = world.sdk.fine_tuning.jobs.checkpoints.list(job_id).data
    models = world.parts["models"]
    stored = list(blobs.list(job_folder(job_id)))
    deletion = models.delete(Tenant("local"), name)
    assert deletion.names == [name, checkpoint.fine_tuned_model_checkpoint]
    for gone in (name, checkpoint.fine_tuned_model_checkpoint):
        with pytest.raises(NotFound):
            models.inference_target(Tenant("local"), gone)
    # No longer routed to, but its files stay until serving has dropped every name.
    assert list(blobs.list(job_folder(job_id))) == stored != []
    models.delete_files(deletion)
    assert list(blobs.list(job_folder(job_id))) == []
    assert world.sdk.fine_tuning.jobs.checkpoints.list(job_id).data == []
    job = world.sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.fine_tuned_model == name


def test_a_thousand_queued_jobs_of_one_tenant_do_not_starve_anothers_one(world: World, parts):
    """At scale: org-busy has 1,000 jobs queued before org-other's one arrives; with two
    slots the other's job starts in the very first tick, beside the busy tenant's first."""
    from service.db import arrival, now

    world.settings.max_running_jobs = 2
    template = world.row(world.job())  # a job's row to copy, then out of the way
    with parts["db"].session() as session:
        session.query(JobRow).update({"status": "cancelled"})
        for index in range(1_001):
            organization = "org-busy" if index < 1_000 else "org-other"
            session.add(
                JobRow(
                    id=f"ftjob-scale{index:06d}",
                    organization=organization,
                    created_at=now(),
                    arrival=arrival() + index,
                    model=template.model,
                    training_file=template.training_file,
                    seed=index,
                    method=template.method,
                    status="queued",
                    model_short_id=f"s{index:07d}",
                )
            )
    world.tick()
    assert world.ray.submitted == ["ftjob-scale000000", "ftjob-scale001000"]


def test_a_failed_jobs_message_names_no_server_path(world: World):
    from training.progress import Failed

    job_id = world.running()
    world.trainer(job_id).write(
        Failed(
            message="Training failed: [Errno 2] No such file or directory: "
            "'/srv/ftaas/blobs/files/file-abc' (from s3://bucket/prefix/jobs/x/spec.json)"
        )
    )
    world.ray.end(job_id, LaunchState.FAILED)
    world.tick()
    error = world.sdk.fine_tuning.jobs.retrieve(job_id).error
    assert error is not None
    assert "/srv" not in error.message and "s3://" not in error.message
    assert "…/file-abc" in error.message and "…/spec.json" in error.message
    events = world.sdk.fine_tuning.jobs.list_events(job_id)
    assert not any("/srv/" in event.message for event in events)


def test_a_checkpoint_is_retrieved_and_deleted_by_its_name_once_its_job_is_done(world: World):
    from openai import ConflictError, NotFoundError

    job_id = world.running()
    world.train(job_id)
    out = world.row(job_id).output_dir
    blobs = world.parts["blobs"]
    log = world.trainer(job_id)
    for step in (1, 2):
        path = f"{out}/checkpoints/step-00000{step}"
        blobs.put_bytes(f"{path}/adapter/adapter_config.json", b"{}")
        log.write(Checkpoint(step=step, epoch=step, path=path))
    world.tick()
    older, newer = world.sdk.fine_tuning.jobs.checkpoints.list(job_id).data[::-1]
    name = older.fine_tuned_model_checkpoint
    assert world.sdk.models.retrieve(name).id == name  # served by that name (review L20)
    with pytest.raises(ConflictError):  # the job may still continue from it
        world.sdk.models.delete(name)
    log.write(Succeeded(adapter_dir=f"{out}/adapter"))
    world.ray.end(job_id)
    world.tick()
    assert world.sdk.models.delete(name).deleted  # a tenant can erase what its data made
    assert [c.id for c in world.sdk.fine_tuning.jobs.checkpoints.list(job_id).data] == [newer.id]
    assert not list(blobs.list(f"{out}/checkpoints/step-000001"))
    assert list(blobs.list(f"{out}/checkpoints/step-000002"))
    with pytest.raises(NotFoundError):
        world.sdk.models.retrieve(name)
    assert world.sdk.models.retrieve(world.row(job_id).fine_tuned_model or "").id


def test_the_outputs_of_failed_and_cancelled_jobs_expire_and_a_models_stay(world: World):
    import time

    from openai import NotFoundError

    from service.housekeeping import DAY_S, Housekeeping
    from training.progress import Failed
    from training.spec import job_folder

    blobs = world.parts["blobs"]
    jobs: dict[str, str] = {}
    for outcome in ("cancelled", "failed", "succeeded"):
        job_id = jobs[outcome] = world.running()
        out = world.row(job_id).output_dir
        blobs.put_bytes(f"{out}/checkpoints/step-000001/adapter/adapter_config.json", b"{}")
        world.trainer(job_id).write(
            Checkpoint(step=1, epoch=1, path=f"{out}/checkpoints/step-000001")
        )
        world.tick()
        if outcome == "cancelled":
            world.sdk.fine_tuning.jobs.cancel(job_id)
            world.ray.end(job_id, LaunchState.STOPPED)
        elif outcome == "failed":
            world.trainer(job_id).write(Failed(message="Training failed: bad data"))
            world.ray.end(job_id, LaunchState.FAILED)
        else:
            world.trainer(job_id).write(Succeeded(adapter_dir=f"{out}/adapter"))
            world.ray.end(job_id)
        world.tick()
        assert world.status(job_id) == outcome
    week_later = Housekeeping(world.parts["db"], blobs, clock=lambda: time.time() + 7 * DAY_S + 60)
    assert Housekeeping(world.parts["db"], blobs).expired_outputs() == []  # not yet
    expired = week_later.expired_outputs()
    assert {e.job_id for e in expired} == {jobs["cancelled"], jobs["failed"]}
    for each in expired:
        [name] = each.names  # what serving drops first
        world.sdk.models.retrieve(name)
        week_later.delete_outputs(each)
        assert not list(blobs.list(job_folder(each.job_id)))
        with pytest.raises(NotFoundError):
            world.sdk.models.retrieve(name)
        assert world.sdk.fine_tuning.jobs.retrieve(each.job_id).status in ("cancelled", "failed")
    assert week_later.expired_outputs() == []  # each once
    assert list(blobs.list(job_folder(jobs["succeeded"])))  # a model's outputs stay


def test_a_finished_jobs_outputs_count_against_the_storage_quota_until_deleted(
    world: World, settings
):
    import openai

    from service.config import OrganizationLimits
    from service.housekeeping import Housekeeping

    job_id = world.running()
    out = world.row(job_id).output_dir
    blobs = world.parts["blobs"]
    blobs.put_bytes(f"{out}/adapter/adapter_model.safetensors", b"w" * 5_000)
    blobs.put_bytes(f"{out}/adapter/adapter_config.json", b"{}")
    world.trainer(job_id).write(Succeeded(adapter_dir=f"{out}/adapter"))
    world.ray.end(job_id)
    world.tick()
    Housekeeping(world.parts["db"], blobs).sweep()  # measures the finished job's outputs
    assert (world.row(job_id).output_bytes or 0) > 5_000
    world.parts["limits"].settings = settings.model_copy(
        update={"limits": OrganizationLimits(storage_bytes=8_000)}
    )
    small = memorisation_jsonl()
    with pytest.raises(openai.RateLimitError) as refused:  # 5 kB of weights + this > 8 kB
        world.sdk.files.create(file=("t.jsonl", small * 3), purpose="fine-tune")
    assert refused.value.body["code"] == "storage_quota_exceeded"  # type: ignore[index]
    world.sdk.models.delete(world.row(job_id).fine_tuned_model or "")
    world.sdk.files.create(file=("t.jsonl", small * 3), purpose="fine-tune")  # room again


def warnings(world: World, job_id: str) -> list[str]:
    return [e.message for e in world.events(job_id) if e.level == "warn"]


def test_a_job_whose_training_never_starts_says_once_that_it_waits_for_resources(
    world: World,
):
    """Ray holds the job (as it does while no node has the GPU it asks for) and the trainer
    writes nothing: after ten minutes one warning says why, and the job still waits."""
    job_id = world.running()
    world.clock += NOT_STARTED_WARN_S - 1
    world.tick()
    assert warnings(world, job_id) == []
    world.clock += 1
    world.tick()
    world.clock += NOT_STARTED_WARN_S
    world.tick()
    (warning,) = warnings(world, job_id)
    assert "has not started 10 minutes after" in warning and "resources" in warning
    assert world.status(job_id) == "running"


def test_a_job_that_started_training_is_not_warned_about_however_long_a_step_takes(
    world: World,
):
    job_id = world.running()
    world.train(job_id, steps=1)
    world.tick()
    world.clock += 2 * NOT_STARTED_WARN_S
    world.tick()
    assert warnings(world, job_id) == [] and world.status(job_id) == "running"


def test_the_scheduler_holds_no_write_lock_while_it_waits_on_ray(world: World):
    """Ray's calls (a stop, a dead trainer's log, read for up to 10 s) are made once the
    step has committed: on SQLite uploads, job creation and key checks never wait on Ray
    behind the scheduler's write lock, on PostgreSQL a cancel never waits behind the job's
    row lock (review L3)."""
    db = world.parts["db"]
    calls_under_lock: list[str] = []

    def probe(call: str, job_id: str) -> None:
        try:
            if db.engine.dialect.name == "sqlite":
                other = sqlite3.connect(db.engine.url.database, timeout=0.05)
                try:
                    other.execute("BEGIN IMMEDIATE")  # the one writer's lock, or fail
                finally:
                    other.close()
            else:
                with db.engine.connect() as other, other.begin():
                    locked = select(JobRow.id).where(JobRow.id == job_id)
                    other.execute(locked.with_for_update(nowait=True))
        except (sqlite3.OperationalError, OperationalError):
            calls_under_lock.append(call)

    stop, logs_tail = world.ray.stop, world.ray.logs_tail
    world.ray.stop = lambda id_: (probe("stop", id_), stop(id_))[1]  # type: ignore[method-assign]
    world.ray.logs_tail = lambda id_, lines=20: (  # type: ignore[method-assign]
        probe("logs_tail", id_),
        logs_tail(id_, lines),
    )[1]
    world.settings.max_running_jobs = 3
    cancelled, paused, died = world.running(), world.running(), world.running()
    for job_id in (cancelled, paused, died):
        world.train(job_id, steps=1)  # each step writes its events before Ray is called
    world.sdk.fine_tuning.jobs.cancel(cancelled)
    world.sdk.fine_tuning.jobs.pause(paused)
    world.tick()
    world.clock += int(world.settings.pause_grace_s) + 10
    world.trainer(paused).write(Metrics(step=2, total_steps=2, train_loss=0.5))
    world.ray.end(died, LaunchState.FAILED)
    world.tick()
    world.tick()
    assert {cancelled, paused} <= set(world.ray.stopped)
    assert world.status(cancelled) == "cancelled" and world.status(paused) == "paused"
    assert world.status(died) == "failed"
    assert calls_under_lock == []


def _succeeded_with_checkpoints(world: World, steps: tuple[int, ...]) -> tuple[str, str]:
    """A job that succeeded with a checkpoint (files and record) at each of `steps`; its
    id and folder."""
    blobs = world.parts["blobs"]
    job_id = world.running()
    out = world.row(job_id).output_dir or ""
    for step in steps:
        path = f"{out}/checkpoints/step-{step:06d}"
        blobs.put_bytes(f"{path}/adapter/adapter_config.json", b"{}")
        world.trainer(job_id).write(Checkpoint(step=step, epoch=1, path=path))
    blobs.put_bytes(f"{out}/adapter/adapter_config.json", b"{}")
    world.trainer(job_id).write(Succeeded(adapter_dir=f"{out}/adapter"))
    world.ray.end(job_id)
    world.tick()
    assert world.status(job_id) == "succeeded"
    return job_id, out


def test_what_a_crash_kept_after_a_models_deletion_is_deleted_serving_first(world: World):
    """A crash between a model's deletion and its files' (review L4): housekeeping has
    serving drop the name, then deletes the job's outputs."""
    from service.auth import Tenant
    from service.housekeeping import Housekeeping
    from training.spec import job_folder

    blobs = world.parts["blobs"]
    job_id, _ = _succeeded_with_checkpoints(world, (1,))
    kept_id, _ = _succeeded_with_checkpoints(world, (1,))
    model = world.row(job_id).fine_tuned_model or ""
    world.parts["models"].delete(Tenant("local"), model)  # the crash: no delete_files
    housekeeping = Housekeeping(world.parts["db"], blobs)
    housekeeping.sweep()
    [expired] = housekeeping.expired_outputs()
    assert expired.job_id == job_id and expired.names == [model]  # serving drops it first
    housekeeping.delete_outputs(expired)
    assert not list(blobs.list(job_folder(job_id)))
    assert list(blobs.list(job_folder(kept_id)))  # a model's outputs stay
    housekeeping.sweep()
    assert housekeeping.expired_outputs() == []  # each once


def test_checkpoints_no_row_lists_are_deleted_when_an_ended_job_is_measured(world: World):
    """A pruned checkpoint, or one deleted by name, whose files a crash kept (review L4):
    found when the ended job's outputs are measured, dropped by serving, then deleted."""
    from service.auth import Tenant
    from service.housekeeping import Housekeeping

    blobs = world.parts["blobs"]
    job_id, out = _succeeded_with_checkpoints(world, (1, 2, 3, 4))  # step 1 pruned
    model = world.row(job_id).fine_tuned_model or ""
    world.parts["models"].delete(Tenant("local"), f"{model}:ckpt-step-2")  # no delete_files
    housekeeping = Housekeeping(world.parts["db"], blobs)
    housekeeping.sweep()
    [orphans] = housekeeping.expired_outputs()
    assert orphans.job_id == job_id
    assert orphans.names == [f"{model}:ckpt-step-1", f"{model}:ckpt-step-2"]
    assert orphans.folders == [f"{out}/checkpoints/step-000001", f"{out}/checkpoints/step-000002"]
    housekeeping.delete_outputs(orphans)
    left = {item.key.split("/")[4] for item in blobs.list(f"{out}/checkpoints")}
    assert left == {"step-000003", "step-000004"}
    assert list(blobs.list(f"{out}/adapter"))
    assert world.sdk.models.retrieve(f"{model}:ckpt-step-3").id
    housekeeping.sweep()
    assert housekeeping.expired_outputs() == []


def test_imported_adapters_no_model_names_are_deleted_after_the_grace(world: World):
    """A half-written import, or a deleted one whose files a crash kept (review L4)."""
    import time

    from service.db import now
    from service.housekeeping import GRACE_S, Housekeeping

    blobs = world.parts["blobs"]
    for short_id in ("orphan", "named"):
        blobs.put_bytes(f"imported/{short_id}/adapter/adapter_config.json", b"{}")
    with world.parts["db"].session() as session:
        session.add(
            ModelRow(
                id="ft:ftaas-tiny:local::named",
                organization="local",
                base_model="ftaas-tiny",
                job_id=None,
                adapter_dir="imported/named/adapter",
                created_at=now(),
            )
        )
    assert Housekeeping(world.parts["db"], blobs).expired_outputs() == []
    fresh = Housekeeping(world.parts["db"], blobs)
    fresh.sweep()
    assert fresh.expired_outputs() == []  # within the grace: an import may be under way
    later = Housekeeping(world.parts["db"], blobs, clock=lambda: time.time() + GRACE_S + 60)
    later.sweep()
    [orphan] = later.expired_outputs()
    assert orphan.folders == ["imported/orphan"] and orphan.names == []
    later.delete_outputs(orphan)
    assert not list(blobs.list("imported/orphan"))
    assert list(blobs.list("imported/named"))


def test_a_tuned_model_the_engine_cannot_load_now_is_not_loaded_and_says_why(world: World):
    """Checked at creation; an adapter whose engine changed since (here: weights on a
    layer it serves no LoRA on) succeeds with a warning naming why, and no eager load
    that would fail (serving/servable.py's check on the adapter itself)."""
    import io
    import json

    import torch
    from safetensors.torch import save

    blobs = world.parts["blobs"]
    job_id = world.running()
    out = world.row(job_id).output_dir
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["lm_head"]}
    blobs.put_bytes(f"{out}/adapter/adapter_config.json", json.dumps(config).encode())
    weights = {
        "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 128),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(512, 8),
    }
    blobs.put_file(f"{out}/adapter/adapter_model.safetensors", io.BytesIO(save(weights)))
    world.trainer(job_id).write(Succeeded(adapter_dir=f"{out}/adapter"))
    world.ray.end(job_id)
    report = world.tick()
    assert world.status(job_id) == "succeeded" and report.ready == []
    [warning] = [e.message for e in world.events(job_id) if e.level == "warn"]
    assert "cannot load this model" in warning and "lm_head" in warning


def test_checkpoints_ranked_by_validation_reward_keep_the_three_best_and_the_newest(
    world: World,
):
    """A reinforcement job's checkpoints, as OpenAI keeps them: the three with the best
    valid_reward_mean (and the newest, which a resume continues from); the others are
    unlisted."""
    job_id = world.running()
    world.train(job_id)
    out = world.row(job_id).output_dir
    blobs = world.parts["blobs"]
    log = world.trainer(job_id)
    rewards = {2: 0.1, 4: 0.7, 6: 0.5, 8: 0.9, 10: 0.2}
    for step, reward in rewards.items():
        path = f"{out}/checkpoints/step-{step:06d}"
        blobs.put_bytes(f"{path}/adapter/adapter_config.json", b"{}")
        log.write(Checkpoint(step=step, epoch=0, path=path, metrics={"valid_reward_mean": reward}))
    world.tick()
    listed = world.sdk.fine_tuning.jobs.checkpoints.list(job_id).data
    assert sorted(c.step_number for c in listed) == [4, 6, 8, 10]  # best three, newest
    # (The trainer deletes the folders it prunes by the same rule: test_reinforcement.py.)


def test_a_job_on_one_machine_trains_on_its_cores_shared_among_the_running_jobs(world: World):
    """Ray starts each training worker with one thread (OMP_NUM_THREADS = its CPUs): the
    embedded head's jobs are told to use this machine's cores, shared among the workers of
    the jobs that may run at once; a cluster's nodes keep Ray's rule unless configured."""
    import os

    from training.spec import TrainingSpec, spec_key

    cores = len(os.sched_getaffinity(0))
    upload = world.sdk.files.create(file=("t.jsonl", memorisation_jsonl()), purpose="fine-tune")

    def threads_of_a_new_job() -> int | None:
        job = world.sdk.fine_tuning.jobs.create(model="ftaas-tiny", training_file=upload.id)
        world.tick()
        world.tick()
        row = world.row(job.id)
        spec = TrainingSpec.load(world.parts["blobs"], spec_key(row.output_dir))
        world.sdk.fine_tuning.jobs.cancel(job.id)
        world.tick()
        return spec.torch_threads

    world.settings.max_running_jobs = 1
    assert threads_of_a_new_job() == cores
    world.settings.max_running_jobs, world.settings.training_num_workers = 2, 2
    assert threads_of_a_new_job() == max(1, cores // 4)
    world.settings.training_threads = 3
    assert threads_of_a_new_job() == 3
    world.settings.training_threads, world.settings.ray_address = None, "ray://head:10001"
    assert threads_of_a_new_job() is None
