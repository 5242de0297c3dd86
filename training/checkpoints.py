"""Checkpoints: the adapter a user can serve, plus the state training resumes from.

    <attempt>/checkpoints/step-000088/adapter/{adapter_config.json, adapter_model.safetensors}
    <attempt>/checkpoints/step-000088/trainer_state.pt   optimizer, LR schedule, position, RNG

Written to local scratch, then into the artifact store as a folder (whole once its
manifest exists), so any node can resume from it and any serving replica can serve it.

One is written at the end of every epoch (the last `keep` are kept, as OpenAI keeps the
last three) and one when a pause is requested. Resuming restores the exact data position:
the next run starts at the step after the checkpoint, not at step 0.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.spec import ADAPTER_WEIGHTS
from training.storage import MANIFEST, ArtifactStore, join

STATE = "trainer_state.pt"


@dataclass
class TrainingPosition:
    """Where a run is: `step` optimizer steps done; the next batch is `next_batch` of
    epoch `epoch` (0-based). An epoch's last step is saved only once that epoch has ended
    (its full validation counted, its checkpoint written): as the next epoch's start."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0
    best_full_valid_loss: float | None = None
    epochs_without_improvement: int = 0
    valid_cursor: int = 0
    # The validation figures of the model the run started from (training/evaluation.py).
    start_validation: dict[str, float] = field(default_factory=dict)
    # A reinforcement run's checkpoints by step, and the valid_reward_mean each had.
    checkpoint_rewards: dict[int, float] = field(default_factory=dict)


def checkpoint_key(root: str, step: int) -> str:
    return join(root, f"step-{step:06d}")


def checkpoint_steps(store: ArtifactStore, root: str) -> list[int]:
    """The steps of the whole checkpoints under `root` (a half-written one never counts)."""
    steps = set()
    for item in store.list(root):
        name, _, rest = item.key[len(root) + 1 :].partition("/")
        if rest == MANIFEST and name.removeprefix("step-").isdigit():
            steps.add(int(name.removeprefix("step-")))
    return sorted(steps)


def latest_checkpoint(store: ArtifactStore, root: str) -> str | None:
    """The newest whole checkpoint under `root`."""
    steps = checkpoint_steps(store, root)
    return checkpoint_key(root, steps[-1]) if steps else None


def save_checkpoint(
    store: ArtifactStore,
    root: str,
    position: TrainingPosition,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scratch: Path,
    keep: int | Callable[[list[int]], Collection[int]] | None = None,
    recipe_state: dict[str, Any] | None = None,
) -> tuple[str, list[int]]:
    """Write a checkpoint (rank 0 only); returns its key and the steps pruned to `keep`:
    the newest `keep`, or the steps a policy picks from all of them (oldest first)."""
    local = scratch / "checkpoint"
    shutil.rmtree(local, ignore_errors=True)
    model.save_pretrained(local / "adapter", safe_serialization=True)
    torch.save(
        {
            "position": asdict(position),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "recipe": recipe_state or {},
        },
        local / STATE,
    )
    key = checkpoint_key(root, position.step)
    store.delete(key)  # what an earlier try at this step left half-written
    store.put_folder(local, key)
    shutil.rmtree(local, ignore_errors=True)
    removed: list[int] = []
    if keep is not None:
        steps = checkpoint_steps(store, root)
        kept = set(steps[-keep:]) if isinstance(keep, int) else set(keep(steps))
        for old in steps:
            if old not in kept:
                store.delete(checkpoint_key(root, old))
                removed.append(old)
    return key, removed


def load_checkpoint(
    store: ArtifactStore,
    key: str,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scratch: Path,
) -> tuple[TrainingPosition, dict[str, Any]]:
    """Restore adapter weights, optimizer and schedule; returns the position to continue
    and the recipe's own state (e.g. DPO's reference log-probabilities)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = store.local_folder(key) or store.get_folder(key, scratch / "resume")
    weights = load_file(str(folder / "adapter" / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {key} does not fit this model: {unexpected[:3]}")
    # Tensors, numbers and containers only: a checkpoint from the store runs no code.
    state = torch.load(folder / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return TrainingPosition(**state["position"]), state.get("recipe", {})


def _rng_state() -> dict[str, Any]:
    """Every generator a step draws from: Python's, torch's CPU one and each GPU's
    (dropout on a GPU draws from the CUDA generator)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a tuple, as Python stored it
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        devices = torch.cuda.device_count()
        if len(state["cuda"]) == devices:  # resumed on a node with as many GPUs
            torch.cuda.set_rng_state_all(state["cuda"])
