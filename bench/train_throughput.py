"""Trainer throughput: ftaas's packed, padding-free LoRA trainer against transformers'
`Trainer` + peft padding each batch to its longest example.

Both runs use the same base model (ftaas-tiny, built in-process), the same tokenized
examples (chat data whose lengths vary like real chat logs), the same LoRA and optimiser
hyperparameters and the same number of optimizer steps. Each run is its own child
process of this script, alternating, so peak memory is each run's own; the best of
`--rounds` is kept for each. Printed: trained (non-padding) tokens per second, their
ratio, peak memory, the final loss of each adapter over the whole dataset, and on a GPU the
model FLOPs utilisation (MFU: the FLOPs the training needs, per second, over the GPU's
peak; see `model_flops`).

    .venv/bin/python bench/train_throughput.py [--examples 256] [--batch-sizes 8,16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
    from training.recipes.supervised import SupervisedRun
    from training.spec import TrainingSpec
    from training.storage import open_store

    spec = TrainingSpec.model_validate_json(spec_path.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="ftaas-bench-"))
    run = SupervisedRun(spec, open_store(spec.storage_url), scratch)
    lengths = [len(e.input_ids) for e in run.train_units]
    tokens = sum(lengths) * run.hp.n_epochs
    started = time.perf_counter()
    run.run()
    seconds = time.perf_counter() - started
    run.close()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "steps": run.position.step,
        "final_loss": final_loss(run.unwrapped, run.train_units),
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


def _same_order_trainer() -> Any:
    from transformers import Trainer

    class SameOrderTrainer(Trainer):
        seed = 0

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return EpochOrder(len(self.train_dataset), self.seed)  # type: ignore[arg-type]

    return SameOrderTrainer


def run_baseline(spec_path: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, TrainingArguments

    from training.lora import build_lora_model
    from training.recipes.supervised import load_tokenized
    from training.spec import TrainingSpec
    from training.storage import open_store

    SameOrderTrainer = _same_order_trainer()
    spec = TrainingSpec.model_validate_json(spec_path.read_text())
    hp = spec.hyperparameters

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    data = open_store(spec.storage_url).local_file(spec.training_file, Path(tempfile.mkdtemp()))
    examples, _ = load_tokenized(data, spec.data_format, tokenizer, spec.max_length)
    torch.manual_seed(spec.seed)
    model = build_lora_model(spec.base_model_path, hp, torch.device("cpu"), packed_attention=False)
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
            output_dir=out,
            per_device_train_batch_size=hp.batch_size,
            num_train_epochs=hp.n_epochs,
            learning_rate=hp.learning_rate,
            lr_scheduler_type=hp.lr_scheduler,
            warmup_steps=int(
                math.ceil(len(examples) / hp.batch_size) * hp.n_epochs * hp.warmup_ratio
            ),
            weight_decay=hp.weight_decay,
            max_grad_norm=hp.max_grad_norm,
            seed=spec.seed,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = SameOrderTrainer(
            model=model, args=args, train_dataset=examples, data_collator=collate
        )
        trainer.seed = spec.seed
        started = time.perf_counter()
        state = trainer.train()
        seconds = time.perf_counter() - started
    real = sum(len(e.input_ids) for e in examples)
    return {
        "tokens": real * hp.n_epochs,
        "seconds": seconds,
        "steps": state.global_step,
        "final_loss": final_loss(model, examples),
        "padding_share": 1 - real / sum(padded_lengths),
        "model_flops": model_flops(model, [len(e.input_ids) for e in examples], hp.n_epochs),
    }


def final_loss(model: Any, examples: list[Any]) -> float:
    """Token-averaged loss of the trained adapter over every example, measured one example
    at a time so both runs are scored identically."""
    import torch

    from training.data.batching import collate
    from training.recipes.supervised import forward_counts

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            _, counts = forward_counts(model, collate([[example]]))
            total, count = total + counts.loss_sum, count + counts.n_targets
    return total / count


def child(kind: str, spec_path: Path) -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run_ftaas(spec_path) if kind == "ftaas" else run_baseline(spec_path)
    result["peak_memory_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result))


def compare(work: Path, model_dir: Path, data: Path, batch_size: int, args: Any) -> None:
    from training.hyperparameters import ResolvedHyperparameters
    from training.spec import TrainingSpec
    from training.storage import LocalStore
    from training.tiny_model import TINY_MODEL_MAX_LENGTH

    store = LocalStore(work)
    with open(data, "rb") as stream:
        store.put_file("train.jsonl", stream)
    spec = TrainingSpec(
        job_id="bench",
        base_model="ftaas-tiny",
        base_model_path=str(model_dir),
        max_length=TINY_MODEL_MAX_LENGTH,
        training_file="train.jsonl",
        storage_url=store.url,
        output_key=f"ftaas-run-{batch_size}",
        hyperparameters=ResolvedHyperparameters(
            n_epochs=args.epochs,
            batch_size=batch_size,
            learning_rate_multiplier=1.0,
            learning_rate=LEARNING_RATE,
        ),
        seed=0,
    )
    spec.save(store)
    spec_path = work / spec.spec_key

    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for kind in ("baseline", "ftaas"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--spec", str(spec_path)],
                capture_output=True, text=True, check=True, cwd=ROOT,
            ).stdout  # fmt: skip
            result = json.loads(out.rsplit("RESULT ", 1)[1])
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            if kind not in best or result["tokens_per_s"] > best[kind]["tokens_per_s"]:
                best[kind] = result

    base, ours = best["baseline"], best["ftaas"]
    print(
        f"\nbatch size {batch_size}: {args.examples} examples, {args.epochs} epoch(s), "
        f"{ours['steps']} steps, best of {args.rounds} runs each"
    )
    peak = peak_flops()
    print(f"  {'trainer':<10}{'tokens/s':>10}{'peak MB':>10}{'final loss':>12}{'MFU':>8}")
    for kind, r in (("baseline", base), ("ftaas", ours)):
        mfu = f"{r['model_flops'] / r['seconds'] / peak[0]:.1%}" if peak else "n/a"
        print(
            f"  {kind:<10}{r['tokens_per_s']:>10.0f}{r['peak_memory_mb']:>10.0f}"
            f"{r['final_loss']:>12.4f}{mfu:>8}"
        )
    print(
        f"  MFU: model FLOPs per second over the peak of {peak[1]} ({peak[0] / 1e12:.0f} TFLOP/s)"
        if peak
        else "  MFU: on a GPU only (or set FTAAS_PEAK_TFLOPS to this machine's peak)"
    )
    gap = abs(ours["final_loss"] - base["final_loss"]) / base["final_loss"]
    print(f"  baseline tokens that were padding: {base['padding_share']:.0%}")
    print(f"  throughput ratio ftaas/baseline: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    print(f"  final loss difference: {gap:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-sizes", default="8,16", help="comma-separated")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["ftaas", "baseline"])
    parser.add_argument("--spec")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.spec))
        return

    from training.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="ftaas-bench-"))
    model_dir = build_tiny_model(work / "ftaas-tiny")
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(args.examples, seed=1)))
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        compare(work, model_dir, data, batch_size, args)


if __name__ == "__main__":
    main()
