"""How long a small job takes, as its user sees it: warm trainers against the cold path.

Starts `python -m service serve` as a new user would (fresh FTAAS_HOME, empty HOME,
SmolLM2-135M-Instruct and ftaas-tiny), once with the warm trainer pool off
(FTAAS_WARM_TRAINERS=0: every job a Ray job running a Ray Train run, as before the pool)
and once with it on (the default), and runs the same jobs on each: `--jobs` jobs of 20
examples per base model, one after another, through the official `openai` SDK. For each
job, seen from the client (events polled every 0.1 s):

- create → first metrics event;
- first metrics event → last step's (the training's compute, as the client sees it);
- last step's metrics event → `succeeded`;
- create → `succeeded`;
- `succeeded` → the tuned model's first answer token, and its whole answer (8 tokens, a
  streamed chat completion).

Prints the medians per model and mode and the ratio cold / warm (the first job on each
server is shown apart from the median: it may find no warm trainer yet).

    .venv/bin/python bench/job_turnaround.py [--jobs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fresh_server import fresh_server  # noqa: E402
from service.config import Settings  # noqa: E402
from training.smollm2 import SMOLLM2_ID  # noqa: E402

MODELS = (SMOLLM2_ID, "ftaas-tiny")
POLL_S = 0.1


def twenty_examples() -> bytes:
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is the code word for box {i}?"},
                {"role": "assistant", "content": f"The code word for box {i} is harbor {i}."},
            ]
        }
        for i in range(20)
    ]
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


@dataclass
class Turnaround:
    first_metrics_s: float
    first_to_last_step_s: float  # the training's compute, as the client sees it
    last_step_to_succeeded_s: float
    total_s: float
    first_token_s: float
    answer_s: float


def one_job(client: OpenAI, model: str, file_id: str, seed: int) -> Turnaround:
    created = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=file_id,
        seed=seed,
    )
    first_metrics = last_step = None
    while True:
        now = time.monotonic()
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        steps = [e.data for e in events if e.type == "metrics" and e.data]
        if steps and first_metrics is None:
            first_metrics = now
        if any(s.get("step") == s.get("total_steps") for s in steps) and last_step is None:
            last_step = now
        status = client.fine_tuning.jobs.retrieve(job.id)
        if status.status in ("failed", "cancelled"):
            raise RuntimeError(f"job {job.id} {status.status}: {status.error}")
        if status.status == "succeeded":
            succeeded = now
            break
        time.sleep(POLL_S)
    assert first_metrics is not None and status.fine_tuned_model
    stream = client.chat.completions.create(
        model=status.fine_tuned_model,
        messages=[{"role": "user", "content": "What is the code word for box 3?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    first_token = None
    for chunk in stream:
        if first_token is None and chunk.choices and chunk.choices[0].delta.content:
            first_token = time.monotonic()
    answered = time.monotonic()
    return Turnaround(
        first_metrics - created,
        (last_step or succeeded) - first_metrics,
        succeeded - (last_step or succeeded),
        succeeded - created,
        (first_token or answered) - succeeded,
        answered - succeeded,
    )


def measure(warm: bool, n_jobs: int) -> dict[str, list[Turnaround]]:
    env = {"FTAAS_EMBEDDED_MODELS": ",".join(MODELS), "FTAAS_WARM_TRAINERS": "1" if warm else "0"}
    results: dict[str, list[Turnaround]] = {}
    with fresh_server(env, timeout_s=900, models=MODELS) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("FTAAS_BENCH_KEY", "x"))
        upload = client.files.create(file=("twenty.jsonl", twenty_examples()), purpose="fine-tune")
        file_id = client.files.wait_for_processing(upload.id).id
        for model in MODELS:
            results[model] = []
            for seed in range(n_jobs + 1):  # the first apart: it may warm the pool
                turnaround = one_job(client, model, file_id, seed)
                print(
                    f"  {'warm' if warm else 'cold'} {model} job {seed}: {turnaround}", flush=True
                )
                results[model].append(turnaround)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3, help="jobs per model in each median")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    threads = Settings().trainer_threads  # as the server below computes it
    print(
        f"machine: {cores} cores, {threads} torch threads per trainer; 20-example jobs, "
        f"default hyperparameters; median of {args.jobs}"
    )
    cold = measure(False, args.jobs)
    warm = measure(True, args.jobs)
    fields = (
        "first_metrics_s",
        "first_to_last_step_s",
        "last_step_to_succeeded_s",
        "total_s",
        "first_token_s",
        "answer_s",
    )
    print(
        f"\n{'model':<24}{'measure':<28}{'cold':>9}{'warm':>9}{'cold/warm':>11}{'first warm':>12}"
    )
    for model in MODELS:
        for field in fields:
            before = statistics.median(getattr(t, field) for t in cold[model][1:])
            after = statistics.median(getattr(t, field) for t in warm[model][1:])
            first = getattr(warm[model][0], field)
            ratio = before / after if after else float("inf")
            print(f"{model:<24}{field:<28}{before:>9.2f}{after:>9.2f}{ratio:>10.2f}x{first:>12.2f}")


if __name__ == "__main__":
    main()
