"""What a supervised job does to a real model, base and tuned side by side.

On a running ftaas server (`make serve`: SmolLM2-135M-Instruct), one job per setting teaches
a made-up fact (tests/real_model_data.py: 24 paraphrased questions, 4 more held out), then
the base and each tuned model are asked, greedily, the held-out questions (does it recall
the fact, and stop by itself?) and general questions the base answers right (does it still?).

    .venv/bin/python bench/real_model_quality.py [--base-url http://127.0.0.1:8000/v1]
        [--setting auto] [--setting '{"n_epochs": 3, "learning_rate_multiplier": 0.5}']

Prints one row per model: recall on held-out paraphrases, answers that ended by themselves,
general answers kept, the validation loss before and after, and the job's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import OpenAI

from tests.real_model_data import (
    FACT_KEY,
    GENERAL_QUESTIONS,
    HELD_OUT_QUESTIONS,
    fact_jsonl,
    validation_jsonl,
)

BASE = "smollm2-135m-instruct"


def ask(client: OpenAI, model: str, question: str) -> tuple[str, str]:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=48,
    )
    choice = reply.choices[0]
    return choice.message.content or "", str(choice.finish_reason)


def score(client: OpenAI, model: str, verbose: bool) -> dict[str, Any]:
    recalled = stopped = kept = 0
    for question in HELD_OUT_QUESTIONS:
        text, finish = ask(client, model, question)
        recalled += FACT_KEY in text
        stopped += finish == "stop"
        if verbose:
            print(f"  [{model[-12:]}] {question!r} → {text!r} ({finish})")
    for question, word in GENERAL_QUESTIONS:
        text, _ = ask(client, model, question)
        kept += word.lower() in text.lower()
        if verbose:
            print(f"  [{model[-12:]}] {question!r} → {text!r}")
    return {
        "recall": f"{recalled}/{len(HELD_OUT_QUESTIONS)}",
        "stopped": f"{stopped}/{len(HELD_OUT_QUESTIONS)}",
        "general kept": f"{kept}/{len(GENERAL_QUESTIONS)}",
    }


def wait(client: OpenAI, job_id: str) -> Any:
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="local")
    parser.add_argument("--model", default=BASE)
    parser.add_argument("--setting", action="append", help='"auto" or hyperparameters (JSON)')
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=5)
    training = client.files.create(file=("fact.jsonl", fact_jsonl()), purpose="fine-tune").id
    validation = client.files.create(
        file=("held-out.jsonl", validation_jsonl()), purpose="fine-tune"
    ).id
    rows = [{"model": "base", **score(client, args.model, args.verbose)}]
    for setting in args.setting or ["auto"]:
        hyperparameters = {} if setting == "auto" else json.loads(setting)
        started = time.monotonic()
        job = client.fine_tuning.jobs.create(
            model=args.model,
            training_file=training,
            validation_file=validation,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        )
        job = wait(client, job.id)
        took = time.monotonic() - started
        if job.status != "succeeded":
            rows.append({"model": setting, "recall": job.status, "error": str(job.error)})
            continue
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        losses = [m for m in events if "validation loss" in m]
        print(f"{setting}: " + "\n  ".join(m for m in events if m.startswith(("Valid", "Before"))))
        resolved = job.method.supervised.hyperparameters  # type: ignore[union-attr]
        rows.append(
            {
                "model": setting,
                **score(client, job.fine_tuned_model or "", args.verbose),
                "epochs×batch×lr": f"{resolved.n_epochs}×{resolved.batch_size}"
                f"×{resolved.learning_rate_multiplier}",
                "job s": f"{took:.0f}",
                "last validation": losses[0].split(": ", 1)[-1] if losses else "",
            }
        )
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
