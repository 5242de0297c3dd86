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
