"""The training methods ftaas runs, defined once: the files each trains on, how few examples
it accepts, the hyperparameters it takes, the recipe that runs it and the learning rate it
starts from. The API, the scheduler and the trainer read this table; a new method is a row
here and a recipe in training/recipes/ (review M9).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Literal

from training.data.schema import DataFormat
from training.hyperparameters import (
    MIN_TARGET_BLOCKS,
    MIN_TARGET_EXAMPLES,
    MIN_TARGET_PAIRS,
    DpoHyperparameters,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
)

if TYPE_CHECKING:
    from training.run import TrainingRun

# OpenAI's `supervised`, `dpo` and `reinforcement`, and ftaas's `continued_pretraining`
# (raw text).
TrainingMethod = Literal["supervised", "dpo", "reinforcement", "continued_pretraining"]
# OpenAI's minimum training examples for a job.
MIN_EXAMPLES = 10


@dataclasses.dataclass(frozen=True)
class Method:
    name: TrainingMethod
    # What the file validator must have found in a training or validation file.
    formats: frozenset[DataFormat]
    formats_described: str  # as a user would say it, in an error message
    min_examples: int
    hyperparameters: type[SupervisedHyperparameters]
    # "module:Class", imported when a run starts: the API process never imports torch.
    recipe: str
    # The fewest unit passes "auto" epochs raise a small file to (OpenAI's rule, with
    # measured floors for the units a real model learns more slowly from).
    min_auto_passes: int = MIN_TARGET_EXAMPLES
    # Whether only the trainer can count its units (blocks cut from documents), so that it
    # resolves "auto" epochs and batch size itself rather than from the file's rows.
    trainer_counts_units: bool = False
    # Whether its "auto" learning rate is the base model's `dpo_learning_rate`.
    preference_learning_rate: bool = False

    def recipe_class(self) -> type[TrainingRun]:  # type: ignore[type-arg]
        module, name = self.recipe.split(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


METHODS: dict[TrainingMethod, Method] = {
    method.name: method
    for method in (
        Method(
            name="supervised",
            formats=frozenset({"chat", "prompt_completion"}),
            formats_described="chat (`messages`) or prompt/completion",
            min_examples=MIN_EXAMPLES,
            hyperparameters=SupervisedHyperparameters,
            recipe="training.recipes.supervised:SupervisedRun",
        ),
        Method(
            name="dpo",
            formats=frozenset({"preference"}),
            formats_described="preference (`input`, `preferred_output`, `non_preferred_output`)",
            min_examples=MIN_EXAMPLES,
            hyperparameters=DpoHyperparameters,
            recipe="training.recipes.dpo:DpoRun",
            min_auto_passes=MIN_TARGET_PAIRS,
            preference_learning_rate=True,
        ),
        Method(
            name="reinforcement",
            formats=frozenset({"reinforcement"}),
            formats_described="reinforcement (`messages` ending with the user's turn, plus "
            "the keys the grader reads)",
            min_examples=MIN_EXAMPLES,
            hyperparameters=ReinforcementHyperparameters,
            recipe="training.recipes.reinforcement:ReinforcementRun",
        ),
        Method(
            name="continued_pretraining",
            formats=frozenset({"text"}),
            formats_described="text (`text`)",
            # A text corpus may be one long document, cut in blocks.
            min_examples=1,
            hyperparameters=SupervisedHyperparameters,
            recipe="training.recipes.continued_pretraining:ContinuedPretrainingRun",
            min_auto_passes=MIN_TARGET_BLOCKS,
            trainer_counts_units=True,
        ),
    )
}
