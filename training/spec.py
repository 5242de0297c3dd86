"""A job's resolved training configuration: one plain, serialisable object.

The service writes it next to the job's outputs; the Ray job's entrypoint reads it. It is
the whole contract between the two: the trainer never sees HTTP requests or the job store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from training.data.schema import DataFormat
from training.hyperparameters import ResolvedHyperparameters


def checkpoint_adapter_dir(checkpoint: str | Path) -> Path:
    """The servable adapter inside a checkpoint folder (see training.checkpoints)."""
    return Path(checkpoint) / "adapter"


def progress_path(output_dir: str | Path) -> Path:
    """Where a run's progress log lives (see training.progress)."""
    return Path(output_dir) / "progress.jsonl"


class TrainingSpec(BaseModel):
    job_id: str
    method: Literal["supervised"] = "supervised"
    base_model: str
    base_model_path: str
    max_length: int
    training_file: str
    validation_file: str | None = None
    data_format: DataFormat = "chat"
    # The validation file's own format (a chat training file may be validated on
    # prompt/completion examples); the training file's when unset.
    validation_data_format: DataFormat | None = None
    # The base model's configured chat template, overriding the tokenizer's own, so that
    # training renders examples exactly as serving renders requests.
    chat_template: str | None = None
    output_dir: str
    hyperparameters: ResolvedHyperparameters
    seed: int
    num_workers: int = 1
    use_gpu: bool = False
    # Worker failures (a killed or OOM-killed worker, a lost node) Ray Train recovers from
    # by restarting the workers from the attempt's newest epoch checkpoint.
    max_worker_failures: int = 2
    # Tokens per packed forward pass; a longer example still gets a row of its own.
    micro_batch_tokens: int = 4096
    # A checkpoint folder (training.checkpoints) this run continues from.
    resume_from: str | None = None
    # Weights & Biases run settings from the job's `integrations`, honoured when the
    # package and WANDB_API_KEY are present where the trainer runs.
    wandb: dict[str, Any] | None = None

    @property
    def validation_format(self) -> DataFormat:
        return self.validation_data_format or self.data_format

    @property
    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / "adapter"

    @property
    def progress_path(self) -> Path:
        return progress_path(self.output_dir)

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.output_dir) / "tensorboard"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TrainingSpec:
        return cls.model_validate_json(Path(path).read_text())
