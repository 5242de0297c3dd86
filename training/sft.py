"""Supervised fine-tuning with LoRA: the recipe each Ray Train worker runs.

Life cycle: setup (data, model, optimizer) → train (epochs of optimizer steps, metrics
every step) → save_adapter. Each optimizer step takes `batch_size` examples split across
the workers; each example is its own micro-batch (no padding), and the summed token loss
is divided by the number of target tokens in the step so every learned token counts once.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from training.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from training.data.validation import read_examples
from training.progress import ProgressLog
from training.spec import TrainingSpec

LORA_TARGET_MODULES = "all-linear"


@dataclass
class StepMetrics:
    loss_sum: float = 0.0
    n_targets: int = 0
    n_correct: int = 0

    def add(self, other: StepMetrics) -> None:
        self.loss_sum += other.loss_sum
        self.n_targets += other.n_targets
        self.n_correct += other.n_correct


def load_tokenized(spec: TrainingSpec, path: str, tokenizer: Any) -> list[TokenizedExample]:
    examples = read_examples(path, spec.data_format)
    tokenized = [tokenize_example(e, tokenizer, spec.max_length) for e in examples]
    return [t for t in tokenized if t.n_target_tokens > 0]


def build_model(spec: TrainingSpec, device: torch.device) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    model = AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=dtype or torch.float32)
    hp = spec.hyperparameters
    lora = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora).to(device)


def example_forward(
    model: Any, example: TokenizedExample, device: torch.device
) -> tuple[Any, StepMetrics]:
    """Summed loss over the example's target tokens, and its accuracy counts."""
    input_ids = torch.tensor([example.input_ids], device=device)
    labels = torch.tensor([example.labels], device=device)
    logits = model(input_ids=input_ids).logits[:, :-1, :].float()
    targets = labels[:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    mask = targets != IGNORE_INDEX
    correct = ((logits.argmax(-1) == targets) & mask).sum().item()
    return loss_sum, StepMetrics(loss_sum.item(), int(mask.sum().item()), int(correct))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer, get_scheduler

    spec = TrainingSpec.model_validate(config["spec"])
    hp = spec.hyperparameters
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    progress = ProgressLog(spec.progress_path) if rank == 0 else None

    # --- setup
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    examples = load_tokenized(spec, spec.training_file, tokenizer)
    model = build_model(spec, device)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=int(total_steps * hp.warmup_ratio),
        num_training_steps=total_steps,
    )
    if progress:
        n_truncated = sum(t.truncated for t in examples)
        progress.write(
            "started",
            total_steps=total_steps,
            n_examples=len(examples),
            n_truncated=n_truncated,
            trained_tokens=sum(len(t.input_ids) for t in examples) * hp.n_epochs,
        )

    # --- train
    started_at = time.monotonic()
    order = list(range(len(examples)))
    shuffler = random.Random(spec.seed)
    step = 0
    model.train()
    for _epoch in range(hp.n_epochs):
        shuffler.shuffle(order)
        for start in range(0, len(order), hp.batch_size):
            batch = [examples[i] for i in order[start : start + hp.batch_size]]
            mine = batch[rank::world_size]
            n_targets = max(sum(t.n_target_tokens for t in mine), 1)
            metrics = StepMetrics()
            for example in mine:
                loss_sum, example_metrics = example_forward(model, example, device)
                (loss_sum / n_targets).backward()
                metrics.add(example_metrics)
            torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress:
                progress.write(
                    "metrics",
                    step=step,
                    total_steps=total_steps,
                    train_loss=metrics.loss_sum / max(metrics.n_targets, 1),
                    train_mean_token_accuracy=metrics.n_correct / max(metrics.n_targets, 1),
                    elapsed_s=round(time.monotonic() - started_at, 3),
                )

    # --- save_adapter
    if rank == 0:
        unwrapped: Any = model.module if hasattr(model, "module") else model
        unwrapped.save_pretrained(spec.adapter_dir, safe_serialization=True)
