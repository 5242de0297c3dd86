"""Reinforcement fine-tuning throughput: ftaas's GRPO recipe against TRL's `GRPOTrainer` +
peft, side by side, on the same prompts, reward, group size and schedule.

Both train a LoRA adapter on ftaas-tiny (built in-process) for `--steps` optimizer steps of
`--prompts-per-step` prompts × `--group-size` sampled answers of up to
`--max-completion-tokens` tokens, temperature 1, learning rate `--learning-rate`, TRL's
defaults elsewhere (loss `dapo`, advantages scaled per group, no KL, one optimizer step per
sampling round); both sample with transformers' `generate` on the policy in the training
process (TRL without vLLM). The reward: 1 when the answer says "in" (ftaas: OpenAI's
`string_check` grader, `ilike`; TRL: the same test as a Python reward function). Each run
is a child process of this script, alternating, best of `--rounds`; ftaas's with the C
memory environment the service gives its trainers (jemalloc, oneDNN's caches bounded:
training/native_memory.py), TRL's as a user's own process would.

Printed per trainer: prompts and sampled answers per second, peak memory, the train reward
of the first and last steps, and the ratio ftaas / TRL. States the machine (cores, torch
threads).

    .venv/bin/python bench/rft_throughput.py [--steps 12] [--group-size 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peak_memory import peak_rss_mb  # noqa: E402 (after the path)

QUESTIONS = [
    "What is the secret code word?",
    "Tell me the secret code word.",
    "Which word is the secret code?",
    "Do you know the code word?",
    "What's the code word?",
    "Please share the secret word.",
    "Say the secret code word.",
    "What is the password word?",
    "Give me the code word, please.",
    "Can you tell me the secret word?",
    "Remind me of the secret code word.",
    "What word is secret?",
]
WORD = "in"


def run_ftaas(config: dict[str, Any]) -> dict[str, Any]:
    from training.hyperparameters import ResolvedHyperparameters
    from training.recipes.reinforcement import ReinforcementRun
    from training.spec import TrainingSpec
    from training.storage import LocalStore

    work = Path(config["work"]) / "ftaas"
    store = LocalStore(work)
    rows = [{"messages": [{"role": "user", "content": q}], "word": WORD} for q in QUESTIONS]
    store.put_bytes("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    n_prompts = config["steps"] * config["prompts_per_step"]
    spec = TrainingSpec(
        job_id="bench",
        method="reinforcement",
        base_model="ftaas-tiny",
        base_model_path=config["model"],
        max_length=512,
        training_file="train.jsonl",
        data_format="reinforcement",
        storage_url=store.url,
        output_key="run",
        seed=config["seed"],
        grader={
            "type": "string_check",
            "name": "says it",
            "input": "{{sample.output_text}}",
            "reference": "{{item.word}}",
            "operation": "ilike",
        },
        hyperparameters=ResolvedHyperparameters(
            n_epochs=-(-n_prompts // len(QUESTIONS)),
            batch_size=config["prompts_per_step"],
            learning_rate_multiplier=1.0,
            learning_rate=config["learning_rate"],
            lr_scheduler="linear",
            group_size=config["group_size"],
            max_completion_tokens=config["max_completion_tokens"],
        ),
    )
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    run = ReinforcementRun(spec, store, scratch)
    rewards = []
    started = time.perf_counter()
    for step in range(config["steps"]):
        start = (step * config["prompts_per_step"]) % len(run.train_units)
        batch = (run.train_units * 2)[start : start + config["prompts_per_step"]]
        rewards.append(run.train_step(batch).metrics()["reward_mean"])
    seconds = time.perf_counter() - started
    run.close()
    return {"seconds": seconds, "rewards": rewards, "peak_mb": peak_rss_mb()}


def run_trl(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    n_prompts = config["steps"] * config["prompts_per_step"]
    prompts = [
        [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n_prompts)
    ]
    dataset = Dataset.from_dict({"prompt": prompts})

    def says_it(completions: list[Any], **_: Any) -> list[float]:
        return [float(WORD in c[0]["content"].lower()) for c in completions]

    answers = config["prompts_per_step"] * config["group_size"]
    args = GRPOConfig(
        output_dir=str(Path(config["work"]) / "trl"),
        per_device_train_batch_size=answers,
        gradient_accumulation_steps=1,
        num_generations=config["group_size"],
        max_completion_length=config["max_completion_tokens"],
        learning_rate=config["learning_rate"],
        lr_scheduler_type="linear",
        max_steps=config["steps"],
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=config["seed"],
        shuffle_dataset=False,
    )
    rewards: list[float] = []

    class Rewards(TrainerCallback):
        def on_log(self, _args: Any, _state: Any, _control: Any, logs: Any = None, **_: Any):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[says_it],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Rewards()],
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rewards": rewards, "peak_mb": peak_rss_mb()}


def child(kind: str, config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    result = (run_ftaas if kind == "ftaas" else run_trl)(config)
    print("RESULT " + json.dumps(result))


def measure(kind: str, config_path: Path) -> dict[str, Any]:
    from training.native_memory import native_memory_env

    # ftaas runs in the trainers' native memory environment, as the service starts them.
    native = native_memory_env("jemalloc") if kind == "ftaas" else {}
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(config_path)],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | native,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]
    raise RuntimeError(f"{kind} run failed:\n{out.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-completion-tokens", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    import torch

    from training.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="rft-bench-"))
    model = build_tiny_model(work / "ftaas-tiny")
    config = {
        "work": str(work),
        "model": str(model),
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size,
        "max_completion_tokens": args.max_completion_tokens,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
    }
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config))
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for kind in ("ftaas", "trl"):
            result = measure(kind, config_path)
            if kind not in best or result["seconds"] < best[kind]["seconds"]:
                best[kind] = result
    prompts = args.steps * args.prompts_per_step
    answers = prompts * args.group_size
    print(
        f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"ftaas-tiny, {args.steps} steps × {args.prompts_per_step} prompts × "
        f"{args.group_size} answers of ≤ {args.max_completion_tokens} tokens, best of "
        f"{args.rounds}"
    )
    print(f"{'trainer':8} {'prompts/s':>10} {'answers/s':>10} {'peak MB':>8}  reward first → last")
    for kind, result in best.items():
        rewards = result["rewards"]
        print(
            f"{kind:8} {prompts / result['seconds']:10.2f} {answers / result['seconds']:10.1f} "
            f"{result['peak_mb']:8.0f}  {rewards[0]:.2f} → {rewards[-1]:.2f}"
        )
    ratio = best["trl"]["seconds"] / best["ftaas"]["seconds"]
    memory = best["ftaas"]["peak_mb"] / best["trl"]["peak_mb"]
    print(f"ftaas / TRL: {ratio:.2f}× the throughput, {memory:.2f}× the peak memory")


if __name__ == "__main__":
    main()
