"""Supervised fine-tuning with LoRA: the recipe each Ray Train worker runs.

One optimizer step takes `batch_size` examples (OpenAI's meaning of batch size), split
across the data-parallel workers. Each worker packs its share into padding-free rows and
accumulates gradients over as few forward passes as its token budget allows. The summed
token loss is divided by the target tokens of the whole step, so every learned token
counts once whatever the packing, the number of workers or the lengths: a packed step
gives exactly the loss of the same examples run one by one.

`SupervisedRun` knows nothing of Ray: `train_loop_per_worker` adapts it to a Ray Train
worker, and tests drive it directly in-process.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from training.attention import one_row
from training.checkpoints import (
    TrainingPosition,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.control import PauseWatch
from training.data.batching import PackedBatch, as_one_row, collate, plan_micro_batches
from training.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from training.data.validation import read_examples
from training.lora import build_lora_model
from training.node_cache import fetch_model, scratch_folder
from training.progress import Checkpoint, Notice, Paused, ProgressLog, Started
from training.reporting import MetricsReporter
from training.spec import TrainingSpec
from training.storage import ArtifactStore, open_store

KEEP_EPOCH_CHECKPOINTS = 3  # as OpenAI: the last three epochs stay usable models
MAX_VALID_EVALS = 100  # small-batch validation runs at most this often over a run

Outcome = Literal["completed", "paused", "early_stopped"]


@dataclass
class TokenCounts:
    loss_sum: float = 0.0
    n_targets: int = 0
    n_correct: int = 0

    def add(self, other: TokenCounts) -> None:
        self.loss_sum += other.loss_sum
        self.n_targets += other.n_targets
        self.n_correct += other.n_correct

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_targets, 1)

    @property
    def accuracy(self) -> float:
        return self.n_correct / max(self.n_targets, 1)


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

    def sum(self, counts: TokenCounts) -> TokenCounts:
        if self.world_size == 1:
            return counts
        import torch.distributed as dist

        values = torch.tensor(
            [counts.loss_sum, counts.n_targets, counts.n_correct],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(values)
        return TokenCounts(float(values[0]), int(values[1]), int(values[2]))

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def forward_counts(model: Any, batch: PackedBatch) -> tuple[torch.Tensor, TokenCounts]:
    """Summed next-token loss over the batch's target tokens, and its accuracy counts."""
    logits = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        spans=batch.spans,  # read by training.attention; other implementations ignore it
        use_cache=False,
    ).logits.float()
    labels = batch.labels
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    mask = labels != IGNORE_INDEX
    correct = int(((logits.argmax(-1) == labels) & mask).sum().item())
    return loss_sum, TokenCounts(loss_sum.item(), int(mask.sum().item()), correct)


def load_tokenized(
    path: str | Path, spec: TrainingSpec, tokenizer: Any, data_format: str | None = None
) -> tuple[list[TokenizedExample], int]:
    """The file's examples that still have a target token once truncated to max_length,
    and how many had none (they are left out, and the job says so)."""
    examples = read_examples(str(path), data_format or spec.data_format)  # type: ignore[arg-type]
    tokenized = [tokenize_example(e, tokenizer, spec.max_length) for e in examples]
    kept = [t for t in tokenized if t.n_target_tokens > 0]
    return kept, len(tokenized) - len(kept)


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The same permutation for a given seed and epoch, so a resumed run sees the data
    exactly as the interrupted one would have."""
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _no_sync(model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradients are all-reduced once per optimizer step, on its last backward pass."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


class SupervisedRun:
    """`store`: the artifact store (data in; checkpoints, adapter, progress out);
    `scratch`: this worker's local folder for the run."""

    def __init__(
        self,
        spec: TrainingSpec,
        store: ArtifactStore,
        scratch: Path,
        device: torch.device | None = None,
        workers: Workers | None = None,
        wrap_model: Callable[[Any], Any] = lambda model: model,
    ):
        from transformers import AutoTokenizer, get_scheduler

        self.spec, self.hp = spec, spec.hyperparameters
        self.store, self.scratch = store, scratch
        self.device = device or torch.device("cpu")
        self.workers = workers or Workers()
        random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        model_path = fetch_model(spec.base_model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if spec.chat_template:  # the base model's configured template, as serving uses it
            tokenizer.chat_template = spec.chat_template
        training_file = store.local_file(spec.training_file, scratch)
        self.train_examples, dropped = load_tokenized(training_file, spec, tokenizer)
        self.valid_examples = (
            load_tokenized(
                store.local_file(spec.validation_file, scratch),
                spec,
                tokenizer,
                spec.validation_format,
            )[0]
            if spec.validation_file
            else []
        )
        if not self.train_examples:
            raise ValueError(
                "No training example has a token to learn within max_length "
                f"({spec.max_length} tokens): shorten the prompts or use a model with a "
                "longer context"
            )
        self.dropped_examples = dropped
        self.model = build_lora_model(model_path, self.hp, self.device)
        self.one_row = one_row(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=self.hp.learning_rate, weight_decay=self.hp.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(self.train_examples) / self.hp.batch_size)
        self.total_steps = self.steps_per_epoch * self.hp.n_epochs
        self.scheduler = get_scheduler(
            self.hp.lr_scheduler,
            self.optimizer,
            num_warmup_steps=int(self.total_steps * self.hp.warmup_ratio),
            num_training_steps=self.total_steps,
        )
        self.position = TrainingPosition()
        if spec.resume_from:
            self.position = load_checkpoint(
                store, spec.resume_from, self.model, self.optimizer, self.scheduler, scratch
            )
        self.model = wrap_model(self.model)  # after loading: DDP starts from equal weights
        self.reporter = MetricsReporter(spec, store, scratch) if self.workers.is_chief else None
        self.pause = PauseWatch(store, spec.output_key)
        self.valid_every = max(1, math.ceil(self.total_steps / MAX_VALID_EVALS))
        self.last_metrics: dict[str, float] = {}

    @property
    def unwrapped(self) -> Any:
        return self.model.module if hasattr(self.model, "module") else self.model

    # --- train
    def run(self) -> Outcome:
        started = time.monotonic()
        if self.reporter:
            self.reporter.progress.write(
                Started(
                    total_steps=self.total_steps,
                    resumed_from_step=self.position.step,
                    n_examples=len(self.train_examples),
                    n_truncated=sum(t.truncated for t in self.train_examples),
                    n_dropped=self.dropped_examples,
                    trained_tokens=sum(len(t.input_ids) for t in self.train_examples)
                    * self.hp.n_epochs,
                )
            )
        steps_at_start = self.position.step
        self.model.train()
        for epoch in range(self.position.epoch, self.hp.n_epochs):
            order = epoch_order(len(self.train_examples), self.spec.seed, epoch)
            for batch_index in range(self.position.next_batch, self.steps_per_epoch):
                start = batch_index * self.hp.batch_size
                batch = [self.train_examples[i] for i in order[start : start + self.hp.batch_size]]
                counts = self.train_step(batch)
                self.position.step += 1
                self.position.next_batch = batch_index + 1
                epoch_end = batch_index == self.steps_per_epoch - 1
                self._report_step(counts, started, steps_at_start, epoch_end)
                if self.workers.any(self.workers.is_chief and self.pause.requested()):
                    self._save_paused()
                    return "paused"
            self.position.epoch, self.position.next_batch = epoch + 1, 0
            if self._end_epoch():
                return "early_stopped"
        return "completed"

    def train_step(self, batch: Sequence[TokenizedExample]) -> TokenCounts:
        """One optimizer step over `batch`; returns the step's summed counts (all workers)."""
        workers = self.workers
        n_targets = max(sum(e.n_target_tokens for e in batch), 1)
        mine = list(batch[workers.rank :: workers.world_size])
        weight = 1.0
        if not mine:  # fewer examples than workers: join the all-reduce with a zero loss
            mine, weight = [batch[0]], 0.0
        plan = plan_micro_batches(mine, self.spec.micro_batch_tokens)
        counts = TokenCounts()
        for index, rows in enumerate(plan):
            with _no_sync(self.model, last=index == len(plan) - 1):
                loss_sum, micro = forward_counts(self.model, self._batch(rows))
                # DDP averages gradients over workers; scaling by their number makes the
                # result the gradient of (all target tokens' loss) / (their count).
                (loss_sum * (weight * workers.world_size / n_targets)).backward()
            if weight:
                counts.add(micro)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return workers.sum(counts)

    # --- evaluate
    @torch.no_grad()
    def evaluate(self, examples: Sequence[TokenizedExample]) -> TokenCounts:
        model = self.unwrapped  # no DDP hooks: evaluation has no gradients to sync
        was_training = model.training
        model.eval()
        counts = TokenCounts()
        mine = list(examples[self.workers.rank :: self.workers.world_size])
        for rows in plan_micro_batches(mine, self.spec.micro_batch_tokens):
            counts.add(forward_counts(model, self._batch(rows))[1])
        model.train(was_training)
        return self.workers.sum(counts)

    def _batch(self, rows: Sequence[Sequence[TokenizedExample]]) -> PackedBatch:
        return collate(as_one_row(rows) if self.one_row else rows).to(self.device)

    def _valid_batch(self) -> list[TokenizedExample]:
        size = min(self.hp.batch_size, len(self.valid_examples))
        cursor = self.position.valid_cursor
        picked = [self.valid_examples[(cursor + i) % len(self.valid_examples)] for i in range(size)]
        self.position.valid_cursor = (cursor + size) % len(self.valid_examples)
        return picked

    # --- report
    def _report_step(
        self, counts: TokenCounts, started: float, steps_at_start: int, epoch_end: bool
    ) -> None:
        step = self.position.step
        values = {"train_loss": counts.loss, "train_mean_token_accuracy": counts.accuracy}
        if self.valid_examples and (step % self.valid_every == 0 or epoch_end):
            valid = self.evaluate(self._valid_batch())
            values |= {"valid_loss": valid.loss, "valid_mean_token_accuracy": valid.accuracy}
        if self.valid_examples and epoch_end:
            full = self.evaluate(self.valid_examples)
            values |= {
                "full_valid_loss": full.loss,
                "full_valid_mean_token_accuracy": full.accuracy,
            }
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
        if self.reporter:
            key, _ = save_checkpoint(
                self.store,
                self.spec.checkpoints_key,
                position,
                self.unwrapped,
                self.optimizer,
                self.scheduler,
                self.scratch,
                keep=KEEP_EPOCH_CHECKPOINTS,
            )
            self.reporter.progress.write(
                Checkpoint(
                    step=position.step,
                    epoch=position.epoch,
                    path=key,
                    metrics={"step": position.step, **values},
                )
            )
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    spec = TrainingSpec.model_validate(config["spec"])
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
        run = SupervisedRun(
            spec,
            store,
            folder,
            device=device,
            workers=Workers(context.get_world_rank(), context.get_world_size(), device),
            wrap_model=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
        )
        try:
            if run.run() != "paused":
                run.save_adapter()
        finally:
            run.close()
