"""Trainer throughput: ftaas's packed, padding-free LoRA trainer against its peers. For
supervised tuning (`--method supervised`): TRL's `SFTTrainer` (packing `bfd`, padding-free,
its chunked log-probability head) and transformers' padded `Trainer`, both + peft; for DPO
(`--method dpo`): TRL's `DPOTrainer` + peft. `ftaas-plain` is ftaas with the plain
full-logits loss instead of its chunked one (training/token_logps.py), so that the loss's
own effect shows; `ftaas-ckpt` (on request, `--peers`) is ftaas with gradient checkpointing
on, which TRL's SFTConfig turns on by default, and `ftaas-mlp-ckpt` (on request) ftaas with
selective activation checkpointing, the MLPs' activations only. The peers load the base
model as ftaas does (training.lora), so every row trains the same weights in the same dtype:
on a CPU with bf16 arithmetic a model stored in bf16 trains in bf16
(training.lora.training_dtype); `ftaas-fp32` and `trl-fp32` (on request) are ftaas and TRL's
SFTTrainer over the base model in float32.

ftaas's rows run in the native memory environment the service gives its trainers
(training/native_memory.py: jemalloc, the copy in Ray's wheel, and oneDNN's per-shape caches
bounded); `ftaas-system` and `ftaas-ckpt-system` (on request) are the same with glibc's
malloc, as TRL's rows run, and `trl-jemalloc` (on request) is TRL's SFTTrainer in the
trainers' environment too. `--live-memory` (CPU) runs each row once more under torch's
profiler for its peak of live tensors, what a GPU's allocated-memory figure counts: on CPU
the resident set also holds the allocator's free blocks.

Every run uses the same base model, the same tokenized examples (chat data whose lengths
vary like real chat logs), the same LoRA and optimiser hyperparameters and about the same
number of optimizer steps (TRL's SFT packs bins of about a step's tokens, one bin a step).
Each run is its own child process of this script, in turn, so peak memory (resident set on
CPU, the process's own high-water mark, bench/peak_memory.py; allocated on GPU; the
process's whole, model and libraries included) is each run's own; the best of `--rounds`
is kept for each. Printed, one table per batch size: trained (non-padding) tokens per
second, ftaas's ratio to each row, peak memory and its ratio, the training's own memory
(the peak above the peak reached by the time the model and data were loaded and training
started: activations, gradients, optimizer state, logits and the allocator's share) and
its ratio, the final loss of each adapter over the whole dataset, and on a GPU the model
FLOPs utilisation (MFU: the FLOPs the training needs, per second, over the GPU's peak;
see `model_flops`).

Models (`--model`): `tiny` (ftaas-tiny, 2 layers, vocabulary 1,024), `smollm2` (the
embedded default, SmolLM2-135M-Instruct: 30 layers, vocabulary 49,152, from its package),
`llama-128k` (a random Llama of about 110 M parameters with Llama 3's 128,256-token
vocabulary, where the logits dominate; ftaas-tiny's tokenizer supplies the token ids) and
`small` (a random 150 M Llama with the tiny vocabulary, for GPUs).

For DPO both trainers take the same preference pairs, β, RPO weight (TRL's loss_type
["sigmoid", "sft"]), LoRA and schedule, with the reference being the adapter switched off;
the reference forward passes are in both timings (ftaas makes them once, before the first
step; TRL at every step). Printed: pairs and tokens (both answers) per second, and the
final DPO loss of each adapter over every pair, scored alike.

`--method rft` runs bench/rft_throughput.py (ftaas's GRPO recipe against TRL's
`GRPOTrainer` + peft), passing it the options it knows (`--steps`, `--group-size`, …).

    .venv/bin/python bench/train_throughput.py [--method supervised|dpo|rft]
        [--model tiny|smollm2|llama-128k|small] [--examples 256] [--batch-sizes 8,16]
        [--rounds 2] [--peers trl,baseline,ftaas-plain] [--live-memory]

On SmolLM2 here (2 cores, about 130 tokens/s): `--model smollm2 --examples 64
--batch-sizes 8 --rounds 1` takes about ten minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peak_memory import LiveTensorPeak, peak_rss_mb  # noqa: E402 (after the path)

LEARNING_RATE = 1e-3
VOCABULARY = (
    "the a model learns tokens from data and answers questions about code words "
    "secret plans numbers lists cities rivers music history science recipes travel"
)
WORDS = VOCABULARY.split(" ")


# Chat logs' turn lengths are close to lognormal with a spread (sigma) around 1: most
# prompts short, answers longer, a long tail of both (ShareGPT/UltraChat-like).
LENGTH_SIGMA = 1.0


def chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def text(median_words: float) -> str:
        length = max(1, min(200, int(rng.lognormvariate(math.log(median_words), LENGTH_SIGMA))))
        return " ".join(rng.choice(WORDS) for _ in range(length))

    return [
        {
            "messages": [
                {"role": "user", "content": text(12)},
                {"role": "assistant", "content": text(30)},
            ]
        }
        for _ in range(n)
    ]


def preference_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """OpenAI's preference format, with the lengths of `chat_rows`."""
    chosen, rejected = chat_rows(n, seed), chat_rows(n, seed + 1)
    return [
        {
            "input": {"messages": [a["messages"][0]]},
            "preferred_output": [a["messages"][1]],
            "non_preferred_output": [b["messages"][1]],
        }
        for a, b in zip(chosen, rejected, strict=True)
    ]


RANDOM_LLAMAS: dict[str, dict[str, Any]] = {
    # About 150 M parameters with ftaas-tiny's 1,024-token vocabulary.
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 64,
    },
    # Llama 3's vocabulary (128,256) on a small body: 107 M parameters, 66 M of them the
    # (tied) embeddings, so the logits dominate as they do in 1-3 B models with this
    # vocabulary (Llama 3.2, Qwen 2.5).
    "llama-128k": {
        "vocab_size": 128_256,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
}


def build_model(work: Path, size: str) -> tuple[Path, int]:
    """The base model's folder and its max_length: ftaas-tiny, SmolLM2 from its package, or
    a random Llama (`RANDOM_LLAMAS`) with ftaas-tiny's tokenizer."""
    import shutil

    from training.tiny_model import TINY_MODEL_MAX_LENGTH, build_tiny_model

    if size == "smollm2":
        from training.smollm2 import SMOLLM2_ID, SMOLLM2_MAX_LENGTH, build_smollm2

        return build_smollm2(work / SMOLLM2_ID), SMOLLM2_MAX_LENGTH
    tiny = build_tiny_model(work / "ftaas-tiny")
    if size == "tiny":
        return tiny, TINY_MODEL_MAX_LENGTH
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    folder = work / f"llama-{size}"
    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors", "ftaas_*"))
    config = AutoConfig.from_pretrained(tiny)
    for key, value in RANDOM_LLAMAS[size].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder, TINY_MODEL_MAX_LENGTH


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


LOADED_MEMORY_MB: list[float] = []  # the peak when the model and data are loaded
LIVE_TENSORS: list[LiveTensorPeak] = []  # in a `--live-memory` child: watching from the start


def model_loaded() -> None:
    """Called by each run as its timed training starts: what is peak memory by then (the
    libraries, the base model, the data), so that the table can show what the training
    itself adds (activations, gradients, optimizer, logits, the allocator's share)."""
    LOADED_MEMORY_MB.append(peak_memory_mb())
    for tracker in LIVE_TENSORS:
        tracker.start()


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


# Dense bf16 peak of common training GPUs (tensor cores, no sparsity), by device name.
# FTAAS_PEAK_TFLOPS overrides it (another GPU, or another precision).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def peak_flops() -> tuple[float, str] | None:
    """The GPU's peak FLOP/s and where the figure comes from; None on CPU or unknown."""
    import os

    import torch

    if os.environ.get("FTAAS_PEAK_TFLOPS"):
        return float(os.environ["FTAAS_PEAK_TFLOPS"]) * 1e12, "FTAAS_PEAK_TFLOPS"
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}, dense bf16"
    return None


def model_flops(model: Any, lengths: list[int], epochs: int) -> float:
    """The FLOPs the training needs (model FLOPs: no recomputation, no padding).

    Per token: 2 × the frozen matmul weights forward and 2 × again backward, to the
    activations only (frozen weights get no gradient), and 6 × the LoRA weights (they do).
    Per example of s tokens and per layer: causal attention's scores and mixing, 2·s²·width
    forward and twice that backward."""
    config = model.config
    embeddings = model.get_input_embeddings().weight
    frozen = sum(
        p.numel()
        for p in model.parameters()
        if p.ndim == 2 and not p.requires_grad and p is not embeddings
    )
    if getattr(config, "tie_word_embeddings", False):
        frozen += embeddings.numel()  # the output projection is the same matrix
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    tokens = sum(lengths)
    attention = 6 * config.num_hidden_layers * width * sum(s * s for s in lengths)
    return epochs * ((4 * frozen + 6 * lora) * tokens + attention)


def run_ftaas(spec_path: Path) -> dict[str, Any]:
    from training.recipes import recipe_for
    from training.spec import TrainingSpec
    from training.storage import open_store

    spec = TrainingSpec.model_validate_json(spec_path.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="ftaas-bench-"))
    run = recipe_for(spec.method)(spec, open_store(spec.storage_url), scratch, device=device())
    lengths = [len(s.input_ids) for unit in run.train_units for s in run.sequences(unit)]
    tokens = sum(lengths) * run.hp.n_epochs
    model_loaded()
    started = time.perf_counter()
    run.begin()  # done once in the constructor too: DPO's reference pass, timed here
    run.run()
    seconds = time.perf_counter() - started
    run.close()
    scored = (
        final_loss(run.unwrapped, run.train_units)
        if spec.method == "supervised"
        else final_dpo_loss(run.unwrapped, run.train_units, run.hp.beta)
    )
    return {
        "units": len(run.train_units) * run.hp.n_epochs,
        "tokens": tokens,
        "seconds": seconds,
        "steps": run.position.step,
        "final_loss": scored,
        "model_flops": model_flops(run.unwrapped, lengths, run.hp.n_epochs),
    }


class EpochOrder:
    """ftaas's per-epoch permutation, so both trainers see the same batches in the same
    order and their losses can be compared step for step."""

    def __init__(self, n_examples: int, seed: int):
        self.n_examples, self.seed, self.epoch = n_examples, seed, 0

    def __iter__(self) -> Any:
        from training.run import epoch_order

        order = epoch_order(self.n_examples, self.seed, self.epoch)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self.n_examples


def _same_order(trainer: Any) -> Any:
    class SameOrderTrainer(trainer):  # type: ignore[misc,valid-type]
        seed = 0

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return EpochOrder(len(self.train_dataset), self.seed)  # type: ignore[arg-type]

    return SameOrderTrainer


def trainer_arguments(spec: Any, n_units: int, output_dir: str) -> dict[str, Any]:
    """The Trainer arguments that make a peer run ftaas's schedule and optimizer."""
    import torch

    hp = spec.hyperparameters
    steps = math.ceil(n_units / hp.batch_size) * hp.n_epochs
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": hp.batch_size,
        "num_train_epochs": hp.n_epochs,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.lr_scheduler,
        "warmup_steps": int(steps * hp.warmup_ratio),
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "seed": spec.seed,
        "logging_steps": 10_000,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
    }


def run_baseline(spec_path: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from training.lora import build_lora_model
    from training.recipes.supervised import load_tokenized
    from training.spec import TrainingSpec
    from training.storage import open_store

    SameOrderTrainer = _same_order(Trainer)
    spec = TrainingSpec.model_validate_json(spec_path.read_text())
    hp = spec.hyperparameters

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    data = open_store(spec.storage_url).local_file(spec.training_file, Path(tempfile.mkdtemp()))
    examples, _ = load_tokenized(data, spec.data_format, tokenizer, spec.max_length)
    torch.manual_seed(spec.seed)
    model = build_lora_model(
        spec.base_model_path, hp, device(), packed_attention=False, fused_adapter_output=False
    )
    pad = tokenizer.pad_token_id or 0

    padded_lengths: list[int] = []

    def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        padded_lengths.append(width * len(batch))
        return {
            "input_ids": torch.tensor(
                [e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch]
            ),
            "labels": torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch]),
        }

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            **trainer_arguments(spec, len(examples), out),
            remove_unused_columns=False,
        )
        trainer = SameOrderTrainer(
            model=model, args=args, train_dataset=examples, data_collator=collate
        )
        trainer.seed = spec.seed
        model_loaded()
        started = time.perf_counter()
        state = trainer.train()
        seconds = time.perf_counter() - started
    real = sum(len(e.input_ids) for e in examples)
    return {
        "units": len(examples) * hp.n_epochs,
        "tokens": real * hp.n_epochs,
        "seconds": seconds,
        "steps": state.global_step,
        "final_loss": final_loss(model, examples),
        "padding_share": 1 - real / sum(padded_lengths),
        "model_flops": model_flops(model, [len(e.input_ids) for e in examples], hp.n_epochs),
    }


def run_trl(spec_path: Path) -> dict[str, Any]:
    """TRL's DPOTrainer with the same peft model, data, order and hyperparameters."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from training.data.validation import read_examples
    from training.lora import build_lora_model
    from training.recipes.dpo import load_pairs
    from training.spec import TrainingSpec
    from training.storage import open_store

    spec = TrainingSpec.model_validate_json(spec_path.read_text())
    hp = spec.hyperparameters
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    data = open_store(spec.storage_url).local_file(spec.training_file, Path(tempfile.mkdtemp()))
    rows = [e.model_dump(exclude_none=True) for e in read_examples(str(data), "preference")]

    def turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    dataset = Dataset.from_list(  # TRL's conversational preference format
        [
            {
                "prompt": turns(r["input"]["messages"]),
                "chosen": turns(r["preferred_output"]),
                "rejected": turns(r["non_preferred_output"]),
            }
            for r in rows
        ]
    )
    torch.manual_seed(spec.seed)
    model = build_lora_model(
        spec.base_model_path, hp, device(), packed_attention=False, fused_adapter_output=False
    )
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            **trainer_arguments(spec, len(rows), out),
            beta=hp.beta,
            loss_type=["sigmoid", "sft"] if hp.rpo_alpha else ["sigmoid"],
            loss_weights=[1.0, hp.rpo_alpha] if hp.rpo_alpha else None,
            max_length=spec.max_length,
        )
        trainer = _same_order(DPOTrainer)(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.seed = spec.seed
        model_loaded()
        started = time.perf_counter()
        state = trainer.train()
        seconds = time.perf_counter() - started
    # Counted and scored with ftaas's tokenization, so both runs are measured alike.
    pairs, _ = load_pairs(data, "preference", tokenizer, spec.max_length)
    tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    lengths = [len(s.input_ids) for p in pairs for s in (p.chosen, p.rejected)]
    return {
        "units": len(pairs) * hp.n_epochs,
        "tokens": tokens * hp.n_epochs,
        "seconds": seconds,
        "steps": state.global_step,
        "final_loss": final_dpo_loss(model, pairs, hp.beta),
        "model_flops": model_flops(model, lengths, hp.n_epochs),
    }


def final_dpo_loss(model: Any, pairs: list[Any], beta: float) -> float:
    """Mean DPO loss (the sigmoid term) of an adapter over every pair, one pair at a time,
    the reference being the adapter switched off."""
    import torch
    import torch.nn.functional as F

    from training.data.batching import collate
    from training.recipes.dpo import sequence_logps

    model.eval()
    total = 0.0
    on = next(model.parameters()).device
    with torch.no_grad():
        for pair in pairs:
            batch = collate([[pair.chosen], [pair.rejected]]).to(on)
            policy, _ = sequence_logps(model, batch)
            with model.disable_adapter():
                reference, _ = sequence_logps(model, batch)
            ratio = policy - reference
            total += -F.logsigmoid(beta * (ratio[0] - ratio[1])).item()
    return total / len(pairs)


def final_loss(model: Any, examples: list[Any]) -> float:
    """Token-averaged loss of the trained adapter over every example, measured one example
    at a time so both runs are scored identically."""
    import torch

    from training.data.batching import collate
    from training.recipes.supervised import forward_counts

    model.eval()
    total, count = 0.0, 0
    on = next(model.parameters()).device
    with torch.no_grad():
        for example in examples:
            _, counts = forward_counts(model, collate([[example]]).to(on))
            total, count = total + counts.loss_sum, count + counts.n_targets
    return total / count


def run_trl_sft(spec_path: Path) -> dict[str, Any]:
    """TRL's SFTTrainer as its docs recommend for speed: packing `bfd` (padding-free), its
    chunked log-probability head, the same peft model and pre-tokenized examples (ftaas's
    tokenization and labels, so both learn the same tokens)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from training.lora import build_lora_model
    from training.recipes.supervised import load_tokenized
    from training.spec import TrainingSpec
    from training.storage import open_store

    spec = TrainingSpec.model_validate_json(spec_path.read_text())
    hp = spec.hyperparameters
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    data = open_store(spec.storage_url).local_file(spec.training_file, Path(tempfile.mkdtemp()))
    examples, _ = load_tokenized(data, spec.data_format, tokenizer, spec.max_length)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    # One bin of about a step's tokens per step: as many optimizer steps as ftaas takes.
    lengths = [len(e.input_ids) for e in examples]
    bin_tokens = max(
        max(lengths), math.ceil(sum(lengths) / math.ceil(len(lengths) / hp.batch_size))
    )
    torch.manual_seed(spec.seed)
    model = build_lora_model(
        spec.base_model_path, hp, device(), packed_attention=False, fused_adapter_output=False
    )
    with tempfile.TemporaryDirectory() as out:
        arguments = trainer_arguments(spec, len(examples), out)
        arguments["per_device_train_batch_size"] = 1
        args = SFTConfig(**arguments, packing=True, packing_strategy="bfd", max_length=bin_tokens)
        trainer = _same_order(SFTTrainer)(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.seed = spec.seed
        model_loaded()
        started = time.perf_counter()
        state = trainer.train()
        seconds = time.perf_counter() - started
    return {
        "units": len(examples) * hp.n_epochs,
        "tokens": sum(lengths) * hp.n_epochs,
        "seconds": seconds,
        "steps": state.global_step,
        "final_loss": final_loss(model, examples),
        "model_flops": model_flops(model, lengths, hp.n_epochs),
    }


def run_ftaas_plain(spec_path: Path) -> dict[str, Any]:
    """ftaas with the plain full-logits loss (the chunked one switched off)."""
    import training.token_logps

    training.token_logps._output_projection = lambda model: None  # type: ignore[assignment]
    return run_ftaas(spec_path)


def run_ftaas_checkpointed(spec_path: Path) -> dict[str, Any]:
    """ftaas with `gradient_checkpointing` on, as TRL's SFTConfig defaults to."""
    from training.spec import TrainingSpec

    spec = TrainingSpec.model_validate_json(spec_path.read_text())
    hp = spec.hyperparameters.model_copy(update={"gradient_checkpointing": True})
    checkpointed = Path(tempfile.mkdtemp()) / "spec.json"
    checkpointed.write_text(spec.model_copy(update={"hyperparameters": hp}).model_dump_json())
    return run_ftaas(checkpointed)


def checkpoint_mlps(model: Any) -> int:
    """Selective activation checkpointing: every decoder layer's MLP (the widest
    activations: gate, up and their product, 1,536 wide in SmolLM2 against its 576) keeps
    only its input and is recomputed in the backward pass; attention keeps its own. How
    many MLPs it wrapped."""
    import functools

    from torch.utils.checkpoint import checkpoint

    def recomputed(forward: Any, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    for mlp in mlps:
        mlp.forward = functools.partial(recomputed, mlp.forward)
    return len(mlps)


def run_ftaas_mlp_checkpointed(spec_path: Path) -> dict[str, Any]:
    """ftaas with selective activation checkpointing (the MLPs only)."""
    import training.run

    build = training.run.build_lora_model

    def selective(*args: Any, **kwargs: Any) -> Any:
        model = build(*args, **kwargs)
        assert checkpoint_mlps(model) > 0
        return model

    training.run.build_lora_model = selective  # type: ignore[assignment]
    return run_ftaas(spec_path)


def float32_base() -> None:
    """Every model this process loads through training.lora in float32, wherever it runs
    (on a CPU with bf16 arithmetic a model stored in bf16 otherwise trains in bf16:
    training.lora.training_dtype)."""
    import torch

    import training.lora

    training.lora.training_dtype = lambda device, stored=None: torch.float32  # type: ignore[assignment]


def run_ftaas_float32(spec_path: Path) -> dict[str, Any]:
    """ftaas with the base model in float32."""
    float32_base()
    return run_ftaas(spec_path)


def run_trl_sft_float32(spec_path: Path) -> dict[str, Any]:
    """TRL's SFTTrainer over the base model in float32 (its bf16 autocast still on, as
    SFTConfig defaults to)."""
    float32_base()
    return run_trl_sft(spec_path)


RUNNERS = {
    "ftaas": run_ftaas,
    "ftaas-mlp-ckpt": run_ftaas_mlp_checkpointed,
    "ftaas-plain": run_ftaas_plain,
    "ftaas-ckpt": run_ftaas_checkpointed,
    "ftaas-fp32": run_ftaas_float32,
    "ftaas-system": run_ftaas,
    "ftaas-ckpt-system": run_ftaas_checkpointed,
    "trl": run_trl_sft,
    "trl-fp32": run_trl_sft_float32,
    "trl-jemalloc": run_trl_sft,
    "baseline": run_baseline,
    "trl-dpo": run_trl,
}
# The rows whose process starts with the trainers' native memory environment
# (training.native_memory: jemalloc, oneDNN's caches bounded), as the service starts them:
# ftaas's own rows, and TRL's `trl-jemalloc`; the `-system` rows with glibc's malloc
# instead of jemalloc; the other peers with neither, as a user's own process would.
TRAINER_ENV_KINDS = {kind for kind in RUNNERS if kind.startswith("ftaas")} | {"trl-jemalloc"}
TRAINER_ALLOCATOR_KINDS = {kind for kind in TRAINER_ENV_KINDS if not kind.endswith("-system")}
DEFAULT_PEERS = {"supervised": "trl,baseline,ftaas-plain", "dpo": "trl-dpo,ftaas-plain"}


def child(kind: str, spec_path: Path, live_memory: bool) -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if live_memory:
        LIVE_TENSORS.append(LiveTensorPeak())
    result = RUNNERS[kind](spec_path)
    result["peak_memory_mb"] = peak_memory_mb()
    result["training_memory_mb"] = result["peak_memory_mb"] - LOADED_MEMORY_MB[0]
    if live_memory:
        result["live_memory_mb"] = LIVE_TENSORS[0].stop()
    print("RESULT " + json.dumps(result))


def run_child(kind: str, spec_path: Path, live_memory: bool = False) -> dict[str, Any]:
    """One run of `kind` in a process of its own; its result."""
    from training.native_memory import native_memory_env

    command = [sys.executable, __file__, "--child", kind, "--spec", str(spec_path)]
    native = (
        native_memory_env("jemalloc" if kind in TRAINER_ALLOCATOR_KINDS else "system")
        if kind in TRAINER_ENV_KINDS
        else {}
    )
    out = subprocess.run(
        [*command, *(["--live-memory"] if live_memory else [])],
        capture_output=True, text=True, check=True, cwd=ROOT, env=os.environ | native,
    ).stdout  # fmt: skip
    return json.loads(out.rsplit("RESULT ", 1)[1])  # type: ignore[no-any-return]


def machine() -> str:
    import platform

    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (
        f"{where}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )


def compare(work: Path, model: tuple[Path, int], data: Path, batch_size: int, args: Any) -> None:
    from training.hyperparameters import ResolvedHyperparameters
    from training.spec import TrainingSpec
    from training.storage import LocalStore

    store = LocalStore(work)
    with open(data, "rb") as stream:
        store.put_file("train.jsonl", stream)
    dpo = args.method == "dpo"
    model_dir, max_length = model
    spec = TrainingSpec(
        job_id="bench",
        method=args.method,
        base_model=args.model,
        base_model_path=str(model_dir),
        max_length=max_length,
        training_file="train.jsonl",
        data_format="preference" if dpo else "chat",
        storage_url=store.url,
        output_key=f"ftaas-run-{batch_size}",
        hyperparameters=ResolvedHyperparameters(
            n_epochs=args.epochs,
            batch_size=batch_size,
            learning_rate_multiplier=1.0,
            learning_rate=args.learning_rate / 10 if dpo else args.learning_rate,
        ),
        seed=0,
    )
    spec.save(store)
    spec_path = work / spec.spec_key

    kinds = [*args.peers.split(","), "ftaas"]
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            result = run_child(kind, spec_path)
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            if kind not in best or result["tokens_per_s"] > best[kind]["tokens_per_s"]:
                best[kind] = result

    # Live tensors, each run once more under the profiler (slower: not timed).
    live = (
        {kind: run_child(kind, spec_path, live_memory=True)["live_memory_mb"] for kind in kinds}
        if args.live_memory
        else {}
    )
    ours = best["ftaas"]
    unit = "pairs" if dpo else "examples"
    print(
        f"\n{args.method}, {args.model} model, batch size {batch_size}: {args.examples} {unit}, "
        f"{args.epochs} epoch(s), {ours['steps']} steps, best of {args.rounds} runs each"
        f"\n  machine: {machine()}"
    )
    peak = peak_flops()
    print(
        f"  {'trainer':<18}{'steps':>6}{unit + '/s':>11}{'tokens/s':>10}{'ftaas x':>8}"
        f"{'peak MB':>9}{'ftaas x':>8}{'train MB':>9}{'ftaas x':>8}"
        + (f"{'live MB':>9}{'ftaas x':>8}" if live else "")
        + f"{'final loss':>12}{'MFU':>7}"
    )
    for kind in kinds:
        r = best[kind]
        mfu = f"{r['model_flops'] / r['seconds'] / peak[0]:.1%}" if peak else "n/a"
        print(
            f"  {kind:<18}{r['steps']:>6}{r['units'] / r['seconds']:>11.2f}"
            f"{r['tokens_per_s']:>10.0f}{ours['tokens_per_s'] / r['tokens_per_s']:>8.2f}"
            f"{r['peak_memory_mb']:>9.0f}{ours['peak_memory_mb'] / r['peak_memory_mb']:>8.2f}"
            f"{r['training_memory_mb']:>9.0f}"
            f"{ours['training_memory_mb'] / max(r['training_memory_mb'], 1):>8.2f}"
            + (f"{live[kind]:>9.0f}{live['ftaas'] / max(live[kind], 1):>8.2f}" if live else "")
            + f"{r['final_loss']:>12.4f}{mfu:>7}"
        )
    print(
        "  ftaas x: ftaas's tokens/s over the row's (higher is better), ftaas's peak memory "
        "over the row's (lower is better)"
    )
    print(
        "  train MB: peak memory above the peak once the libraries, model and data were "
        "loaded, what the training itself adds"
    )
    if live:
        print(
            "  live MB: peak of live tensors above those at the training's start (the "
            "allocator's free blocks left out, as a GPU's allocated memory counts), each run "
            "once more under the profiler"
        )
    print(
        f"  MFU: model FLOPs per second over the peak of {peak[1]} ({peak[0] / 1e12:.0f} TFLOP/s)"
        if peak
        else "  MFU: on a GPU only (or set FTAAS_PEAK_TFLOPS to this machine's peak)"
    )
    for kind in kinds[:-1]:
        if "padding_share" in best[kind]:
            print(f"  {kind} tokens that were padding: {best[kind]['padding_share']:.0%}")
        gap = abs(ours["final_loss"] - best[kind]["final_loss"]) / best[kind]["final_loss"]
        print(f"  final loss difference, ftaas vs {kind}: {gap:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-sizes", default="8,16", help="comma-separated")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", choices=["supervised", "dpo", "rft"], default="supervised")
    parser.add_argument(
        "--model", choices=["tiny", "smollm2", "llama-128k", "small"], default="tiny"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=LEARNING_RATE, help="(DPO uses a tenth of it)"
    )
    parser.add_argument("--peers", help=f"comma-separated, of {', '.join(RUNNERS)}")
    parser.add_argument(
        "--live-memory",
        action="store_true",
        help="on CPU, also run each trainer under the profiler for its peak of live tensors",
    )
    parser.add_argument("--child", choices=list(RUNNERS))
    parser.add_argument("--spec")
    args, rest = parser.parse_known_args()
    if args.method == "rft":
        # Reinforcement has its own measures (prompts and sampled answers per second, the
        # reward): bench/rft_throughput.py, which takes the remaining options.
        script = Path(__file__).with_name("rft_throughput.py")
        os.execv(sys.executable, [sys.executable, str(script), "--rounds", str(args.rounds), *rest])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.child:
        child(args.child, Path(args.spec), args.live_memory)
        return
    args.peers = args.peers or DEFAULT_PEERS[args.method]

    work = Path(tempfile.mkdtemp(prefix="ftaas-bench-"))
    model = build_model(work, args.model)
    data = work / "train.jsonl"
    rows = preference_rows if args.method == "dpo" else chat_rows
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(args.examples, seed=1)))
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        compare(work, model, data, batch_size, args)


if __name__ == "__main__":
    main()
