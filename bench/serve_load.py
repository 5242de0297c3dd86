"""Serving under load through the HTTP API, as users meet it: `python -m service serve` on
an empty FTAAS_HOME (`--model`: ftaas-tiny, or the real default smollm2-135m-instruct; one
replica unless `--replicas`), driven by the official `openai` SDK.

1. Load: `--requests` (200) chat requests sent at once, half of them streaming, spread over
   8 tuned models (random LoRA adapters, imported through POST /v1/models) and the base
   model; the same burst on the base model alone first, so every figure is also a ratio to
   it from the same run. Printed: errors by kind, latency p50/p90/p99, time to first token
   p50/p99 of the streamed half, output tokens per second of the whole burst.
2. Adapter-live latency: with 32 other adapters registered on the engine, a fine-tuning
   job's `succeeded` (as a client polling every 50 ms sees it) to the first token of its
   tuned model's answer; and for comparison an imported model's first answer (its first
   request pays the load) against a second one.

    .venv/bin/python bench/serve_load.py [--model ftaas-tiny|smollm2-135m-instruct]
        [--requests 200] [--max-tokens 64] [--replicas 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "Tell me about the project."
TUNED_MODELS = 8
OTHER_ADAPTERS = 32


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Server:
    def __init__(self, work: Path, replicas: int, model: str):
        from service.ray_cluster import free_port

        self.home, self.port, self.model = work / "ftaas-home", free_port(), model
        user_home = work / "user-home"
        user_home.mkdir()
        self.env = {
            **os.environ,
            "HOME": str(user_home),
            "FTAAS_HOME": str(self.home),
            "FTAAS_PORT": str(self.port),
            # One organization sends the whole burst: its own limits are not measured here.
            "FTAAS_LIMITS": json.dumps(
                {"concurrent_requests": 10_000, "requests_per_minute": 1_000_000}
            ),
            "FTAAS_EMBEDDED_MODELS": model,
            "FTAAS_DEFAULT_MODEL": json.dumps({"num_replicas": replicas}),
        }
        for name in ("FTAAS_API_KEYS", "FTAAS_ADMIN_KEYS", "RAY_ADDRESS", "FTAAS_RAY_ADDRESS"):
            self.env.pop(name, None)
        self.log = work / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"], cwd=ROOT, env=self.env,
                stdout=out, stderr=out,
            )  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if json.load(response)["serving"].get(self.model) == "ready":
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            time.sleep(1)
        raise RuntimeError("the server did not get ready in 10 minutes")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        subprocess.run([sys.executable, "-m", "service", "stop"], cwd=ROOT, env=self.env)


def import_adapters(client: Any, base: str, model_dir: Path, work: Path, seeds: range) -> list[str]:
    from openai.types import Model

    from tests.adapters import archive, random_adapter

    names = []
    for seed in seeds:
        folder = random_adapter(model_dir, work / f"adapter-{seed}", seed)
        upload = client.files.create(file=("a.tar.gz", archive(folder)), purpose="user_data")
        model = client.post(
            "/models",
            body={"base_model": base, "adapter_file": upload.id, "suffix": f"b{seed}"},
            cast_to=Model,
        )
        names.append(model.id)
    return names


async def one_request(client: Any, model: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    from openai import APIStatusError

    started = time.perf_counter()
    messages = [{"role": "user", "content": QUESTION}]
    try:
        if stream:
            first, tokens = None, 0
            answer = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            async for chunk in answer:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        else:
            reply = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens
            )
            first, tokens = None, reply.usage.completion_tokens
    except APIStatusError as error:
        return {"error": f"{error.status_code} {error.code}"}
    except Exception as error:
        return {"error": type(error).__name__}
    return {"latency": time.perf_counter() - started, "ttft": first, "tokens": tokens}


async def burst(url: str, models: list[str], requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx2 as httpx  # the HTTP client the openai SDK is built on
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=requests * 2), timeout=600)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, http_client=http)
    started = time.perf_counter()
    results = await asyncio.gather(
        *[
            one_request(client, models[i % len(models)], i % 2 == 0, max_tokens)
            for i in range(requests)
        ]
    )
    wall = time.perf_counter() - started
    await http.aclose()
    ok = [r for r in results if "error" not in r]
    return {
        "errors": Counter(r["error"] for r in results if "error" in r),
        "latency": [r["latency"] for r in ok],
        "ttft": [r["ttft"] for r in ok if r["ttft"] is not None],
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "wall": wall,
    }


def adapter_live(client: Any, base: str) -> dict[str, float]:
    """A job's success, as a polling client sees it, to its model's first token."""
    from tests.conftest import memorisation_jsonl

    training_file = client.files.create(
        file=("train.jsonl", memorisation_jsonl()), purpose="fine-tune"
    ).id
    job = client.fine_tuning.jobs.create(
        model=base, training_file=training_file,
        hyperparameters={"n_epochs": 2, "batch_size": 4},
    )  # fmt: skip
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in {
        "succeeded", "failed", "cancelled",
    }:  # fmt: skip
        time.sleep(0.05)
    seen = time.perf_counter()
    assert job.status == "succeeded" and job.fine_tuned_model, job
    return {"trained model": first_token_s(client, job.fine_tuned_model, seen)}


def first_token_s(client: Any, model: str, since: float | None = None) -> float:
    since = since or time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stream.close()
            return time.perf_counter() - since
    return time.perf_counter() - since


def summary_row(name: str, run: dict[str, Any], base: dict[str, Any]) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:5.2f}" if b else "  -  "

    p50, p99 = percentile(run["latency"], 50), percentile(run["latency"], 99)
    t50, t99 = percentile(run["ttft"], 50), percentile(run["ttft"], 99)
    return (
        f"{name:16} {sum(run['errors'].values()):6d} {p50:7.2f}s "
        f"{percentile(run['latency'], 90):7.2f}s {p99:7.2f}s {t50:7.3f}s {t99:7.3f}s "
        f"{run['tokens_per_s']:8.1f} {ratio(run['tokens_per_s'], base['tokens_per_s'])} "
        f"{ratio(p50, percentile(base['latency'], 50))} {ratio(t50, percentile(base['ttft'], 50))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--model", choices=["ftaas-tiny", "smollm2-135m-instruct"], default="ftaas-tiny"
    )
    args = parser.parse_args()
    base_model = args.model
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = Server(work, args.replicas, base_model)
        print(f"starting ftaas ({base_model}, {args.replicas} replica(s)) ...", flush=True)
        server.start()
        try:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
            model_dir = server.home / "models" / base_model
            tuned = import_adapters(client, base_model, model_dir, work, range(TUNED_MODELS))
            for model in [base_model, *tuned]:  # warm: every model answered once
                first_token_s(client, model)
            print(f"{len(tuned)} tuned models imported; {args.requests} requests at once, "
                  f"half streaming, max_tokens {args.max_tokens}", flush=True)  # fmt: skip
            base = asyncio.run(burst(server.url, [base_model], args.requests, args.max_tokens))
            mixed = asyncio.run(
                burst(server.url, [base_model, *tuned], args.requests, args.max_tokens)
            )
            print()
            print(f"{'burst':16} {'errors':>6} {'lat p50':>8} {'lat p90':>8} {'lat p99':>8} "
                  f"{'TTFT p50':>8} {'TTFT p99':>8} {'tok/s':>8} {'tok/s÷base':>5} "
                  f"{'p50÷base':>5} {'TTFT÷base':>5}")  # fmt: skip
            print(summary_row("base model only", base, base))
            print(summary_row("8 tuned + base", mixed, base))
            for name, run in (("base", base), ("mixed", mixed)):
                if run["errors"]:
                    print(f"errors ({name}): {dict(run['errors'])}")

            others = import_adapters(
                client, base_model, model_dir, work, range(100, 100 + OTHER_ADAPTERS)
            )
            for model in others:
                first_token_s(client, model)
            print(f"\nadapter-live latency ({OTHER_ADAPTERS} other adapters registered):")
            live = adapter_live(client, base_model)
            imported = import_adapters(client, base_model, model_dir, work, range(500, 501))[0]
            cold = first_token_s(client, imported)
            warm = first_token_s(client, imported)
            print(f"  job succeeded → first token of its model: {live['trained model']:.3f} s "
                  "(target <= 1 s)")  # fmt: skip
            print(f"  imported model, first request (pays the load): {cold:.3f} s; "
                  f"second: {warm:.3f} s; load cost {cold - warm:.3f} s")  # fmt: skip
            with urllib.request.urlopen(f"{server.url}/metrics") as response:
                text = response.read().decode()
            events = [line for line in text.splitlines() if "adapter_cache_events_total{" in line]
            print("\nadapter cache, from /metrics:")
            print("\n".join(f"  {line}" for line in events))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
