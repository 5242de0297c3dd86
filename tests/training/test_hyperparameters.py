import pytest
from pydantic import ValidationError

from training.hyperparameters import (
    MIN_TARGET_BLOCKS,
    SupervisedHyperparameters,
    auto_n_epochs,
    resolve,
)


@pytest.mark.parametrize(
    ("n_examples", "epochs"),
    [(5, 20), (10, 10), (12, 8), (20, 5), (50, 3), (1000, 3), (10_000, 2), (100_000, 1), (1, 25)],
)
def test_auto_epochs_follow_openais_rule(n_examples, epochs):
    assert auto_n_epochs(n_examples) == epochs


@pytest.mark.parametrize(("n_blocks", "epochs"), [(12, 20), (50, 5), (84, 3), (5, 25)])
def test_auto_epochs_of_raw_text_aim_at_more_passes(n_blocks, epochs):
    assert auto_n_epochs(n_blocks, MIN_TARGET_BLOCKS) == epochs


def test_resolve_scales_the_base_models_rate_and_keeps_explicit_values():
    requested = SupervisedHyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5)
    resolved = resolve(requested, n_examples=100, base_learning_rate=2e-4)
    assert (resolved.n_epochs, resolved.batch_size) == (2, 4)
    assert resolved.learning_rate == pytest.approx(1e-4)


def test_auto_resolves_to_numbers():
    resolved = resolve(SupervisedHyperparameters(), n_examples=12, base_learning_rate=1e-3)
    assert (resolved.n_epochs, resolved.batch_size, resolved.learning_rate) == (8, 1, 1e-3)


@pytest.mark.parametrize(
    ("n_examples", "minimum", "batch_size"),
    [(24, 1, 1), (24, 4, 4), (3, 4, 3), (4000, 4, 8), (20_000, 4, 16), (20_000, 32, 16)],
)
def test_auto_batch_size_takes_the_base_models_floor_below_openais_rule(
    n_examples, minimum, batch_size
):
    resolved = resolve(SupervisedHyperparameters(), n_examples, 5e-4, min_batch_size=minimum)
    assert resolved.batch_size == batch_size
    explicit = SupervisedHyperparameters(batch_size=2)
    assert resolve(explicit, n_examples, 5e-4, min_batch_size=minimum).batch_size == 2


@pytest.mark.parametrize("field", ["n_epochs", "batch_size", "learning_rate_multiplier"])
def test_out_of_range_values_are_refused(field):
    with pytest.raises(ValidationError):
        SupervisedHyperparameters(**{field: 0})
