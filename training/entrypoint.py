"""The Ray job's entrypoint: `python -m training.entrypoint STORAGE_URL SPEC_KEY`.

Reads the spec from the artifact store, runs the recipe under a Ray Train `TorchTrainer`,
then records the outcome in the job's progress log. A failure is recorded with a message a
user can act on and the process exits non-zero, so Ray's own job status agrees with the
log. Nothing here assumes a disk shared with the service or between the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from training.node_cache import scratch_folder
from training.progress import Failed, Paused, ProgressLog, Succeeded, without_server_paths
from training.spec import ADAPTER_FILES, TrainingSpec
from training.storage import ArtifactStore, open_store

if TYPE_CHECKING:  # the service imports this module: no torch at import
    from training.warm import WarmBase


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
    text = without_server_paths(str(error)) or type(error).__name__
    if "out of memory" in text.lower():
        return (
            "Training ran out of memory. Lower batch_size, shorten the examples or use a "
            f"smaller base model. ({text.splitlines()[0]})"
        )
    return f"Training failed: {text.splitlines()[0] if text else type(error).__name__}"


def run(spec: TrainingSpec, store: ArtifactStore, warm: WarmBase | None = None) -> bool:
    """Train; True when the run paused (it saved a checkpoint and no adapter). `warm`: run
    in this process, on the base model a warm trainer keeps loaded (Ray Train's local
    mode: the same training function and Ray Train APIs, no worker actors to start)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.run import train_loop_per_worker

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    loop: Callable[[dict[str, Any]], None] = train_loop_per_worker
    if warm is not None:
        loop = lambda config: train_loop_per_worker(config, warm)  # noqa: E731
    # Ray Train's own run folder: this node's scratch (the workers keep their checkpoints
    # in the artifact store, so nothing of it needs to be shared).
    with scratch_folder(f"{spec.job_id}-ray-") as folder:
        trainer = TorchTrainer(
            loop,
            train_loop_config={"spec": spec.model_dump(mode="json")},
            scaling_config=ScalingConfig(
                num_workers=0 if warm is not None else spec.num_workers,
                use_gpu=spec.use_gpu,
                resources_per_worker=_worker_resources(spec),
            ),
            run_config=RunConfig(
                name=spec.job_id,
                storage_path=str(folder),
                failure_config=FailureConfig(max_failures=spec.max_worker_failures),
            ),
        )
        trainer.fit()
    if was_paused(spec, store):
        return True
    sizes = store.manifest(spec.adapter_key) or {}
    missing = [name for name in ADAPTER_FILES if name not in sizes]
    if missing:
        raise RuntimeError(f"the trainer finished without writing {', '.join(missing)}")
    return False


def _worker_resources(spec: TrainingSpec) -> dict[str, float] | None:
    if not spec.worker_resources:
        return None
    # Naming any resource replaces Ray Train's default of one CPU (or GPU) per worker.
    return {"GPU" if spec.use_gpu else "CPU": 1, **spec.worker_resources}


def was_paused(spec: TrainingSpec, store: ArtifactStore) -> bool:
    records = ProgressLog(store, spec.output_key).read_from(0).records
    return any(isinstance(record, Paused) for record in records)


# Records a lost worker may still write after the driver's failure record is numbered.
OUTCOME_GAP = 1_000_000


class Stopped(BaseException):
    """The run was told to stop (SIGTERM: a cancel, a pause past its grace, the cluster
    shutting down). Not the training's failure: the service decides what comes next."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("storage_url", help="the artifact store (FTAAS_STORAGE_URL)")
    parser.add_argument("spec_key", help="the key of the job's TrainingSpec JSON in it")
    args = parser.parse_args(argv)
    store = open_store(args.storage_url)
    spec = TrainingSpec.load(store, args.spec_key)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    return run_and_record(spec, store)


def run_and_record(spec: TrainingSpec, store: ArtifactStore, warm: WarmBase | None = None) -> int:
    """Run the attempt and record its outcome in its progress log; the exit status a
    process running it would have (0 trained or paused, 1 failed, 143 stopped)."""
    try:
        paused = run(spec, store, warm)
    except Stopped:
        return 128 + signal.SIGTERM  # no outcome recorded: stopping is not failing
    except BaseException as error:
        traceback.print_exc()
        # A new writer after the workers'. A worker the driver lost touch of (its head
        # going away) may still be writing: numbers well past theirs, so that neither
        # record overwrites the other (the reader takes them in order, gaps and all).
        outcome = ProgressLog(store, spec.output_key, gap=OUTCOME_GAP)
        outcome.write(Failed(code="training_error", message=_user_message(error)))
        return 1
    finally:
        if spec.wandb_secret is not None:  # the next attempt gets its own copy
            with contextlib.suppress(Exception):
                store.delete(spec.wandb_secret)
    if not paused:
        ProgressLog(store, spec.output_key).write(Succeeded(adapter_dir=spec.adapter_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
