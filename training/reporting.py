"""Where rank 0's metrics go: the progress log (→ job events and the result CSV), TensorBoard
event files in the run's folder, and Weights & Biases when the job asked for it and the
package and key are present."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from training.progress import Metrics, Notice, ProgressLog
from training.spec import TrainingSpec

logger = logging.getLogger(__name__)


class MetricsReporter:
    def __init__(self, spec: TrainingSpec):
        self.progress = ProgressLog(spec.progress_path)
        self._tensorboard: Any = None
        self._wandb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(spec.tensorboard_dir))
        except ImportError:  # tensorboard is a dependency; a trimmed install may lack it
            logger.warning("tensorboard is not installed: no TensorBoard event files")
        if spec.wandb is not None:
            self._wandb = _start_wandb(spec)

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
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(spec: TrainingSpec) -> Any:
    settings = spec.wandb or {}
    if importlib.util.find_spec("wandb") is None or not os.environ.get("WANDB_API_KEY"):
        ProgressLog(spec.progress_path).write(
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
