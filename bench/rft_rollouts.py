"""Where a reinforcement job samples its answers: the serving engine (vLLM, the policy's
LoRA weights hot-loaded each step; training/serve_sampler.py) against the trainer's own
`generate` (training/sampling.py), side by side on one running server.

The same job twice, alternately (`--rounds` pairs), differing only in the `rollouts`
hyperparameter: bench/rft_reward.py's capitals prompts and grader, SmolLM2-135M-Instruct
(`make serve`), seed 7. Per job: its wall time, the mean seconds per step spent sampling
(the metrics' `train_sampling_seconds`), in grading and in the rest (forward, backward,
optimizer, validations, publishing the weights), over steps 2 onwards; the train reward
of the first and last steps, the held-out reward at the end. Then each figure's ratio,
serving over trainer.

    .venv/bin/python bench/rft_rollouts.py [--base-url http://127.0.0.1:8000/v1]
        [--model smollm2-135m-instruct] [--rounds 1] [--setting '{"group_size": 8}']
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.real_model_data import (
    CAPITALS,
    DEFAULT_RFT_SETTING,
    RIGHT_AND_BRIEF,
    capitals_jsonl,
)

FIGURES = (
    "job_s",
    "step_s",
    "sampling_s",
    "grading_s",
    "other_s",
    "reward_first",
    "reward_last",
    "held_out",
)


def one_job(client: OpenAI, model: str, setting: dict[str, Any], files: tuple[str, str]) -> dict:
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=files[0],
        validation_file=files[1],
        seed=7,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": RIGHT_AND_BRIEF, "hyperparameters": setting},  # type: ignore[typeddict-item]
        },
    )
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        raise SystemExit(f"{setting['rollouts']}: {job.status}: {job.error}")
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    steps = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    # Each step's wall time: its metrics event's time less the step before's (whole
    # seconds, so a mean over many steps; the first step also holds the run's start and
    # is left out of the means).
    stamps = sorted(e.created_at for e in events if e.type == "metrics")
    step_s = [b - a for a, b in itertools.pairwise(stamps)]
    steps_after_first = steps[1:]
    sampling = [d["train_sampling_seconds"] for d in steps_after_first]
    grading = [d["train_grading_seconds"] for d in steps_after_first]
    end = next(e.data for e in events if (e.data or {}).get("stage") == "end")
    return {
        "job_s": time.monotonic() - started,
        "sampling_s": statistics.mean(sampling),
        "grading_s": statistics.mean(grading),
        "step_s": statistics.mean(step_s),
        "other_s": statistics.mean(
            s - a - g for s, a, g in zip(step_s, sampling, grading, strict=True)
        ),
        "reward_first": steps[0]["train_reward_mean"],
        "reward_last": steps[-1]["train_reward_mean"],
        "held_out": end["full_valid_reward_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--setting", type=json.loads, default={})
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=2)
    files = tuple(
        client.files.create(file=(name, capitals_jsonl(pairs)), purpose="fine-tune").id
        for name, pairs in (("capitals.jsonl", CAPITALS[:10]), ("held-out.jsonl", CAPITALS[10:]))
    )
    setting = {**DEFAULT_RFT_SETTING, **args.setting}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; model {args.model}; "
        f"setting {json.dumps(setting)}; {args.rounds} round(s), trainer then serving"
    )
    results: dict[str, list[dict]] = {"trainer": [], "serving": []}
    for _ in range(args.rounds):
        for where in results:
            results[where].append(
                one_job(client, args.model, {**setting, "rollouts": where}, files)  # type: ignore[arg-type]
            )
    print(f"{'figure':<14}{'trainer':>10}{'serving':>10}{'serving/trainer':>18}")
    for figure in FIGURES:
        trainer = statistics.median(r[figure] for r in results["trainer"])
        serving = statistics.median(r[figure] for r in results["serving"])
        ratio = f"{serving / trainer:.2f}×" if trainer else "-"
        print(f"{figure:<14}{trainer:>10.2f}{serving:>10.2f}{ratio:>18}")


if __name__ == "__main__":
    main()
