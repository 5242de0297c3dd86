"""A warm trainer: a Ray actor that keeps torch, transformers, peft and one base model
loaded between jobs, so that a small job's first step comes within a second or two of its
start instead of after a Ray job's driver, Ray Train's controller and worker group, their
imports and the model's load (25-45 s on two cores).

Each attempt runs as a Ray Train run in Ray Train's local mode (`ScalingConfig(
num_workers=0)`: the same training function and Ray Train APIs, in this process), through
the same entrypoint code as a cold attempt, which records its outcome in its progress log.
What one job leaves behind does not reach the next: its model is a copy of the pristine
base (training/warm.py), its adapter, optimizer, schedule, RNG seeds and data are made
anew by the training loop, its scratch folder is deleted, and the process environment is
restored after it. Jobs the pool does not cover (several workers, a W&B integration, whose
key would sit in the process environment) take the cold path.

The service's side (which actor runs which attempt, stopping, idle release) is
service/fine_tuning/warm_pool.py; this class only runs what it is given, one attempt at a
time. It warms up and trains in one thread of its own, so that it answers questions about
its attempts while it loads or trains; `run` waits for the warm-up.

One thread, always the same, runs every job. Ray hands an actor's calls to any of its
threads, and each thread that computes with torch on a CPU gets an OpenMP team of its own:
jobs that landed on a second thread while the first one's team lived on ran on 1.36 cores
instead of 1.97 (an in-process reproduction, SmolLM2 on 2 cores), and through the API a
20-example job's steps took 24-27 s instead of 17-21 s. Our reading, not verified in
libgomp's code: with more threads to manage than cores, GNU OpenMP stops spinning between
parallel regions and puts its workers to sleep, waking them for each of a step's thousands
of small regions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)

# Attempts whose outcome an actor remembers (a restarted service asks about them).
REMEMBERED_ATTEMPTS = 256


class WarmTrainer:
    def __init__(self, base_model_path: str, use_gpu: bool, torch_threads: int | None):
        self.base_model_path, self.use_gpu = base_model_path, use_gpu
        self.torch_threads = torch_threads
        self._warm: Any = None
        self._warm_error: BaseException | None = None
        self._warmed = threading.Event()
        self._one_at_a_time = threading.Lock()
        # attempt → (state as Ray's JobStatus names it, message)
        self._attempts: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._running: str | None = None
        self._idle_since = time.monotonic()
        self._training = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="training")
        self._training.submit(self._warm_up)

    def _warm_up(self) -> None:
        try:
            import peft  # noqa: F401  (what a job would import at its start, once)
            import ray.train.torch  # noqa: F401
            import torch

            import training.recipes  # noqa: F401
            from training.warm import WarmBase

            with contextlib.suppress(ImportError):  # the reporter's, where installed
                import torch.utils.tensorboard

            if self.torch_threads is not None:
                torch.set_num_threads(self.torch_threads)
            device = torch.device("cuda" if self.use_gpu else "cpu")
            self._warm = WarmBase(self.base_model_path, device)
            self._warm.prepare()
        except BaseException as error:  # reported by each run
            logger.exception("the warm trainer could not load %s", self.base_model_path)
            self._warm_error = error
        finally:
            self._warmed.set()

    # --- asked by the service
    def ready(self) -> bool:
        """Whether it has warmed up (waits for nothing)."""
        return self._warmed.is_set() and self._warm_error is None

    def busy(self) -> str | None:
        """The attempt it runs, if any."""
        return self._running

    def idle_for(self) -> float:
        """Seconds since its last attempt ended (0 while one runs)."""
        return 0.0 if self._running else time.monotonic() - self._idle_since

    def state_of(self, submission_id: str) -> tuple[str, str] | None:
        """(state, message) of an attempt it ran or runs; None if it never saw it."""
        return self._attempts.get(submission_id)

    # --- the work
    def run(self, submission_id: str, storage_url: str, spec_key: str) -> tuple[str, str]:
        """Runs the attempt to its end; (state, message) as Ray's job API would say it."""
        with self._one_at_a_time:
            self._remember(submission_id, ("RUNNING", ""))
            self._running = submission_id
            try:
                state = self._training.submit(self._run, storage_url, spec_key).result()
            finally:
                self._running = None
                self._idle_since = time.monotonic()
            self._remember(submission_id, state)
            return state

    def _run(self, storage_url: str, spec_key: str) -> tuple[str, str]:
        from training.entrypoint import run_and_record
        from training.progress import Failed, ProgressLog
        from training.spec import TrainingSpec
        from training.storage import open_store

        store = open_store(storage_url)
        spec = TrainingSpec.load(store, spec_key)
        self._warmed.wait()
        if self._warm is None:
            message = f"Training failed: the trainer could not load {spec.base_model}"
            ProgressLog(store, spec.output_key).write(
                Failed(code="training_error", message=message)
            )
            return "FAILED", message
        environment = dict(os.environ)
        try:
            status = run_and_record(spec, store, self._warm)
        finally:  # nothing a job set in the environment reaches the next one
            os.environ.clear()
            os.environ.update(environment)
            gc.collect()
            # The next job's copies, made while this trainer waits for it.
            threading.Thread(target=self._warm.prepare, name="prepare", daemon=True).start()
        return ("SUCCEEDED", "") if status == 0 else ("FAILED", f"exit status {status}")

    def _remember(self, submission_id: str, state: tuple[str, str]) -> None:
        self._attempts[submission_id] = state
        self._attempts.move_to_end(submission_id)
        while len(self._attempts) > REMEMBERED_ATTEMPTS:
            self._attempts.popitem(last=False)
