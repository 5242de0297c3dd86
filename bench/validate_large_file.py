"""Training-file validation at scale: time and memory for a large JSONL file.

Writes a chat-format file of the given size, then checks it twice in this process: with
a baseline that only parses each line as JSON, and with ftaas's validator (JSON, schema,
per-line problems). Prints both times, their ratio, and the process's peak RSS before
and after, which shows the validator streams: memory does not grow with the file.

    .venv/bin/python bench/validate_large_file.py [--megabytes 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peak_memory import peak_rss_mb
from training.data.validation import validate_jsonl

ROW = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the secret code word? " * 4},
        {"role": "assistant", "content": "The secret code word is pineapple. " * 4},
    ]
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=1024)
    args = parser.parse_args()
    line = (json.dumps(ROW) + "\n").encode()
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as out:
            written = 0
            while written < args.megabytes * 2**20:
                out.write(line * 1000)
                written += len(line) * 1000
        rss_before = peak_rss_mb()

        started = time.perf_counter()
        with open(path, "rb") as stream:
            parsed = sum(1 for raw in stream if json.loads(raw))
        baseline_s = time.perf_counter() - started

        started = time.perf_counter()
        with open(path, "rb") as stream:
            report = validate_jsonl(stream)
        validate_s = time.perf_counter() - started
        assert report.ok and report.n_examples == parsed

        print(f"{written / 2**20:.0f} MB, {parsed} examples")
        print(f"json.loads per line (baseline): {baseline_s:.1f} s")
        print(f"ftaas validate_jsonl:           {validate_s:.1f} s")
        print(f"ratio validate/baseline: {validate_s / baseline_s:.2f}x")
        print(f"peak RSS: {rss_before:.0f} MB before, {peak_rss_mb():.0f} MB after")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
