"""What a reinforcement job does to a real model: its held-out reward before and after.

On a running ftaas server (`make serve`: SmolLM2-135M-Instruct), one reinforcement job per
setting, through the official SDK, on "What is the capital of X?" prompts. `--grader
right-and-brief` (the default) is a `multi`: half a `string_check` (the answer names the
city), half a `text_similarity` `fuzzy_match` against the city's name (nothing else said);
`--grader fuzzy` is the second alone, which a model can earn by being brief and wrong.
10 countries train, 4 are held out. The job validates on
the held-out prompts (greedy answers) before the first step and at its end.

    .venv/bin/python bench/rft_reward.py [--base-url http://127.0.0.1:8000/v1]
        [--setting '{"n_epochs": 3, "learning_rate_multiplier": 3}']

Prints, per setting, the train reward of each step, the held-out mean reward of the base
and of the tuned model (and their ratio), the answers' mean length, and the job's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.real_model_data import (
    BRIEF,
    CAPITALS,
    DEFAULT_RFT_SETTING,
    RIGHT_AND_BRIEF,
    capitals_jsonl,
)

BASE = "smollm2-135m-instruct"
GRADERS = {"fuzzy": BRIEF, "right-and-brief": RIGHT_AND_BRIEF}


def run(client: OpenAI, setting: dict[str, Any], grader: dict[str, Any]) -> None:
    train = client.files.create(
        file=("capitals.jsonl", capitals_jsonl(CAPITALS[:10])), purpose="fine-tune"
    )
    held_out = client.files.create(
        file=("held-out.jsonl", capitals_jsonl(CAPITALS[10:])), purpose="fine-tune"
    )
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=train.id,
        validation_file=held_out.id,
        seed=7,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": setting},  # type: ignore[typeddict-item]
        },
    )
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    seconds = time.monotonic() - started
    print(
        f"grader {grader['name']!r}, setting {json.dumps(setting)}: {job.status} in {seconds:.0f} s"
    )
    if job.status != "succeeded":
        print(f"  error: {job.error}")
        return
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    print("  train reward per step:", " ".join(f"{d['train_reward_mean']:.2f}" for d in steps))
    print(
        "  answer tokens per step:",
        " ".join(f"{d['train_completion_tokens_mean']:.0f}" for d in steps),
    )
    evaluations = {
        (e.data or {}).get("stage"): e.data for e in events if (e.data or {}).get("stage")
    }
    before = evaluations["start"]["full_valid_reward_mean"]
    after = evaluations["end"]["full_valid_reward_mean"]
    print(
        f"  held-out mean reward: base {before:.3f} → tuned {after:.3f} "
        f"(ratio {after / max(before, 1e-9):.2f}×); answer tokens "
        f"{evaluations['start']['full_valid_completion_tokens_mean']:.1f} → "
        f"{evaluations['end']['full_valid_completion_tokens_mean']:.1f}"
    )
    for country, _ in CAPITALS[10:]:
        for model in (BASE, job.fine_tuned_model):
            reply = client.chat.completions.create(
                model=str(model),
                messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
                temperature=0,
                max_tokens=24,
            )
            who = "base " if model == BASE else "tuned"
            print(f"  [{who}] {country}: {reply.choices[0].message.content!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--setting", action="append", type=json.loads)
    parser.add_argument("--grader", choices=sorted(GRADERS), default="right-and-brief")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=2)
    for setting in args.setting or [DEFAULT_RFT_SETTING]:
        run(client, {**DEFAULT_RFT_SETTING, **setting}, GRADERS[args.grader])


if __name__ == "__main__":
    main()
