"""Does a large upload stall the API? Worst-case latency of /health and of a chat request
while a 300 MB training file is uploaded and validated, against the same probes with no
upload, in one run on one server.

Starts `python -m service serve` as a new user would (fresh FTAAS_HOME, empty HOME),
waits for the engine, then probes /health every 50 ms and a one-token chat every 0.5 s:
first for a quiet period, then during the upload of a JSONL file of many short lines
(the worst case for the per-line validator). Prints worst and p99 latencies of both
periods and their ratio, and the upload's own time.

    .venv/bin/python bench/loop_latency_during_upload.py [--megabytes 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fresh_server import fresh_server  # noqa: E402

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}


def write_file(path: Path, megabytes: int) -> int:
    line = (json.dumps(ROW) + "\n").encode()
    lines = megabytes * 1024 * 1024 // len(line)
    with open(path, "wb") as out:
        block = line * 10_000
        for _ in range(lines // 10_000):
            out.write(block)
    return path.stat().st_size


class Prober:
    def __init__(self, base: str):
        self.base = base
        self.health: list[float] = []
        self.chat: list[float] = []
        self.stop = threading.Event()

    def _loop(self, samples: list[float], every: float, call) -> None:  # type: ignore[no-untyped-def]
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                call(client)
                samples.append(time.perf_counter() - started)
                time.sleep(max(0.0, every - (time.perf_counter() - started)))

    def run(self, seconds: float | None = None) -> None:
        chat_body = {
            "model": "ftaas-tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        }
        threads = [
            threading.Thread(
                target=self._loop, args=(self.health, 0.05, lambda c: c.get("/health"))
            ),
            threading.Thread(
                target=self._loop,
                args=(self.chat, 0.5, lambda c: c.post("/v1/chat/completions", json=chat_body)),
            ),
        ]
        for thread in threads:
            thread.start()
        if seconds is not None:
            time.sleep(seconds)
            self.stop.set()
        self.threads = threads

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[-1], ordered[int(len(ordered) * 0.99) - 1] if len(ordered) > 1 else ordered[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=300)
    args = parser.parse_args()
    with fresh_server({"FTAAS_MAX_UPLOAD_BYTES": str((args.megabytes + 50) * 1024 * 1024)}) as base:
        data = Path(tempfile.mkdtemp(prefix="ftaas-bench-")) / "big.jsonl"
        size = write_file(data, args.megabytes)

        quiet = Prober(base)
        quiet.run(seconds=15)
        quiet.join()

        busy = Prober(base)
        busy.run()
        started = time.perf_counter()
        with open(data, "rb") as stream:
            answer = httpx.post(
                f"{base}/v1/files",
                files={"file": ("big.jsonl", stream, "application/jsonl")},
                data={"purpose": "fine-tune"},
                timeout=600,
            )
        upload_s = time.perf_counter() - started
        busy.join()
        assert answer.status_code == 200, answer.text
        status = answer.json()["status"]

        print(f"upload: {size / 1e6:.0f} MB of short lines, {upload_s:.1f} s, status {status}")
        print("probe     period   n     worst    p99      median")
        for name in ("health", "chat"):
            for period, prober in (("quiet", quiet), ("upload", busy)):
                samples = getattr(prober, name)
                worst, p99 = summary(samples)
                print(
                    f"{name:8}  {period:7}  {len(samples):4}  {worst * 1000:6.0f}ms "
                    f"{p99 * 1000:6.0f}ms {statistics.median(samples) * 1000:6.0f}ms"
                )
            ratio = max(getattr(busy, name)) / max(getattr(quiet, name))
            print(f"{name}: worst latency during the upload / quiet = {ratio:.2f}x")


if __name__ == "__main__":
    main()
