"""The Ray job's entrypoint: `python -m training.entrypoint SPEC.json`.

Runs the recipe under a Ray Train `TorchTrainer`, then records the outcome in the job's
progress log. A failure is recorded with a message a user can act on and the process exits
non-zero, so Ray's own job status agrees with the log.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path

from training.progress import Failed, Paused, ProgressLog, Succeeded
from training.spec import TrainingSpec

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def root_cause(error: BaseException) -> BaseException:
    """The worker's own exception, out of Ray Train's and Ray's wrappers."""
    failures = getattr(error, "worker_failures", None)
    if failures:  # WorkerGroupError: one exception per failed worker rank
        error = failures[min(failures)]
    error = getattr(error, "controller_failure", None) or error
    while isinstance(cause := getattr(error, "cause", None), BaseException):  # RayTaskError
        error = cause
    return error


def _user_message(error: BaseException) -> str:
    error = root_cause(error)
    text = str(error) or type(error).__name__
    if "out of memory" in text.lower():
        return (
            "Training ran out of memory. Lower batch_size, shorten the examples or use a "
            f"smaller base model. ({text.splitlines()[0]})"
        )
    return f"Training failed: {text.splitlines()[0] if text else type(error).__name__}"


def run(spec: TrainingSpec) -> bool:
    """Train; True when the run paused (it saved a checkpoint and no adapter)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.sft import train_loop_per_worker

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu),
        run_config=RunConfig(
            name=spec.job_id,
            storage_path=str(Path(spec.output_dir) / "ray"),
            failure_config=FailureConfig(max_failures=spec.max_worker_failures),
        ),
    )
    trainer.fit()
    if was_paused(spec):
        return True
    missing = [name for name in ADAPTER_FILES if not (spec.adapter_dir / name).exists()]
    if missing:
        raise RuntimeError(f"the trainer finished without writing {', '.join(missing)}")
    return False


def was_paused(spec: TrainingSpec) -> bool:
    records = ProgressLog(spec.progress_path).read_from(0).records
    return any(isinstance(record, Paused) for record in records)


class Stopped(BaseException):
    """The run was told to stop (SIGTERM: a cancel, a pause past its grace, the cluster
    shutting down). Not the training's failure: the service decides what comes next."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", help="path of the job's TrainingSpec JSON")
    args = parser.parse_args(argv)
    spec = TrainingSpec.load(args.spec)
    progress = ProgressLog(spec.progress_path)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        paused = run(spec)
    except Stopped:
        return 128 + signal.SIGTERM  # no outcome recorded: stopping is not failing
    except BaseException as error:
        traceback.print_exc()
        progress.write(Failed(code="training_error", message=_user_message(error)))
        return 1
    if not paused:
        progress.write(Succeeded(adapter_dir=str(spec.adapter_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
