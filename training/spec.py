"""A job's resolved training configuration: one plain, serialisable object.

The service writes it into the artifact store beside the attempt's outputs; the Ray job's
entrypoint reads it from there. It is the whole contract between the two: the trainer
never sees HTTP requests or the job store, and every file it names is a key in the store
at `storage_url` (the base model: a local path, a Hugging Face id or an s3:// prefix).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from training.data.schema import DataFormat
from training.hyperparameters import ResolvedHyperparameters
from training.methods import TrainingMethod
from training.storage import ArtifactStore, join

# A PEFT adapter folder, as peft writes it and vLLM reads it.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# As OpenAI: the last three epochs' checkpoints stay usable models (across attempts too).
KEEP_CHECKPOINTS = 3


def checkpoint_adapter_key(checkpoint: str) -> str:
    """The servable adapter inside a checkpoint folder (see training.checkpoints)."""
    return join(checkpoint, "adapter")


class JudgeTarget(BaseModel):
    """A served model that judges for a model grader: a base model's Serve application
    and, for a tuned model, its adapter (its name and its folder in the artifact store)."""

    base_model: str
    adapter_name: str | None = None
    adapter_key: str | None = None


class TrainingSpec(BaseModel):
    job_id: str
    method: TrainingMethod = "supervised"
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
    storage_url: str
    # The attempt's folder in the store: spec, progress, control, checkpoints, adapter.
    output_key: str
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
    # The adapter folder (a tuned model's or a checkpoint's) the new adapter starts from,
    # when a job trains on top of a tuned model; a new adapter when unset.
    start_adapter: str | None = None
    # The run-size hyperparameters as requested ("auto" or a number), for methods whose
    # units only the trainer can count (continued pre-training's blocks): it resolves them
    # from its own unit count, as the service does from a file's rows for other methods.
    requested_sizes: dict[str, int | Literal["auto"]] | None = None
    min_auto_batch_size: int = 1  # the base model's floor for an "auto" batch size
    # Weights & Biases run settings from the job's `integrations`, honoured when the
    # package is present where the trainer runs and the job's organization registered a key.
    wandb: dict[str, Any] | None = None
    # The object in the artifact store holding that key (`{"api_key", "base_url"?}`): not
    # in the spec or the Ray job's environment, which others may read; the driver deletes it
    # when the attempt ends.
    wandb_secret: str | None = None

    # Reinforcement only: the job's grader (OpenAI's JSON, validated by the API) and how
    # python graders run where the trainer runs (the server's FTAAS_PYTHON_GRADER_*).
    grader: dict[str, Any] | None = None
    # Its model graders' judges, resolved for the job's organization when it was created:
    # the grader's `model` → the served model that answers for it (training/serve_judge.py).
    judges: dict[str, JudgeTarget] | None = None
    # Its `response_format` (training/response_format.py), the shape of every sampled answer.
    response_format: dict[str, Any] | None = None
    # Where a reinforcement job's answers are sampled: the trainer's own `generate`
    # (training/sampling.py) or the base model's serving engine with the policy's current
    # LoRA weights hot-loaded (training/serve_sampler.py).
    rollouts: Literal["trainer", "serving"] = "trainer"
    python_grader_sandbox: Literal["bubblewrap", "rlimits", "off"] = "bubblewrap"
    python_grader_timeout_s: float = 120.0

    @property
    def validation_format(self) -> DataFormat:
        return self.validation_data_format or self.data_format

    # Ray resources each training worker asks for besides its CPU or GPU (e.g. a custom
    # resource naming the node group that trains).
    worker_resources: dict[str, float] | None = None
    # Torch threads of each CPU training worker (service/config.py trainer_threads); None
    # keeps Ray's (OMP_NUM_THREADS = the worker's CPUs).
    torch_threads: int | None = None

    @property
    def adapter_key(self) -> str:
        return join(self.output_key, "adapter")

    @property
    def checkpoints_key(self) -> str:
        return join(self.output_key, "checkpoints")

    @property
    def paused_key(self) -> str:
        return join(self.output_key, "paused")

    @property
    def tensorboard_key(self) -> str:
        return join(self.output_key, "tensorboard")

    @property
    def spec_key(self) -> str:
        return spec_key(self.output_key)

    def save(self, store: ArtifactStore) -> None:
        store.put_bytes(self.spec_key, self.model_dump_json(indent=2).encode())

    @classmethod
    def load(cls, store: ArtifactStore, key: str) -> TrainingSpec:
        return cls.model_validate_json(store.get_bytes(key))


def job_folder(job_id: str) -> str:
    """Where every attempt of a job keeps its outputs in the artifact store."""
    return join("jobs", job_id)


def spec_key(output_key: str) -> str:
    return join(output_key, "spec.json")


def wandb_secret_key(output_key: str) -> str:
    """The attempt's copy of its organization's W&B key (TrainingSpec.wandb_secret)."""
    return join(output_key, "secrets", "wandb.json")
