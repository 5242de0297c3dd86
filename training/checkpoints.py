"""Checkpoints: the adapter a user can serve, plus the state training resumes from.

    checkpoints/step-000088/adapter/{adapter_config.json, adapter_model.safetensors}
    checkpoints/step-000088/trainer_state.pt   optimizer, LR schedule, position, RNG

One is written at the end of every epoch (the last `keep` are kept, as OpenAI keeps the
last three) and one when a pause is requested. Resuming restores the exact data position:
the next run starts at the step after the checkpoint, not at step 0.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.spec import checkpoint_adapter_dir

STATE = "trainer_state.pt"


@dataclass
class TrainingPosition:
    """Where a run is: `step` optimizer steps done; the next batch is `next_batch` of
    epoch `epoch` (0-based)."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0
    best_full_valid_loss: float | None = None
    epochs_without_improvement: int = 0
    valid_cursor: int = 0


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest whole epoch checkpoint under `root` (a `.partial` one never counts)."""
    steps = [
        (int(path.name.removeprefix("step-")), path)
        for path in root.glob("step-*")
        if path.name.removeprefix("step-").isdigit()
    ]
    return max(steps)[1] if steps else None


def save_checkpoint(
    root: Path,
    position: TrainingPosition,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int | None = None,
) -> tuple[Path, list[int]]:
    """Write a checkpoint (rank 0 only); returns its folder and the steps pruned to `keep`."""
    target = checkpoint_dir(root, position.step)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(checkpoint_adapter_dir(partial), safe_serialization=True)
    torch.save(
        {
            "position": asdict(position),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        },
        partial / STATE,
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # a checkpoint is either whole or absent
    removed: list[int] = []
    if keep is not None:
        epoch_checkpoints = sorted(root.glob("step-??????"))
        for old in epoch_checkpoints[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(int(old.name.removeprefix("step-")))
    return target, removed


def load_checkpoint(
    folder: str | Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainingPosition:
    """Restore adapter weights, optimizer and schedule; returns the position to continue."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(checkpoint_adapter_dir(folder) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} does not fit this model: {unexpected[:3]}")
    state = torch.load(folder / STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    return TrainingPosition(**state["position"])
