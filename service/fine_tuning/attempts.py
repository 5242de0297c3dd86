"""A job's next training attempt: its number, submission id, folder and TrainingSpec.

Everything here is computed from the job row and configuration alone, so the scheduler
can commit the attempt (its intent) before asking the launcher to run it, and compute
the same attempt again after a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from service.config import BaseModelConfig, Settings
from service.db import JobRow
from service.fine_tuning.attempt_store import attempt_folder
from training.hyperparameters import ResolvedHyperparameters, resolve, start_adapter_shape
from training.methods import METHODS, TrainingMethod
from training.spec import TrainingSpec


@dataclass(frozen=True)
class Attempt:
    number: int
    submission_id: str
    output_key: str  # its folder in the artifact store


class JobCannotStart(Exception):
    """The job can never start as it is (a deleted file, an unknown base model)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def next_attempt(job: JobRow) -> Attempt:
    number = job.attempts + 1
    # Ray keeps every submission id forever: a resumed or re-run job needs a new one, and
    # its own folder so that an earlier attempt's progress log is never read again.
    submission_id = job.id if number == 1 else f"{job.id}-{number}"
    return Attempt(number, submission_id, attempt_folder(job.id, number))


def method_of(job: JobRow) -> TrainingMethod:
    return job.method.get("type") or "supervised"  # type: ignore[no-any-return]


def resolve_hyperparameters(
    job: JobRow,
    base: BaseModelConfig,
    n_examples: int,
    start_adapter_config: dict[str, Any] | None = None,
) -> ResolvedHyperparameters:
    """`start_adapter_config`: the adapter_config.json of the adapter a job trains on top
    of, whose LoRA shape the new adapter keeps."""
    method = METHODS[method_of(job)]
    requested = method.hyperparameters.model_validate(job.method[method.name]["hyperparameters"])
    learning_rate = base.learning_rate_for(preference=method.preference_learning_rate)
    resolved = resolve(
        requested, n_examples, learning_rate, base.min_auto_batch_size, method.min_auto_passes
    )
    if start_adapter_config is not None:
        resolved = resolved.model_copy(update=start_adapter_shape(start_adapter_config))
    return resolved


def training_spec(
    job: JobRow,
    attempt: Attempt,
    base: BaseModelConfig,
    files: dict[str, tuple[str, str | None]],
    hyperparameters: ResolvedHyperparameters,
    settings: Settings,
    storage_url: str,
    use_gpu: bool,
) -> TrainingSpec:
    """`files`: param → (key in the artifact store, data format) of the training and
    validation files."""
    training_path, data_format = files["training_file"]
    validation = files.get("validation_file")
    return TrainingSpec(
        job_id=attempt.submission_id,
        method=method_of(job),
        start_adapter=job.start_adapter,
        base_model=base.id,
        base_model_path=base.path,
        max_length=base.max_length,
        training_file=training_path,
        validation_file=validation[0] if validation else None,
        data_format=data_format or "chat",  # type: ignore[arg-type]
        validation_data_format=validation[1] if validation else None,  # type: ignore[arg-type]
        chat_template=base.chat_template,
        storage_url=storage_url,
        output_key=attempt.output_key,
        hyperparameters=hyperparameters,
        seed=job.seed,
        num_workers=settings.training_num_workers,
        use_gpu=use_gpu,
        worker_resources=settings.training_worker_resources,
        torch_threads=None if use_gpu else settings.trainer_threads,
        resume_from=job.resume_from,
        requested_sizes=_requested_sizes(job),
        min_auto_batch_size=base.min_auto_batch_size,
        wandb=_wandb_settings(job.integrations),
        grader=(job.method.get("reinforcement") or {}).get("grader"),
        response_format=(job.method.get("reinforcement") or {}).get("response_format"),
        judges=(job.method.get("reinforcement") or {}).get("judges"),
        rollouts=rollouts_for(settings, hyperparameters.rollouts, use_gpu),
        python_grader_sandbox=settings.python_grader_sandbox,
        python_grader_timeout_s=settings.python_grader_timeout_s,
    )


def rollouts_for(
    settings: Settings, requested: Literal["auto", "serving", "trainer"], use_gpu: bool
) -> Literal["serving", "trainer"]:
    """Where a reinforcement job samples: its `rollouts` hyperparameter, else the server's
    FTAAS_RFT_ROLLOUTS. `auto` is the serving engine on GPUs and the trainer on CPUs, where
    vLLM's LoRA ops are plain PyTorch fallbacks: measured with bench/rft_rollouts.py on
    SmolLM2 (2 cores), the serving engine sampled a step's answers 3.5× slower than the
    trainer's own `generate`. Without serving, always the trainer."""
    choice = settings.rft_rollouts if requested == "auto" else requested
    if choice == "auto":
        choice = "serving" if use_gpu else "trainer"
    if choice == "trainer" or not settings.serving_enabled:
        return "trainer"
    return "serving"


def _requested_sizes(job: JobRow) -> dict[str, Any] | None:
    """Continued pre-training trains on blocks of text that only the trainer counts: it
    resolves the run's size itself (the file's rows are documents, not blocks)."""
    method = METHODS[method_of(job)]
    if not method.trainer_counts_units:
        return None
    requested = job.method[method.name]["hyperparameters"]
    return {key: requested.get(key, "auto") for key in ("n_epochs", "batch_size")}


def _wandb_settings(integrations: list[Any] | None) -> dict[str, Any] | None:
    for integration in integrations or []:
        if isinstance(integration, dict) and integration.get("type") == "wandb":
            return dict(integration.get("wandb") or {})
    return None
