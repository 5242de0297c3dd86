"""The dtype a base model trains in: its own precision where the hardware computes in it."""

from __future__ import annotations

import pytest
import torch

import training.lora
from training.lora import load_base_model, stored_dtype, training_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("has_bf16", [True, False])
def test_a_cpu_trains_a_bf16_model_in_bf16_only_when_it_has_bf16_arithmetic(monkeypatch, has_bf16):
    monkeypatch.setattr(training.lora, "cpu_has_bf16", lambda: has_bf16)
    expected = torch.bfloat16 if has_bf16 else torch.float32
    assert training_dtype(CPU, torch.bfloat16) == expected


def test_a_float32_model_keeps_its_precision_on_any_cpu(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(training.lora, "cpu_has_bf16", lambda: True)
    assert stored_dtype(str(tiny_model_dir)) == torch.float32
    model = load_base_model(str(tiny_model_dir), CPU)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
