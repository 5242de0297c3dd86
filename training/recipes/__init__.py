"""Training methods as recipes, one file each, on the loop in training/run.py; the method
table (training/methods.py) names each one's recipe."""

from __future__ import annotations

from training.methods import METHODS, TrainingMethod
from training.run import TrainingRun


def recipe_for(method: TrainingMethod) -> type[TrainingRun]:  # type: ignore[type-arg]
    return METHODS[method].recipe_class()
