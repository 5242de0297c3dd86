"""A job's resolved training configuration: one plain, serialisable object.

The service writes it next to the job's outputs; the Ray job's entrypoint reads it. It is
the whole contract between the two: the trainer never sees HTTP requests or the job store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from training.data.schema import DataFormat
from training.hyperparameters import ResolvedHyperparameters


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
    output_dir: str
    hyperparameters: ResolvedHyperparameters
    seed: int
    num_workers: int = 1
    use_gpu: bool = False

    @property
    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / "adapter"

    @property
    def progress_path(self) -> Path:
        return progress_path(self.output_dir)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TrainingSpec:
        return cls.model_validate_json(Path(path).read_text())
