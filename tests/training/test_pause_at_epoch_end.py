"""A pause that lands on an epoch's last step (review L16), in every recipe: the paused and
resumed job reports what a job that was never paused reports (the epoch's checkpoint with
its full validation, early stopping's count of epochs without improvement, the tuned
model's final figures), and trains the same steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import QUESTIONS, preference_jsonl, story_jsonl
from tests.training.test_sft import make_spec, records, start
from training.checkpoints import STATE
from training.spec import TrainingSpec
from training.storage import LocalStore

# Per recipe: a training file and a validation file the model cannot learn from it, so
# that the full validation loss stops improving and early stopping ends the run early.
RECIPES: dict[str, dict[str, Any]] = {
    "supervised": {"validation_file": "unlearnable.jsonl"},
    "dpo": {
        "method": "dpo",
        "data_format": "preference",
        "training_file": "pref.jsonl",
        "validation_file": "pref_unlearnable.jsonl",
    },
    "continued_pretraining": {
        "method": "continued_pretraining",
        "data_format": "text",
        "training_file": "story.jsonl",
        "validation_file": "text_unlearnable.jsonl",
    },
}


NOES = [f"No {i}" for i in range(len(QUESTIONS))]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def recipe_spec(
    tmp_path: Path, model_dir: Path, recipe: str, name: str, **overrides: Any
) -> TrainingSpec:
    store = LocalStore(tmp_path)
    if not store.exists("unlearnable.jsonl"):
        chats = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(QUESTIONS, NOES, strict=True)
        ]
        texts = [{"text": f"{a}: {q}"} for q, a in zip(QUESTIONS, NOES, strict=True)]
        store.put_bytes("unlearnable.jsonl", jsonl(chats))
        store.put_bytes("text_unlearnable.jsonl", jsonl(texts))
        store.put_bytes("pref.jsonl", preference_jsonl())
        store.put_bytes("pref_unlearnable.jsonl", preference_jsonl("No.", "The code is kiwi."))
        store.put_bytes("story.jsonl", story_jsonl())
    hp = {"n_epochs": 6, "batch_size": 4, "early_stopping_patience": 2}
    if recipe == "dpo":
        hp |= {"beta": 0.1, "rpo_alpha": 0.2}
    hp |= overrides.pop("hyperparameters", {})
    fields = RECIPES[recipe] | overrides
    return make_spec(tmp_path, model_dir, f"{recipe}-{name}", hyperparameters=hp, **fields)


class PauseAt:
    """A pause request that the run sees first once `step` steps are done."""

    def __init__(self, run: Any, step: int):
        self.run, self.step = run, step

    def requested(self) -> bool:
        return bool(self.run.position.step >= self.step)


def train(spec: TrainingSpec, tmp_path: Path, pause_at: int | None = None) -> str:
    run = start(spec, tmp_path)
    if pause_at is not None:
        run.pause = PauseAt(run, pause_at)
    try:
        outcome = run.run()
        if outcome != "paused":
            run.save_adapter()
        return str(outcome)
    finally:
        run.close()


def reported(*specs: TrainingSpec) -> dict[str, list[dict[str, Any]]]:
    """What the job's attempts reported, one after the other (the job's events)."""
    kinds = ("metrics", "checkpoint", "notice", "evaluation")
    seen: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for spec in specs:
        for kind in kinds:
            for record in records(spec, kind):
                record.pop("time")
                record.pop("type")
                record.pop("elapsed_s", None)
                record.pop("steps_this_run", None)
                seen[kind].append(record)
    return seen


def assert_reported_alike(straight: dict[str, list], job: dict[str, list]) -> None:
    # Each epoch's checkpoint, as the job lists it: its step, and its metrics (the last
    # step's training and validation figures and the epoch's full validation).
    assert [(c["step"], sorted(c["metrics"])) for c in job["checkpoint"]] == [
        (c["step"], sorted(c["metrics"])) for c in straight["checkpoint"]
    ]
    for ours, theirs in zip(job["checkpoint"], straight["checkpoint"], strict=True):
        assert ours["epoch"] == theirs["epoch"]
        assert ours["metrics"] == pytest.approx(theirs["metrics"], rel=1e-5)
    assert [m["step"] for m in job["metrics"]] == [m["step"] for m in straight["metrics"]]
    for ours, theirs in zip(job["metrics"], straight["metrics"], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)
    assert job["notice"] == straight["notice"]
    # The start's and the tuned model's figures (the job's final metrics).
    assert [e["stage"] for e in job["evaluation"]] == ["start", "end"]
    for ours, theirs in zip(job["evaluation"], straight["evaluation"], strict=True):
        assert ours["step"] == theirs["step"]
        assert ours["metrics"] == pytest.approx(theirs["metrics"], rel=1e-5)
        assert ours["start_metrics"] == pytest.approx(theirs["start_metrics"], rel=1e-5)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_pause_on_an_epochs_last_step_keeps_its_validation_and_early_stopping(
    tmp_path, tiny_model_dir, recipe
):
    straight = recipe_spec(tmp_path, tiny_model_dir, recipe, "straight")
    assert train(straight, tmp_path) == "early_stopped"
    expected = reported(straight)
    epochs = expected["checkpoint"]
    assert 2 <= epochs[-1]["epoch"] < 6  # stopped early, after a few epochs
    assert all("full_valid_loss" in c["metrics"] for c in epochs)
    # Paused on the last step of the epoch before the one early stopping ends the run on:
    # the stop comes only if the paused epoch's validation loss was counted.
    pause_step = epochs[-2]["step"]

    paused = recipe_spec(tmp_path, tiny_model_dir, recipe, "paused")
    assert train(paused, tmp_path, pause_at=pause_step) == "paused"
    [pause] = records(paused, "paused")
    assert pause["step"] == pause_step
    resumed = recipe_spec(tmp_path, tiny_model_dir, recipe, "resumed", resume_from=pause["path"])
    assert train(resumed, tmp_path) == "early_stopped"
    assert records(resumed, "started")[0]["resumed_from_step"] == pause_step
    assert_reported_alike(expected, reported(paused, resumed))


def test_a_pause_on_the_epoch_that_stops_early_stops_instead(tmp_path, tiny_model_dir):
    straight = recipe_spec(tmp_path, tiny_model_dir, "supervised", "straight")
    assert train(straight, tmp_path) == "early_stopped"
    last = records(straight, "checkpoint")[-1]["step"]
    paused = recipe_spec(tmp_path, tiny_model_dir, "supervised", "paused")
    # Nothing is left to train: the job ends as the one never paused, its model stored.
    assert train(paused, tmp_path, pause_at=last) == "early_stopped"
    assert not records(paused, "paused")
    assert LocalStore(tmp_path).folder_complete(paused.adapter_key)
    assert_reported_alike(reported(straight), reported(paused))


def test_a_pause_on_the_runs_last_step_resumes_to_the_same_final_figures(tmp_path, tiny_model_dir):
    no_stop = {"hyperparameters": {"n_epochs": 2, "early_stopping_patience": None}}
    straight = recipe_spec(tmp_path, tiny_model_dir, "supervised", "straight", **no_stop)
    assert train(straight, tmp_path) == "completed"
    paused = recipe_spec(tmp_path, tiny_model_dir, "supervised", "paused", **no_stop)
    assert train(paused, tmp_path, pause_at=6) == "paused"
    [pause] = records(paused, "paused")
    resumed = recipe_spec(
        tmp_path, tiny_model_dir, "supervised", "resumed", resume_from=pause["path"], **no_stop
    )
    assert train(resumed, tmp_path) == "completed"
    assert not records(resumed, "metrics")  # no step left to train
    assert_reported_alike(reported(straight), reported(paused, resumed))


def test_a_checkpoint_paused_before_its_epoch_ended_still_ends_that_epoch(tmp_path, tiny_model_dir):
    """Trainers before review L16 paused on an epoch's last step before that epoch's end
    (its full validation, early stopping's count, its checkpoint): such a pause checkpoint
    holds the next batch past the epoch's last, and resuming it ends the epoch first."""
    straight = recipe_spec(tmp_path, tiny_model_dir, "supervised", "straight")
    assert train(straight, tmp_path) == "early_stopped"
    expected = reported(straight)
    pause_step = expected["checkpoint"][-2]["step"]
    paused = recipe_spec(tmp_path, tiny_model_dir, "supervised", "paused")
    assert train(paused, tmp_path, pause_at=pause_step) == "paused"
    [pause] = records(paused, "paused")
    # Make it the older trainer's checkpoint: the epoch not ended, its bookkeeping that of
    # the epoch before (as the straight run's checkpoint of that epoch holds it).
    state_file = tmp_path / pause["path"] / STATE
    state = torch.load(state_file, weights_only=True)
    before = torch.load(
        tmp_path / straight.checkpoints_key / f"step-{pause_step - 3:06d}" / STATE,
        weights_only=True,
    )["position"]
    state["position"] |= {
        "epoch": state["position"]["epoch"] - 1,
        "next_batch": 3,  # 12 examples in batches of 4
        "best_full_valid_loss": before["best_full_valid_loss"],
        "epochs_without_improvement": before["epochs_without_improvement"],
    }
    torch.save(state, state_file)
    paused_checkpoints = [c for c in records(paused, "checkpoint") if c["step"] < pause_step]

    resumed = recipe_spec(
        tmp_path, tiny_model_dir, "supervised", "resumed", resume_from=pause["path"]
    )
    assert train(resumed, tmp_path) == "early_stopped"
    job = reported(resumed)
    [ended] = [c for c in job["checkpoint"] if c["step"] == pause_step]
    # The epoch's full validation is measured again (the model is the paused one); the
    # step's training figures were the older trainer's to report, and are lost.
    full = {k: v for k, v in expected["checkpoint"][-2]["metrics"].items() if "full_" in k}
    assert ended["metrics"] == pytest.approx({"step": pause_step, **full}, rel=1e-5)
    assert [c["step"] for c in paused_checkpoints + job["checkpoint"]] == [
        c["step"] for c in expected["checkpoint"]
    ]
    assert job["notice"] == expected["notice"]
