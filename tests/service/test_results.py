"""The result file's columns: OpenAI's first, then whatever else the method reports."""

from __future__ import annotations

import csv
import io

from service.fine_tuning.results import results_csv


def test_openais_columns_come_first_then_the_methods_own():
    rows = [
        {"step": 1, "total_steps": 2, "train_loss": 0.69, "train_reward_accuracy": 0.0},
        {"step": 2, "total_steps": 2, "train_loss": 0.1, "train_reward_accuracy": 1.0,
         "full_valid_loss": 0.2, "full_valid_reward_margin": 3.5},
    ]  # fmt: skip
    table = list(csv.reader(io.StringIO(results_csv(rows).decode())))
    assert table[0] == [
        "step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
        "full_valid_loss", "full_valid_mean_token_accuracy",
        "train_reward_accuracy", "full_valid_reward_margin",
    ]  # fmt: skip
    assert table[1] == ["1", "0.69000", "", "", "", "", "", "0.00000", ""]
    assert table[2][-2:] == ["1.00000", "3.50000"]
