"""Can adapter imports stall the API? Eight concurrent imports of an archive whose weights
inflate to 1 GiB of zeros (a 1 MB upload), and the latency of `GET /v1/models` and
`/health` meanwhile, against the same probes with no import, in one run on one server.

Starts `python -m service serve` as a new user would (fresh FTAAS_HOME, empty HOME,
ftaas-tiny only), uploads the archive eight times, probes both routes every 50 ms for a
quiet period, then fires the eight imports at once (`--rounds` times) while probing.
Prints each import's answer and time, the probes' worst and p99 latencies in both periods
and their ratio.

    .venv/bin/python bench/import_pressure.py [--gibibytes 1] [--imports 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fresh_server import fresh_server  # noqa: E402
from tests.adapters import zero_bomb  # noqa: E402

MIB = 1024 * 1024


class Prober:
    def __init__(self, base: str):
        self.base = base
        self.samples: dict[str, list[float]] = {"/v1/models": [], "/health": []}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(path,)) for path in self.samples]

    def _loop(self, path: str) -> None:
        with httpx.Client(base_url=self.base, timeout=120) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                assert client.get(path).status_code == 200
                self.samples[path].append(time.perf_counter() - started)
                time.sleep(max(0.0, 0.05 - (time.perf_counter() - started)))

    def __enter__(self) -> Prober:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def worst_and_p99(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[-1], ordered[max(0, int(len(ordered) * 0.99) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gibibytes", type=float, default=1)
    parser.add_argument("--imports", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with fresh_server({"FTAAS_EMBEDDED_MODELS": "ftaas-tiny"}) as base:
        archive = zero_bomb(int(args.gibibytes * 1024 * MIB))
        files = [
            httpx.post(
                f"{base}/v1/files",
                files={"file": ("adapter.tar.gz", archive)},
                data={"purpose": "user_data"},
                timeout=60,
            ).json()["id"]
            for _ in range(args.imports)
        ]
        with Prober(base) as quiet:
            time.sleep(10)

        def import_one(file: str) -> tuple[int, float, str]:
            started = time.perf_counter()
            answer = httpx.post(
                f"{base}/v1/models",
                json={"base_model": "ftaas-tiny", "adapter_file": file},
                timeout=600,
            )
            message = answer.json().get("error", {}).get("message", "")
            return answer.status_code, time.perf_counter() - started, message

        answers = []
        with Prober(base) as busy, ThreadPoolExecutor(args.imports) as pool:
            for _ in range(args.rounds):
                answers += list(pool.map(import_one, files))
        print(
            f"archive: {len(archive) / 1e6:.1f} MB, weights inflating to "
            f"{args.gibibytes:g} GiB; {args.imports} imports at once, {args.rounds} rounds"
        )
        by_status: dict[int, list[float]] = {}
        for status, seconds, _ in answers:
            by_status.setdefault(status, []).append(seconds)
        for status, times in sorted(by_status.items()):
            print(f"  {len(times)} answered {status}, slowest in {max(times) * 1000:.0f} ms")
        for message in sorted({m[:140] for _, _, m in answers}):
            print(f"  message: {message}")
        print("probe        period   n     worst    p99      median")
        for path in quiet.samples:
            for period, prober in (("quiet", quiet), ("imports", busy)):
                samples = prober.samples[path]
                worst, p99 = worst_and_p99(samples)
                print(
                    f"{path:11}  {period:7}  {len(samples):4}  {worst * 1000:6.0f}ms "
                    f"{p99 * 1000:6.0f}ms {statistics.median(samples) * 1000:6.0f}ms"
                )
            ratio = max(busy.samples[path]) / max(quiet.samples[path])
            print(f"{path}: worst latency during the imports / quiet = {ratio:.2f}x")


if __name__ == "__main__":
    main()
