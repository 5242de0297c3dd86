"""The training loop every recipe shares: a LoRA model, its optimizer and schedule, epochs
of shuffled batches, validation, checkpoints, pause and resume, and the progress records.

A recipe (training/recipes/) says only what is particular to its method: how a file
becomes training units (examples, preference pairs, text blocks), how units are packed
into forward passes, and the loss and metrics of one pass. One optimizer step takes
`batch_size` units (OpenAI's meaning of batch size), split across the data-parallel
workers; each worker accumulates gradients over as few packed forward passes as its token
budget allows, and every loss is normalised by the whole step's count (tokens or pairs),
so the result does not depend on the packing or on the number of workers.

`TrainingRun` knows nothing of Ray: `train_loop_per_worker` adapts it to a Ray Train
worker, and tests drive it directly in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

import torch

from training import evaluation
from training.attention import one_row
from training.checkpoints import (
    TrainingPosition,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.control import PauseWatch
from training.data.batching import PackedBatch, as_one_row, collate
from training.data.tokenize import TokenizedExample
from training.hyperparameters import resolve_sizes
from training.lora import build_lora_model
from training.methods import METHODS
from training.node_cache import fetch_model, scratch_folder
from training.progress import Checkpoint, Evaluation, Notice, Paused, ProgressLog, Started
from training.reporting import MetricsReporter
from training.spec import KEEP_CHECKPOINTS, TrainingSpec, checkpoint_adapter_key
from training.storage import ArtifactStore, open_store
from training.warm import WarmBase

MAX_VALID_EVALS = 100  # small-batch validation runs at most this often over a run

Outcome = Literal["completed", "paused", "early_stopped"]
# One forward pass: rows, each a list of sequences packed end to end.
ForwardPass = list[list[TokenizedExample]]
Unit = TypeVar("Unit")


@dataclasses.dataclass
class Tally:
    """Sums a recipe reports per forward pass and adds up over passes and workers.

    Every field is a number; `metrics()` turns the sums into the reported values."""

    def add(self, other: Self) -> None:
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def as_list(self) -> list[float]:
        return [float(getattr(self, item.name)) for item in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Self:
        names = [item.name for item in dataclasses.fields(cls)]
        return cls(**dict(zip(names, values, strict=True)))

    @property
    def loss(self) -> float:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        raise NotImplementedError


class Workers:
    """This worker's place among the data-parallel workers, and their few collectives."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank, self.world_size = rank, world_size
        # Collectives run on the process group's device: NCCL (GPU workers) rejects CPU
        # tensors, gloo (CPU workers) takes them.
        self.device = device or torch.device("cpu")

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def share(self, units: Sequence[Unit]) -> list[Unit]:
        return list(units[self.rank :: self.world_size])

    def sum_tensor(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        on_device = values.to(self.device)
        dist.all_reduce(on_device)
        return on_device.to(values.device)

    def sum(self, tally: Any) -> Any:
        if self.world_size == 1:
            return tally
        values = torch.tensor(tally.as_list(), dtype=torch.float64)
        return type(tally).from_list(self.sum_tensor(values).tolist())

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def epoch_order(n_units: int, seed: int, epoch: int) -> list[int]:
    """The same permutation for a given seed and epoch, so a resumed run sees the data
    exactly as the interrupted one would have."""
    order = list(range(n_units))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _no_sync(model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradients are all-reduced once per optimizer step, on its last backward pass."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


class TrainingRun(ABC, Generic[Unit]):
    """`store`: the artifact store (data in; checkpoints, adapter, progress out);
    `scratch`: this worker's local folder for the run."""

    # What the recipe calls one unit in messages ("example", "pair", "block").
    unit_name: ClassVar[str] = "example"

    def __init__(
        self,
        spec: TrainingSpec,
        store: ArtifactStore,
        scratch: Path,
        device: torch.device | None = None,
        workers: Workers | None = None,
        wrap_model: Callable[[Any], Any] = lambda model: model,
        warm: WarmBase | None = None,
    ):
        """`warm`: the base model a warm trainer keeps loaded; this run takes copies of
        its model and tokenizer when it is this run's base model."""
        from transformers import AutoTokenizer, get_scheduler

        self.spec, self.hp = spec, spec.hyperparameters
        self.store, self.scratch = store, scratch
        self.device = device or torch.device("cpu")
        self.workers = workers or Workers()
        random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        model_path = fetch_model(spec.base_model_path)
        warm = warm if warm is not None and warm.serves(spec.base_model_path) else None
        self.tokenizer = warm.tokenizer() if warm else AutoTokenizer.from_pretrained(model_path)
        if spec.chat_template:  # the base model's configured template, as serving uses it
            self.tokenizer.chat_template = spec.chat_template
        self.train_units, self.dropped_units = self.load_units(
            store.local_file(spec.training_file, scratch), spec.data_format
        )
        self.valid_units = (
            self.load_units(
                store.local_file(spec.validation_file, scratch), spec.validation_format
            )[0]
            if spec.validation_file
            else []
        )
        if spec.requested_sizes is not None:  # units only this trainer can count
            sizes = resolve_sizes(
                spec.requested_sizes.get("n_epochs", "auto"),
                spec.requested_sizes.get("batch_size", "auto"),
                len(self.train_units),
                spec.min_auto_batch_size,
                METHODS[spec.method].min_auto_passes,
            )
            self.hp = self.hp.model_copy(update=sizes)
        if not self.train_units:
            raise ValueError(
                f"No training {self.unit_name} has a token to learn within max_length "
                f"({spec.max_length} tokens): shorten the prompts or use a model with a "
                "longer context"
            )
        start_adapter = self._start_adapter_folder()
        self.model = build_lora_model(
            model_path, self.hp, self.device, start_adapter, base=warm.model() if warm else None
        )
        self.one_row = one_row(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # torch's fused AdamW: one kernel per tensor instead of a dozen small ops (the
        # adapter's 420 tensors on SmolLM2: 22 -> 4 ms a step on a CPU); same update.
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=self.hp.learning_rate,
            weight_decay=self.hp.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.steps_per_epoch = math.ceil(len(self.train_units) / self.hp.batch_size)
        self.total_steps = self.steps_per_epoch * self.hp.n_epochs
        self.scheduler = get_scheduler(
            self.hp.lr_scheduler,
            self.optimizer,
            num_warmup_steps=int(self.total_steps * self.hp.warmup_ratio),
            num_training_steps=self.total_steps,
        )
        self.position = TrainingPosition()
        if spec.resume_from:
            self.position, state = load_checkpoint(
                store, spec.resume_from, self.model, self.optimizer, self.scheduler, scratch
            )
            self.restore(state)
        else:
            self.begin()
        self.model = wrap_model(self.model)  # after loading: DDP starts from equal weights
        self.reporter = MetricsReporter(spec, store, scratch) if self.workers.is_chief else None
        self.pause = PauseWatch(store, spec.output_key)
        self.valid_every = max(1, math.ceil(self.total_steps / MAX_VALID_EVALS))
        self.last_metrics: dict[str, float] = {}

    # --- what a recipe defines
    @abstractmethod
    def load_units(self, path: Path, data_format: str) -> tuple[list[Unit], int]:
        """The file's units that have something to learn within max_length, and how many
        had nothing left once truncated (they are left out, and the job says so)."""

    @abstractmethod
    def sequences(self, unit: Unit) -> list[TokenizedExample]:
        """The token sequences of a unit (they always share a forward pass)."""

    @abstractmethod
    def plan(self, units: Sequence[Unit]) -> list[ForwardPass]:
        """This worker's units of one step as packed forward passes."""

    @abstractmethod
    def normalizer(self, batch: Sequence[Unit]) -> Any:
        """What the step's losses are divided by (its token or pair counts), computed on
        the whole step's batch so that every worker divides alike."""

    @abstractmethod
    def forward(self, model: Any, rows: ForwardPass, normalizer: Any) -> tuple[torch.Tensor, Tally]:
        """One packed forward pass: its share of the step's loss, and its tally."""

    @abstractmethod
    def new_tally(self) -> Tally: ...

    def begin(self) -> None:
        """Before the first step of a run that does not resume (e.g. reference values)."""

    def recipe_state(self) -> dict[str, Any]:
        """What the recipe needs to resume, saved with every checkpoint."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """The recipe's part of a checkpoint, when resuming."""

    # --- shared
    def _start_adapter_folder(self) -> Path | None:
        """The adapter a run on top of a tuned model is built from: the tuned model's, or,
        when resuming, the checkpoint's own (same shape), so that a resumed run does not
        depend on the tuned model still existing."""
        spec = self.spec
        if spec.start_adapter is None:
            return None
        key = checkpoint_adapter_key(spec.resume_from) if spec.resume_from else spec.start_adapter
        return self.store.local_folder(key) or self.store.get_folder(
            key, self.scratch / "start-adapter"
        )

    @property
    def unwrapped(self) -> Any:
        return self.model.module if hasattr(self.model, "module") else self.model

    def unit_tokens(self, unit: Unit) -> int:
        return sum(len(s.input_ids) for s in self.sequences(unit))

    def batch(self, rows: ForwardPass) -> PackedBatch:
        return collate(as_one_row(rows) if self.one_row else rows).to(self.device)

    # --- train
    def run(self) -> Outcome:
        started = time.monotonic()
        if self.reporter:
            self.reporter.progress.write(
                Started(
                    total_steps=self.total_steps,
                    resumed_from_step=self.position.step,
                    n_examples=len(self.train_units),
                    n_truncated=sum(
                        any(s.truncated for s in self.sequences(u)) for u in self.train_units
                    ),
                    n_dropped=self.dropped_units,
                    trained_tokens=sum(self.unit_tokens(u) for u in self.train_units)
                    * self.hp.n_epochs,
                    hyperparameters={
                        "n_epochs": self.hp.n_epochs,
                        "batch_size": self.hp.batch_size,
                    },
                )
            )
        if self.valid_units and self.position.step == 0:
            self._evaluate_start()
        outcome = self._train(started)
        if outcome != "paused" and self.valid_units:
            self._evaluate_end()
        return outcome

    def _train(self, started: float) -> Outcome:
        steps_at_start = self.position.step
        self.model.train()
        if self.position.next_batch >= self.steps_per_epoch and self._end_unended_epoch():
            return "early_stopped"
        for epoch in range(self.position.epoch, self.hp.n_epochs):
            order = epoch_order(len(self.train_units), self.spec.seed, epoch)
            for batch_index in range(self.position.next_batch, self.steps_per_epoch):
                start = batch_index * self.hp.batch_size
                batch = [self.train_units[i] for i in order[start : start + self.hp.batch_size]]
                tally = self.train_step(batch)
                self.position.step += 1
                self.position.next_batch = batch_index + 1
                epoch_end = batch_index == self.steps_per_epoch - 1
                self._report_step(tally, started, steps_at_start, epoch_end)
                # The epoch ends (its full validation counted, its checkpoint written)
                # before a pause takes effect: the pause checkpoint then holds the next
                # epoch's start, and a resumed run has no epoch end left to make up.
                if epoch_end:
                    self.position.epoch, self.position.next_batch = epoch + 1, 0
                    if self._end_epoch():
                        return "early_stopped"
                if self.workers.any(self.workers.is_chief and self.pause.requested()):
                    self._save_paused()
                    return "paused"
        return "completed"

    def _end_unended_epoch(self) -> bool:
        """A pause checkpoint of an older trainer, written on an epoch's last step before
        that epoch's end: the epoch ends now, its full validation measured on the model as
        it was paused (the step's training figures were reported before the pause).
        True when early stopping says stop."""
        if self.valid_units:
            self.last_metrics = _prefixed("full_valid_", self.evaluate(self.valid_units).metrics())
        self.position.epoch, self.position.next_batch = self.position.epoch + 1, 0
        return self._end_epoch()

    def train_step(self, batch: Sequence[Unit]) -> Tally:
        """One optimizer step over `batch`; returns the step's summed tally (all workers)."""
        mine = self.workers.share(batch)
        # Fewer units than workers: this one joins the all-reduce with a zero loss.
        tally = self.optimize(mine or [batch[0]], self.normalizer(batch), float(bool(mine)))
        return self.workers.sum(tally)

    def optimize(self, mine: Sequence[Any], normalizer: Any, weight: float = 1.0) -> Tally:
        """One optimizer step on this worker's share of a step (the units `plan` takes),
        each loss divided by the whole step's `normalizer`; this worker's tally. With
        `weight` 0 the units only take part in the gradients' all-reduce."""
        workers = self.workers
        plan = self.plan(mine)
        tally = self.new_tally()
        for index, rows in enumerate(plan):
            with _no_sync(self.model, last=index == len(plan) - 1):
                loss, part = self.forward(self.model, rows, normalizer)
                # DDP averages gradients over workers; scaling by their number makes the
                # result the gradient of the whole step's loss.
                (loss * (weight * workers.world_size)).backward()
            if weight:
                tally.add(part)
        self._step_optimizer()
        return tally

    def _step_optimizer(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.trainable, self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --- evaluate
    def _evaluate_start(self) -> None:
        """Before the first step: the validation figures of the model the run starts from
        (kept in the run's position, so that a resumed run still compares with them)."""
        figures = _prefixed("full_valid_", self.evaluate(self.valid_units).metrics())
        self.position.start_validation = figures | self._generation_scores()
        if self.reporter:
            self.reporter.progress.write(
                Evaluation(stage="start", step=0, metrics=self.position.start_validation)
            )

    def _evaluate_end(self) -> None:
        """After the last step: the tuned model's figures, beside the start's."""
        figures = {k: v for k, v in self.last_metrics.items() if k.startswith("full_valid_")}
        if not figures:  # resumed after its last step: nothing was measured in this run
            figures = _prefixed("full_valid_", self.evaluate(self.valid_units).metrics())
        figures |= self._generation_scores()
        if self.reporter:
            self.reporter.progress.write(
                Evaluation(
                    stage="end",
                    step=self.position.step,
                    metrics=figures,
                    start_metrics=self.position.start_validation,
                )
            )

    def _generation_scores(self) -> dict[str, float]:
        """Greedy answers to the validation examples that have one, scored (chief only)."""
        chosen = evaluation.samples(self.valid_units, self.tokenizer)
        if not chosen or not self.workers.is_chief:
            return {}
        answers = evaluation.generate(self.unwrapped, self.tokenizer, chosen, self.device)
        return evaluation.score(answers, chosen)

    @torch.no_grad()
    def evaluate(self, units: Sequence[Unit]) -> Tally:
        model = self.unwrapped  # no DDP hooks: evaluation has no gradients to sync
        was_training = model.training
        model.eval()
        tally = self.new_tally()
        mine = self.workers.share(units)
        if mine:
            normalizer = self.normalizer(units)
            for rows in self.plan(mine):
                tally.add(self.forward(model, rows, normalizer)[1])
        model.train(was_training)
        return self.workers.sum(tally)

    def _valid_batch(self) -> list[Unit]:
        size = min(self.hp.batch_size, len(self.valid_units))
        cursor = self.position.valid_cursor
        picked = [self.valid_units[(cursor + i) % len(self.valid_units)] for i in range(size)]
        self.position.valid_cursor = (cursor + size) % len(self.valid_units)
        return picked

    # --- report
    def _report_step(
        self, tally: Tally, started: float, steps_at_start: int, epoch_end: bool
    ) -> None:
        step = self.position.step
        values = _prefixed("train_", tally.metrics()) | self.validation_values(step, epoch_end)
        self.last_metrics = values
        if self.reporter:
            elapsed = time.monotonic() - started
            self.reporter.metrics(
                step,
                self.total_steps,
                values,
                elapsed_s=round(elapsed, 3),
                steps_this_run=step - steps_at_start,
            )

    def validation_values(self, step: int, epoch_end: bool) -> dict[str, float]:
        """A validation batch's figures every `valid_every` steps, and the whole set's at
        each epoch's end."""
        values: dict[str, float] = {}
        if self.valid_units and (step % self.valid_every == 0 or epoch_end):
            values |= _prefixed("valid_", self.evaluate(self._valid_batch()).metrics())
        if self.valid_units and epoch_end:
            values |= _prefixed("full_valid_", self.evaluate(self.valid_units).metrics())
        return values

    def _end_epoch(self) -> bool:
        """The epoch's checkpoint, after its full validation; True when early stopping
        says stop."""
        position, values = self.position, self.last_metrics
        full_loss = values.get("full_valid_loss")
        if full_loss is not None:
            if position.best_full_valid_loss is None or full_loss < position.best_full_valid_loss:
                position.best_full_valid_loss, position.epochs_without_improvement = full_loss, 0
            else:
                position.epochs_without_improvement += 1
        self.checkpoint(KEEP_CHECKPOINTS)
        patience = self.hp.early_stopping_patience
        stop = bool(patience and position.epochs_without_improvement >= patience)
        if stop and self.reporter and position.epoch < self.hp.n_epochs:
            self.reporter.progress.write(
                Notice(
                    message=f"Early stopping after epoch {position.epoch}: the full "
                    f"validation loss has not improved for {patience} epoch(s)",
                )
            )
        return stop

    def checkpoint(self, keep: int | Callable[[list[int]], Collection[int]]) -> None:
        """A checkpoint of the run as it is (rank 0), its metrics the last step's; `keep`
        as training.checkpoints.save_checkpoint takes it."""
        if not self.reporter:
            return
        position = self.position
        key, _ = save_checkpoint(
            self.store,
            self.spec.checkpoints_key,
            position,
            self.unwrapped,
            self.optimizer,
            self.scheduler,
            self.scratch,
            keep=keep,
            recipe_state=self.recipe_state(),
        )
        self.reporter.progress.write(
            Checkpoint(
                step=position.step,
                epoch=position.epoch,
                path=key,
                metrics={"step": position.step, **self.last_metrics},
            )
        )

    def _save_paused(self) -> None:
        if self.reporter:
            key, _ = save_checkpoint(
                self.store,
                self.spec.paused_key,
                self.position,
                self.unwrapped,
                self.optimizer,
                self.scheduler,
                self.scratch,
                recipe_state=self.recipe_state(),
            )
            self.reporter.progress.write(Paused(step=self.position.step, path=key))

    def save_adapter(self) -> None:
        if self.workers.is_chief:
            local = self.scratch / "adapter"
            self.unwrapped.save_pretrained(local, safe_serialization=True)
            self.store.put_folder(local, self.spec.adapter_key)

    def close(self) -> None:
        if self.reporter:
            self.reporter.close()


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {prefix + name: value for name, value in values.items()}


def train_loop_per_worker(config: dict[str, Any], warm: WarmBase | None = None) -> None:
    """A Ray Train worker's loop; `warm`: the base model of the warm trainer this runs in
    (Ray Train's local mode, training/warm_trainer.py)."""
    import ray.train
    import ray.train.torch

    from training.recipes import recipe_for

    spec = TrainingSpec.model_validate(config["spec"])
    if spec.torch_threads is not None:
        torch.set_num_threads(spec.torch_threads)
    store = open_store(spec.storage_url)
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    # Ray Train restarts the workers after a worker failure (FailureConfig): this attempt
    # then continues from its own newest epoch checkpoint, not from where it began.
    own = latest_checkpoint(store, spec.checkpoints_key)
    if own is not None:
        spec = spec.model_copy(update={"resume_from": own})
        if context.get_world_rank() == 0:
            ProgressLog(store, spec.output_key).write(
                Notice(
                    message=f"A training worker failed; training continues from the "
                    f"checkpoint at step {int(own.rsplit('step-', 1)[-1])}"
                )
            )
    with scratch_folder(f"{spec.job_id}-rank{context.get_world_rank()}-") as folder:
        run = recipe_for(spec.method)(
            spec,
            store,
            folder,
            device=device,
            workers=Workers(context.get_world_rank(), context.get_world_size(), device),
            wrap_model=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
            warm=warm,
        )
        try:
            if run.run() != "paused":
                run.save_adapter()
        finally:
            run.close()
