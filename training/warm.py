"""A base model loaded once and kept in a warm trainer's memory (training/warm_trainer.py).

Each job gets a copy of its own, made from a pristine original that no job ever touches: a
job's LoRA layers, gradient checkpointing hooks or anything else it does to its model stay
with its copy, which is dropped when the job ends. The tokenizer is copied likewise (a job
sets its base model's chat template on it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from training.lora import load_base_model
from training.node_cache import fetch_model


class WarmBase:
    def __init__(self, location: str, device: torch.device):
        """`location`: the base model as TrainingSpec.base_model_path names it."""
        from transformers import AutoTokenizer

        self.location, self.device = location, device
        path = fetch_model(location)
        # On the CPU in the device's training dtype: a GPU's copy is made on the CPU and
        # moved, so that the GPU holds one job's model, not the original besides.
        self._model = load_base_model(path, device).eval()
        for parameter in self._model.parameters():
            parameter.requires_grad_(False)
        self._tokenizer = AutoTokenizer.from_pretrained(path)

    def serves(self, location: str) -> bool:
        return location == self.location

    def model(self) -> Any:
        """A copy for one job, in training mode, its parameters trainable as loaded."""
        model = copy.deepcopy(self._model)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model.train()

    def tokenizer(self) -> Any:
        return copy.deepcopy(self._tokenizer)
