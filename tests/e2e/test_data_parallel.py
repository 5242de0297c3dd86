"""Data-parallel training through Ray Train: two CPU workers reach the same loss as one.

Runs the trainer's Ray job entrypoint against the server's own Ray cluster, as the
scheduler would, with the same spec and 1 or 2 workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import memorisation_jsonl
from tests.e2e.conftest import ROOT, RunningServer
from training.hyperparameters import ResolvedHyperparameters
from training.progress import ProgressLog
from training.spec import TrainingSpec
from training.storage import LocalStore

pytestmark = pytest.mark.e2e


def train_with_workers(server: RunningServer, tmp_path: Path, num_workers: int) -> list[dict]:
    store = LocalStore(tmp_path)
    store.put_bytes("train.jsonl", memorisation_jsonl())
    spec = TrainingSpec(
        job_id=f"dp-{num_workers}",
        base_model="ftaas-tiny",
        base_model_path=str(server.home / "models" / "ftaas-tiny"),
        max_length=512,
        training_file="train.jsonl",
        storage_url=store.url,
        output_key=f"workers-{num_workers}",
        hyperparameters=ResolvedHyperparameters(
            n_epochs=3, batch_size=4, learning_rate_multiplier=1.0, learning_rate=1e-3
        ),
        seed=3,
        num_workers=num_workers,
    )
    spec.save(store)
    env = server.ray_driver_env()
    command = [sys.executable, "-m", "training.entrypoint", store.url, spec.spec_key]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    records = [r.model_dump() for r in ProgressLog(store, spec.output_key).read_from(0).records]
    assert done.returncode == 0, (records[-1:], done.stderr[-3000:])
    assert records[-1]["type"] == "succeeded"
    return [r for r in records if r["type"] == "metrics"]


def test_two_workers_reach_the_loss_of_one(server: RunningServer, tmp_path: Path):
    one = train_with_workers(server, tmp_path, 1)
    two = train_with_workers(server, tmp_path, 2)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 10))
    # Every step's loss is normalised over the whole step's tokens, whichever worker
    # holds them: the curves agree up to float summation order.
    assert [r["train_loss"] for r in two] == pytest.approx([r["train_loss"] for r in one], rel=1e-3)
    assert two[-1]["train_loss"] < two[0]["train_loss"] / 2
