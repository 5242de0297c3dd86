"""The method table is the one place a method is named: each row's recipe loads, and the
API's `method` object offers each row's type with its own settings."""

from __future__ import annotations

import typing

from service.fine_tuning.schemas import Method
from training.methods import METHODS
from training.run import TrainingRun


def test_every_method_has_a_recipe_that_runs_on_the_shared_loop():
    for method in METHODS.values():
        assert issubclass(method.recipe_class(), TrainingRun), method.name


def test_the_wire_offers_every_method_with_its_own_hyperparameters():
    offered = set(typing.get_args(Method.model_fields["type"].annotation))
    assert set(METHODS) <= offered
    for name, method in METHODS.items():
        assert name in Method.model_fields  # `method.<name>.hyperparameters`
        # A reinforcement method needs its grader; the others take settings alone.
        settings = {name: {"grader": {}}} if name == "reinforcement" else {}
        offered_hyperparameters = Method(type=name, **settings).hyperparameters()
        assert isinstance(offered_hyperparameters, method.hyperparameters)


def test_auto_epochs_follow_each_methods_floor():
    """OpenAI's 100 unit passes for answers; more for pairs and raw text, which a real
    model learns from more slowly (README "What auto means", DPO, continued pre-training)."""
    from training.hyperparameters import DpoHyperparameters, SupervisedHyperparameters, resolve

    def epochs(method: str, n: int) -> int:
        floor = METHODS[method].min_auto_passes  # type: ignore[index]
        requested = METHODS[method].hyperparameters()  # type: ignore[index]
        return resolve(requested, n, 1e-4, min_target=floor).n_epochs

    assert isinstance(METHODS["dpo"].hyperparameters(), DpoHyperparameters)
    assert isinstance(METHODS["supervised"].hyperparameters(), SupervisedHyperparameters)
    assert [epochs("supervised", 10), epochs("dpo", 10), epochs("continued_pretraining", 10)] == [
        10,
        20,
        25,
    ]
    assert epochs("dpo", 1000) == epochs("supervised", 1000) == 3  # large files: OpenAI's
