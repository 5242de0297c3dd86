"""A failed run tells the user what to do, in the job's error message."""

from training.entrypoint import _user_message


def test_out_of_memory_says_what_to_change():
    message = _user_message(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert message.startswith("Training ran out of memory. Lower batch_size")


def test_other_errors_keep_their_first_line():
    error = ValueError("Target modules {'q'} not found in the base model.\nTraceback details")
    assert (
        _user_message(error) == "Training failed: Target modules {'q'} not found in the base model."
    )


def test_ray_trains_wrappers_are_unwrapped_to_the_workers_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause = ValueError("Target modules {'no_such_layer'} not found in the base model.")
    wrapped = WorkerGroupError(
        "Training failed due to worker errors:", {1: RuntimeError("x"), 0: cause}
    )
    assert "no_such_layer" in _user_message(wrapped)


def test_a_failure_recorded_while_a_lost_worker_still_writes_overwrites_nothing(tmp_path):
    """The head going away: the driver records the failure while a worker it lost touch
    of writes its next steps. Both writers' records are all read, none overwritten (a
    metrics event went missing this way)."""
    from training.entrypoint import OUTCOME_GAP
    from training.progress import Failed, Metrics, ProgressLog
    from training.storage import LocalStore

    store = LocalStore(tmp_path)
    worker = ProgressLog(store, "attempt-1")
    for step in (1, 2):
        worker.write(Metrics(step=step, total_steps=4, train_loss=1.0))
    ProgressLog(store, "attempt-1", gap=OUTCOME_GAP).write(
        Failed(code="training_error", message="lost")
    )
    for step in (3, 4):  # the lost worker goes on
        worker.write(Metrics(step=step, total_steps=4, train_loss=1.0))
    records = ProgressLog(store, "attempt-1").read_from(0).records
    assert [getattr(r, "step", r.type) for r in records] == [1, 2, 3, 4, "failed"]
