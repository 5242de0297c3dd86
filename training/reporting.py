"""Where rank 0's metrics go: the progress log (→ job events and the result CSV), TensorBoard
event files (written locally, copied to the attempt's folder in the store at the end), and
Weights & Biases when the job asked for it and the package and key are present."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from training.progress import Metrics, Notice, ProgressLog
from training.spec import TrainingSpec
from training.storage import ArtifactStore

logger = logging.getLogger(__name__)


class MetricsReporter:
    def __init__(self, spec: TrainingSpec, store: ArtifactStore, scratch: Path):
        self.progress = ProgressLog(store, spec.output_key)
        self.store, self.spec = store, spec
        self._tensorboard_dir = scratch / "tensorboard"
        self._tensorboard: Any = None
        self._wandb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self._tensorboard_dir))
        except ImportError:  # tensorboard is a dependency; a trimmed install may lack it
            logger.warning("tensorboard is not installed: no TensorBoard event files")
        if spec.wandb is not None:
            self._wandb = _start_wandb(spec, self.progress)

    def metrics(self, step: int, total_steps: int, values: dict[str, float], **extra: Any) -> None:
        fields: dict[str, Any] = {**values, **extra}  # metric values ride flat, as OpenAI's
        self.progress.write(Metrics(step=step, total_steps=total_steps, **fields))
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            try:
                self.store.put_folder(self._tensorboard_dir, self.spec.tensorboard_key)
            except Exception:  # the run's outcome does not hang on its charts
                logger.warning("could not store the TensorBoard files", exc_info=True)
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(spec: TrainingSpec, progress: ProgressLog) -> Any:
    settings = spec.wandb or {}
    if importlib.util.find_spec("wandb") is None or not os.environ.get("WANDB_API_KEY"):
        progress.write(
            Notice(
                message="The wandb integration was skipped: the wandb package or "
                "WANDB_API_KEY is missing where training runs",
            )
        )
        return None
    import wandb

    return wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        name=settings.get("name") or spec.job_id,
        tags=settings.get("tags"),
        config=spec.hyperparameters.model_dump(),
    )
