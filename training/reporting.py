"""Where rank 0's metrics go: the progress log (→ job events and the result CSV), TensorBoard
event files (written locally, copied to the attempt's folder in the store at the end), and
Weights & Biases when the job asked for it, the package is there and the job's
organization registered its W&B key."""

from __future__ import annotations

import importlib.util
import json
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
            self._wandb = _start_wandb(spec, store, self.progress)

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


def _start_wandb(spec: TrainingSpec, store: ArtifactStore, progress: ProgressLog) -> Any:
    settings = spec.wandb or {}
    secret = _wandb_secret(spec, store)
    if importlib.util.find_spec("wandb") is None or secret is None:
        progress.write(
            Notice(
                message="The wandb integration was skipped: "
                + (
                    "your organization has not registered a W&B API key "
                    "(PUT /v1/organization/integrations/wandb)"
                    if secret is None
                    else "the wandb package is not installed where training runs"
                ),
            )
        )
        return None
    import wandb

    # This worker process serves this job alone: the key goes no further than it.
    os.environ["WANDB_API_KEY"] = secret["api_key"]
    if secret.get("base_url"):
        os.environ["WANDB_BASE_URL"] = secret["base_url"]
    return wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        name=settings.get("name") or spec.job_id,
        tags=settings.get("tags"),
        config=spec.hyperparameters.model_dump(),
    )


def _wandb_secret(spec: TrainingSpec, store: ArtifactStore) -> dict[str, Any] | None:
    if spec.wandb_secret is None:
        return None
    try:
        secret = json.loads(store.get_bytes(spec.wandb_secret))
    except Exception:  # gone (the attempt ended) or unreadable: no W&B, the run goes on
        logger.warning("could not read the W&B key of %s", spec.job_id)
        return None
    return secret if isinstance(secret, dict) and secret.get("api_key") else None
