"""A base model loaded once and kept in a warm trainer's memory (training/warm_trainer.py).

Each job gets a copy of its own, made from a pristine original that no job ever touches: a
job's LoRA layers, gradient checkpointing hooks or anything else it does to its model stay
with its copy, which is dropped when the job ends. The tokenizer is copied likewise (a job
sets its base model's chat template on it). The next job's copies are made between jobs
(`prepare`), so that a job starting on an idle trainer does not wait for them.
"""

from __future__ import annotations

import copy
import threading
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
        self._copying = threading.Lock()  # one copy at a time: a job waits for `prepare`
        self._spare_model: Any = None
        self._spare_tokenizer: Any = None

    def serves(self, location: str) -> bool:
        return location == self.location

    def prepare(self) -> None:
        """Makes the next job's copies now (a trainer calls it when idle)."""
        with self._copying:
            if self._spare_model is None:
                self._spare_model = self._copy_model()
            if self._spare_tokenizer is None:
                self._spare_tokenizer = copy.deepcopy(self._tokenizer)

    def model(self) -> Any:
        """A copy for one job, in training mode, its parameters trainable as loaded."""
        with self._copying:
            model, self._spare_model = self._spare_model, None
            return model if model is not None else self._copy_model()

    def tokenizer(self) -> Any:
        with self._copying:
            tokenizer, self._spare_tokenizer = self._spare_tokenizer, None
            return tokenizer if tokenizer is not None else copy.deepcopy(self._tokenizer)

    def _copy_model(self) -> Any:
        model = copy.deepcopy(self._model)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model.train()
