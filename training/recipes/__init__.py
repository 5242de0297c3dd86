"""Training methods as recipes, one file each, on the loop in training/run.py."""

from __future__ import annotations

from training.hyperparameters import TrainingMethod
from training.run import TrainingRun


def recipe_for(method: TrainingMethod) -> type[TrainingRun]:  # type: ignore[type-arg]
    from training.recipes.continued_pretraining import ContinuedPretrainingRun
    from training.recipes.dpo import DpoRun
    from training.recipes.supervised import SupervisedRun

    recipes: dict[str, type[TrainingRun]] = {  # type: ignore[type-arg]
        "supervised": SupervisedRun,
        "dpo": DpoRun,
        "continued_pretraining": ContinuedPretrainingRun,
    }
    return recipes[method]
