"""The warm trainer pool: a launcher that runs one-worker attempts on warm trainers
(training/warm_trainer.py), Ray actors that keep a base model loaded between jobs, and
hands every other attempt to the cold launcher (a Ray job running a Ray Train run).

The pool is bounded (`per_model` trainers per trainer shape: base model, GPU or not,
worker resources, threads) and released when idle (`idle_s`). Its trainers are detached,
named actors in a namespace of their own, so that attempts keep running through a restart
of the service, and a restarted service finds them by name and asks them about their
attempts. A trainer's name carries the version of the training code, so a new version of
the service never runs jobs on an old one's trainers (those are released).

A trainer that dies is replaced by Ray (`max_restarts`), which runs its attempt again
(`max_task_retries`): the attempt continues from its newest checkpoint, as a Ray Train run
whose worker died does. Stopping an attempt kills its trainer outright (a cancel needs no
cooperation, as a Ray job's stop); the shape's next attempt starts a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.fine_tuning.launcher import (
    CALL_TIMEOUT_S,
    LauncherUnavailable,
    LaunchInfo,
    LaunchState,
    RayLauncher,
    SubmissionExists,
    training_package,
)
from training.spec import TrainingSpec
from training.storage import ArtifactStore

logger = logging.getLogger(__name__)

NAMESPACE = "ftaas-warm-trainers"
RELEASE_EVERY_S = 10.0  # how often idle trainers are looked for
# A trainer this close to its release is not given a new attempt.
RELEASE_MARGIN_S = 30.0
REMEMBERED_RUNS = 256


@dataclass(frozen=True)
class TrainerShape:
    """What a warm trainer is made for: the attempts it may run."""

    base_model_path: str
    use_gpu: bool
    torch_threads: int | None
    worker_resources: str  # JSON, keys sorted ("" for none)

    @classmethod
    def of(cls, spec: TrainingSpec) -> TrainerShape | None:
        """The shape of warm trainer that can run the attempt; None when none can (several
        workers; a W&B key, which would pass through the trainer's environment)."""
        if spec.num_workers != 1 or spec.wandb is not None or spec.wandb_secret is not None:
            return None
        resources = (
            json.dumps(spec.worker_resources, sort_keys=True) if spec.worker_resources else ""
        )
        return cls(spec.base_model_path, spec.use_gpu, spec.torch_threads, resources)

    def name(self, code_version: str, slot: int) -> str:
        digest = hashlib.sha256(repr(self).encode()).hexdigest()[:12]
        return f"warm-{code_version}-{digest}-{slot}"


@dataclass
class Run:
    trainer: Any  # the actor's handle
    result: Any  # the ObjectRef of its `run`
    shape: TrainerShape | None  # None for a run found after a restart


def code_version(package: str | None = None) -> str:
    """A digest of the training code's files, as the trainers run it."""
    root = Path(package or training_package())
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class WarmPoolLauncher:
    def __init__(
        self,
        cold: RayLauncher,
        store: ArtifactStore,
        per_model: int,
        idle_s: float,
        timeout_s: float = CALL_TIMEOUT_S,
    ):
        self.cold, self.store = cold, store
        self.per_model, self.idle_s = per_model, idle_s
        self.timeout_s = timeout_s
        self.code_version = code_version()
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._stopped: OrderedDict[str, None] = OrderedDict()
        self._released_at = 0.0

    # --- the Launcher protocol
    def submit(
        self, submission_id: str, storage_url: str, spec_key: str, env: dict[str, str]
    ) -> None:
        if submission_id in self._runs:
            raise SubmissionExists(submission_id)
        spec = TrainingSpec.load(self.store, spec_key)
        shape = TrainerShape.of(spec) if not env else None
        trainer = self._idle_trainer(shape, spec.max_worker_failures) if shape else None
        if trainer is None:  # not a shape the pool covers, or every trainer is busy
            self.cold.submit(submission_id, storage_url, spec_key, env)
            return
        result = trainer.run.remote(submission_id, storage_url, spec_key)
        self._remember(submission_id, Run(trainer, result, shape))
        logger.info("attempt %s runs on a warm trainer", submission_id)

    def info(self, submission_id: str) -> LaunchInfo:
        run = self._runs.get(submission_id)
        if run is not None:
            return self._info_of(submission_id, run)
        cold = self.cold.info(submission_id)
        if cold.state != LaunchState.UNKNOWN:
            return cold
        found = self._find(submission_id)  # a run an earlier service started
        if found is None:
            return cold
        trainer, (state, message) = found
        if state == LaunchState.RUNNING:  # followed from now on, as if started here
            self._remember(submission_id, Run(trainer, None, None))
        return LaunchInfo(LaunchState(state), message)

    def stop(self, submission_id: str) -> None:
        run = self._runs.get(submission_id)
        trainer = run.trainer if run is not None else None
        if trainer is None:
            found = self._find(submission_id)
            if found is not None and found[1][0] == LaunchState.RUNNING:
                trainer = found[0]
        if trainer is None:
            self.cold.stop(submission_id)
            return
        import ray

        # The next attempt of this shape starts a new trainer (Ray frees the name first).
        self._stopped[submission_id] = None
        while len(self._stopped) > REMEMBERED_RUNS:
            self._stopped.popitem(last=False)
        ray.kill(trainer, no_restart=True)
        logger.info("attempt %s stopped: its warm trainer was killed", submission_id)

    def tidy(self) -> None:
        """Releases the trainers idle for `idle_s` (asked every tick; acts every
        RELEASE_EVERY_S), and the idle ones of another version of the training code."""
        if time.monotonic() - self._released_at < RELEASE_EVERY_S:
            return
        self._released_at = time.monotonic()
        import ray

        try:
            trainers = self._trainers()
        except Exception:
            logger.warning("could not list the warm trainers", exc_info=True)
            return
        for name, trainer in trainers:
            state = self._state(trainer)
            if state is None:
                continue
            running, idle_for = state
            stale = not name.startswith(f"warm-{self.code_version}-")
            if running is None and (idle_for >= self.idle_s or stale):
                logger.info("releasing warm trainer %s (idle %.0f s)", name, idle_for)
                ray.kill(trainer, no_restart=True)

    def logs_tail(self, submission_id: str, lines: int = 20) -> str:
        if submission_id in self._runs:
            return ""  # a warm trainer's log is the actor's (Ray's logs folder)
        return self.cold.logs_tail(submission_id, lines)

    # --- the pool
    def _info_of(self, submission_id: str, run: Run) -> LaunchInfo:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if run.result is None:  # found after a restart: ask the trainer
            try:
                answer = ray.get(run.trainer.state_of.remote(submission_id), timeout=self.timeout_s)
            except GetTimeoutError as error:
                raise LauncherUnavailable(f"a warm trainer did not answer: {error}") from error
            except RayActorError:
                answer = self._ended_with_trainer(submission_id)
            if answer is None:
                return LaunchInfo(LaunchState.UNKNOWN, "the warm trainer does not know it")
            return LaunchInfo(LaunchState(answer[0]), answer[1])
        done, _ = ray.wait([run.result], timeout=0)
        if not done:
            return LaunchInfo(LaunchState.RUNNING)
        try:
            state, message = ray.get(run.result, timeout=self.timeout_s)
        except RayActorError:
            state, message = self._ended_with_trainer(submission_id)
        except Exception as error:  # the actor's own failure, not the training's
            state, message = LaunchState.FAILED, f"the warm trainer failed: {error}"
        return LaunchInfo(LaunchState(state), message)

    def _ended_with_trainer(self, submission_id: str) -> tuple[str, str]:
        if submission_id in self._stopped:
            return LaunchState.STOPPED, "stopped"
        return LaunchState.FAILED, "the warm trainer's process died (after Ray's retries)"

    def _idle_trainer(self, shape: TrainerShape, max_task_retries: int) -> Any | None:
        """A trainer of this shape free for an attempt, started if the pool has room; None
        when every slot is busy (or a stopped trainer's name is not free yet)."""
        busy = {_actor_id(run.trainer) for run in self._runs.values() if self._active(run)}
        for slot in range(self.per_model):
            name = shape.name(self.code_version, slot)
            trainer = self._get(name)
            if trainer is None:
                return self._start(shape, slot, max_task_retries)
            if _actor_id(trainer) in busy or self._busy_by_its_word(trainer):
                continue
            return trainer
        return None

    def _busy_by_its_word(self, trainer: Any) -> bool:
        state = self._state(trainer)
        if state is None:  # dying, or not answering: not one to give an attempt to
            return True
        running, idle_for = state
        return running is not None or idle_for > self.idle_s - RELEASE_MARGIN_S

    def _state(self, trainer: Any) -> tuple[str | None, float] | None:
        """The attempt a trainer runs and how long it has been idle; None when it does not
        answer in time."""
        import ray

        try:
            running, idle_for = ray.get(
                [trainer.busy.remote(), trainer.idle_for.remote()], timeout=self.timeout_s
            )
        except Exception:
            return None
        return running, idle_for

    def _active(self, run: Run) -> bool:
        import ray

        if run.result is None:
            return True
        done, _ = ray.wait([run.result], timeout=0)
        return not done

    def _start(self, shape: TrainerShape, slot: int, max_task_retries: int) -> Any | None:
        import ray

        from training.warm_trainer import WarmTrainer

        resources = json.loads(shape.worker_resources) if shape.worker_resources else {}
        actor = ray.remote(WarmTrainer).options(  # type: ignore[attr-defined]
            name=shape.name(self.code_version, slot),
            namespace=NAMESPACE,
            lifetime="detached",
            max_concurrency=4,  # its questions are answered while it trains
            max_restarts=-1,
            max_task_retries=max_task_retries,
            num_cpus=0 if shape.use_gpu else 1,
            num_gpus=1 if shape.use_gpu else 0,
            resources=resources,
            runtime_env=self.cold.trainer_runtime_env({}),
        )
        logger.info("starting a warm trainer for %s", shape.base_model_path)
        try:
            return actor.remote(shape.base_model_path, shape.use_gpu, shape.torch_threads)
        except ValueError:  # the name is still taken (a trainer being killed): go cold
            logger.info("a warm trainer's name is not free yet", exc_info=True)
            return None

    def _get(self, name: str) -> Any | None:
        import ray

        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None

    def _trainers(self) -> list[tuple[str, Any]]:
        import ray

        named = ray.util.list_named_actors(all_namespaces=True)
        names = [entry["name"] for entry in named if entry.get("namespace") == NAMESPACE]
        return [(name, actor) for name in names if (actor := self._get(name)) is not None]

    def _find(self, submission_id: str) -> tuple[Any, tuple[str, str]] | None:
        """The trainer that runs or ran the attempt, and what it says of it."""
        import ray

        for _, trainer in self._trainers():
            with contextlib.suppress(Exception):
                answer = ray.get(trainer.state_of.remote(submission_id), timeout=self.timeout_s)
                if answer is not None:
                    return trainer, (answer[0], answer[1])
        return None

    def _remember(self, submission_id: str, run: Run) -> None:
        self._runs[submission_id] = run
        self._runs.move_to_end(submission_id)
        while len(self._runs) > REMEMBERED_RUNS:
            self._runs.popitem(last=False)


def _actor_id(trainer: Any) -> str:
    """An actor's identity: handles to one actor are distinct objects."""
    return str(trainer._actor_id.hex())
