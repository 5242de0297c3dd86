"""All settings in one object, read from `FTAAS_*` variables and validated at start-up."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.engine import host_memory_adapters
from serving.names import app_name
from training.native_memory import Allocator
from training.smollm2 import (
    SMOLLM2_ID,
    SMOLLM2_LEARNING_RATE,
    SMOLLM2_MAX_LENGTH,
    SMOLLM2_MIN_AUTO_BATCH_SIZE,
)
from training.tiny_model import TINY_MODEL_ID, TINY_MODEL_LEARNING_RATE, TINY_MODEL_MAX_LENGTH


class Autoscaling(BaseModel):
    """Ray Serve's autoscaling bounds for one base model's replicas."""

    model_config = {"extra": "forbid"}

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(
        default=32, gt=0, description="requests per replica the autoscaler aims at"
    )


class BaseModelConfig(BaseModel):
    """One base model that can be tuned and served."""

    id: str = Field(description="the name clients use, e.g. `llama-3.2-1b-instruct`")
    path: str = Field(description="local directory or Hugging Face id of the weights")
    max_length: int = Field(default=2048, description="tokens per training example and context")
    learning_rate: float = Field(
        default=2e-4, description="recommended LoRA learning rate (multiplier 1.0)"
    )
    dpo_learning_rate: float | None = Field(
        default=None,
        description="recommended LoRA learning rate for DPO (multiplier 1.0); by default a "
        "tenth of `learning_rate`, since a preference step moves a model further",
    )
    min_auto_batch_size: int = Field(
        default=1,
        ge=1,
        le=256,
        description='smallest batch size "auto" gives (OpenAI\'s rule, 0.2% of the examples, '
        "gives 1 below 500): a few examples in many single-example steps overfit a real "
        "model until it forgets what it knew",
    )
    max_lora_rank: int = Field(default=64, description="largest adapter rank the engine accepts")
    max_loras: int = Field(
        default=8, ge=1, description="adapters in one engine batch (accelerator memory slots)"
    )
    dtype: str = Field(default="auto", description="engine dtype: auto, float32, bfloat16...")
    chat_template: str | None = Field(
        default=None, description="Jinja template overriding the tokenizer's own"
    )
    tool_call_parser: str | None = Field(
        default=None,
        max_length=64,
        description="vLLM's parser of this model's tool calls (`hermes` for Qwen2.5, "
        "`llama3_json`...): with it `tool_choice: auto` (the default with `tools`) can "
        "call tools; without it the model answers in text (`required` and a named "
        "function still call tools, through guided decoding)",
    )
    # Serving at scale (serving/deployment.py): replicas, the tiers an adapter moves through
    # (accelerator slots, host memory, the replica's disk, the artifact store) and how many
    # requests a replica takes before the API answers 429.
    num_replicas: int = Field(default=1, ge=1, description="serving replicas of this base model")
    autoscaling: Autoscaling | None = Field(
        default=None,
        description="replica bounds for Ray Serve's autoscaler (replaces num_replicas)",
    )
    max_cpu_loras: int | None = Field(
        default=None,
        description="adapters an engine keeps in host memory (reloaded from its disk beyond "
        "that); by default 4 × max_loras",
    )
    max_adapters_per_replica: int = Field(
        default=64,
        ge=1,
        description="adapters a replica registers and keeps on its disk; beyond it the least "
        "recently used is unloaded, and requests route to replicas that hold their adapter",
    )
    adapter_cache_bytes: int | None = Field(
        default=None,
        description="disk a replica gives adapters; by default FTAAS_ADAPTER_CACHE_BYTES",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="requests one replica works on at once (vLLM batches them)"
    )
    max_queued_requests: int = Field(
        default=256,
        ge=1,
        description="requests each API process holds waiting for a free replica; beyond it "
        "the API answers 429 with retry-after",
    )

    @model_validator(mode="after")
    def _tiers_nest(self) -> BaseModelConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        if self.max_adapters_per_replica < self.host_memory_adapters:
            raise ValueError("max_adapters_per_replica must be at least max_cpu_loras")
        return self

    @property
    def host_memory_adapters(self) -> int:
        return host_memory_adapters(self.max_loras, self.max_cpu_loras)

    def learning_rate_for(self, preference: bool) -> float:
        """The learning rate at multiplier 1: a preference method's (DPO's), or the one
        the rest learn at (training/methods.py says which a method takes)."""
        if preference:
            return self.dpo_learning_rate or self.learning_rate / 10
        return self.learning_rate


class OrganizationLimits(BaseModel):
    """What one organization may hold and ask for; `FTAAS_LIMITS` (JSON) changes the
    defaults, `FTAAS_ORGANIZATION_LIMITS` ({organization: {...}}) one organization's."""

    model_config = {"extra": "forbid"}

    storage_bytes: int = Field(
        default=100 * 1024**3, ge=0, description="bytes of files and pending uploads held"
    )
    files: int = Field(default=10_000, ge=0, description="files held")
    active_jobs: int = Field(
        default=100, ge=0, description="fine-tuning jobs not yet finished (paused aside)"
    )
    concurrent_requests: int = Field(
        default=64, ge=1, description="chat and completion requests answered at once"
    )
    requests_per_minute: int = Field(
        default=3_000, ge=1, description="API requests of any kind per minute"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FTAAS_", extra="ignore")

    home: Path = Field(default=Path(".ftaas"), description="where all local state lives")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, validation_alias=AliasChoices("FTAAS_PORT", "PORT"))
    api_keys: str | None = Field(
        default=None,
        description="comma-separated `key:organization` pairs registered on start (a "
        "bootstrap: keys are managed with `python -m service keys` and /v1/organization); "
        "with no key at all any request is served, on loopback only",
    )
    admin_keys: str | None = Field(
        default=None,
        description="comma-separated `key:organization` admin keys registered on start: "
        "they manage their organization's keys and secrets under /v1/organization",
    )
    metrics_key: str | None = Field(
        default=None,
        description="bearer token that reads /metrics (every organization's models) on a "
        "server with API keys; without keys /metrics is open, on loopback only",
    )
    allowed_hosts: str = Field(
        default="",
        description="comma-separated Host names the API answers to; unset: any with API keys, "
        "only this machine's loopback names without them (DNS rebinding)",
    )
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite by default")
    storage_url: str | None = Field(
        default=None,
        description="the artifact store: a local folder, or s3://bucket/prefix (boto3, "
        "configured the standard AWS way); `$FTAAS_HOME/blobs` by default",
    )
    base_models_file: Path | None = Field(
        default=None,
        description="JSON list of BaseModelConfig; unset serves the embedded models",
    )
    embedded_models: str = Field(
        default=SMOLLM2_ID,
        description=f"comma-separated embedded base models to serve when no base models file "
        f"is given, listed in this order: {SMOLLM2_ID} (a real instruct model, built once "
        f"from an installed package) and {TINY_MODEL_ID} (random weights, for fast tests)",
    )
    default_model: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON: fields of the first embedded model's BaseModelConfig to change, "
        'e.g. {"num_replicas": 2}',
    )
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("FTAAS_RAY_ADDRESS", "RAY_ADDRESS")
    )
    cluster_id: str | None = Field(
        default=None,
        description="the name of the Ray cluster this process submits training to, recorded "
        "with each attempt: a scheduler on another cluster (a RayService upgrade's new one) "
        "follows that attempt through the store instead of taking it for lost. It must stay "
        "the same when the cluster's head restarts (KubeRay: the RayCluster's name, which "
        "deploy/ sets from the pod's `ray.io/cluster` label); by default `RAY_ADDRESS`, or "
        "`embedded` for the embedded head",
    )
    ray_num_cpus: int = Field(default=8, description="logical CPUs of the embedded Ray head")
    ray_head_resources: dict[str, float] | None = Field(
        default=None, description="JSON: custom Ray resources of the embedded head node"
    )
    max_running_jobs: int = Field(default=1, description="training jobs run at once")
    training_num_workers: int = Field(default=1, description="Ray Train workers per job")
    training_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="CPU threads of each training worker on CPUs; unset: on the embedded head, "
        "this machine's cores shared among the workers of max_running_jobs jobs; on a cluster, "
        "Ray's rule (a worker's CPUs, 1 by default)",
    )
    warm_trainers: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="warm trainers kept per base model (Ray actors with the model loaded, "
        "which start a one-worker job in a second or two); unset: 1 on the embedded head, 0 "
        "on a cluster (where an idle one would hold a worker's CPU or GPU)",
    )
    warm_trainer_idle_s: float = Field(
        default=900.0,
        gt=0,
        description="seconds a warm trainer waits for its next job before it is released",
    )
    trainer_allocator: Allocator = Field(
        default="jemalloc",
        description="C memory allocator of the training processes: `jemalloc` (the copy in "
        "Ray's wheel; on CPUs 13-27% less peak memory than glibc's, training.native_memory) or "
        "`system` (glibc's)",
    )
    training_worker_resources: dict[str, float] | None = Field(
        default=None,
        description="JSON: Ray resources each training worker needs besides its CPU or GPU, "
        'e.g. {"trainer": 1} to train only on nodes started with that custom resource',
    )
    serving_resources: dict[str, float] | None = Field(
        default=None,
        description="JSON: Ray resources each serving replica needs besides its CPU or GPU",
    )
    adapter_cache_bytes: int = Field(
        default=20 * 1024**3,
        description="disk each serving node gives adapters fetched from the store (LRU)",
    )
    use_gpu: bool | None = Field(
        default=None,
        description="train and serve on GPUs; unset: whenever the Ray cluster has any",
    )
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024, description="largest file (direct or assembled upload)"
    )
    max_adapter_bytes: int = Field(
        default=8 * 1024**3, description="largest adapter weights file an import may unpack"
    )
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024,
        description="largest JSON request body (chat, completions, jobs, uploads)",
    )
    max_choices: int = Field(
        default=8, ge=1, description="largest `n` (and `best_of`) a request may ask for"
    )
    unfinished_outputs_days: float = Field(
        default=7.0,
        gt=0,
        description="days a failed or cancelled job's outputs (checkpoints, logs) are kept",
    )
    max_prompts: int = Field(
        default=32, ge=1, description="most prompts one completions request may send"
    )
    max_output_tokens: int | None = Field(
        default=None, description="largest max_tokens a request gets; unset: the model's context"
    )
    allowed_media_domains: str = Field(
        default="", description="comma-separated domains chat may fetch media (image URLs) from"
    )
    grader_models: dict[str, str] = Field(
        default_factory=dict,
        description="JSON: the model this server serves (a base model or a tuned `ft:` "
        "model) that judges for a score_model or label_model grader's `model`, e.g. "
        '{"o3-mini-2025-01-31": "ftaas-smollm2-135m-instruct"}; an OpenAI model name '
        "(gpt-*, o1, o3, o4-mini...) not listed is judged by the first base model",
    )
    rft_rollouts: Literal["auto", "serving", "trainer"] = Field(
        default="auto",
        description="where reinforcement jobs sample their answers: `serving` (the base "
        "model's vLLM engine, the policy's LoRA weights hot-loaded each step), `trainer` "
        "(transformers' generate in the trainer), `auto` (serving on GPUs, the trainer on "
        "CPUs, where vLLM's LoRA ops are slow)",
    )
    python_grader_sandbox: Literal["bubblewrap", "rlimits", "off"] = Field(
        default="bubblewrap",
        description="how python graders are isolated: `bubblewrap` (no network, none of "
        "the server's files, limits; python graders are refused when it cannot run), "
        "`rlimits` (a weaker choice the operator makes: limits, an empty environment and "
        "an unprivileged user, but the host's files and network), `off` (refused)",
    )
    python_grader_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="wall-clock limit of one python grade"
    )
    limits: OrganizationLimits = Field(
        default_factory=OrganizationLimits, description="JSON: every organization's limits"
    )
    organization_limits: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description='JSON: limits of named organizations, e.g. {"acme": {"files": 50000}}',
    )
    api_processes: int = Field(
        default=1,
        ge=1,
        description="API processes answering for the same organizations (uvicorn --workers "
        "times `serve` processes): requests per minute and concurrent requests are counted "
        "in each process's memory, so each admits its share, the limit divided by this",
    )
    serving_enabled: bool = Field(default=True, description="deploy vLLM engines with Ray Serve")
    serving_kv_cache_gb: int = Field(default=1, description="vLLM CPU KV cache per engine")
    scheduler_interval_s: float = Field(
        default=0.5,
        description="seconds between ticks (a new job wakes the scheduler at once; a running "
        "job's records reach its events within this)",
    )
    pause_grace_s: float = Field(
        default=180.0,
        description="how long a pausing trainer may take to save and stop before it is "
        "stopped (the job then continues from its last epoch checkpoint)",
    )
    webhook_retry_delays: str = Field(
        default="5,300,1800,7200,18000,36000,50400,72000,86400",
        description="comma-separated seconds between a webhook's failed attempt and the "
        "next (Standard Webhooks' schedule: 10 attempts over about 3 days by default); "
        "once they run out the delivery has failed",
    )
    webhook_allowed_hosts: str = Field(
        default="",
        description="comma-separated hosts webhooks may be sent to even though they resolve "
        "to loopback, private, link-local or reserved addresses (refused otherwise)",
    )
    webhook_timeout_s: float = Field(
        default=15.0, gt=0, le=300, description="how long a webhook's receiver has to answer"
    )

    @model_validator(mode="after")
    def _absolute_home(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        return self

    @model_validator(mode="after")
    def _known_limits(self) -> Settings:
        for organization in self.organization_limits:  # a misspelt limit fails at start
            self.limits_of(organization)
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'ftaas.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or str(self.home / "blobs")

    @property
    def keys_configured(self) -> bool:
        """Keys come from the environment (more may be in the database)."""
        return bool(self.api_key_organizations or self.admin_key_organizations)

    @cached_property
    def api_key_organizations(self) -> dict[str, str]:
        return _key_pairs(self.api_keys)

    @cached_property
    def admin_key_organizations(self) -> dict[str, str]:
        return _key_pairs(self.admin_keys)

    @property
    def webhook_retry_delays_s(self) -> tuple[float, ...]:
        return _webhook_delays(self.webhook_retry_delays)

    @property
    def webhook_allowed_host_names(self) -> tuple[str, ...]:
        hosts = self.webhook_allowed_hosts.split(",")
        names = (host.strip().lower().strip("[]").rstrip(".") for host in hosts)
        return tuple(sorted({name for name in names if name}))

    @model_validator(mode="after")
    def _webhook_delays_read(self) -> Settings:
        _webhook_delays(self.webhook_retry_delays)  # a misspelt schedule fails at start
        return self

    @property
    def media_domains(self) -> tuple[str, ...]:
        return tuple(
            sorted({d.strip().lower() for d in self.allowed_media_domains.split(",") if d.strip()})
        )

    def limits_of(self, organization: str) -> OrganizationLimits:
        override = self.organization_limits.get(organization)
        if not override:
            return self.limits
        return OrganizationLimits.model_validate({**self.limits.model_dump(), **override})

    @property
    def ray_cluster_id(self) -> str:
        return self.cluster_id or self.ray_address or "embedded"

    @property
    def trainer_threads(self) -> int | None:
        """Torch threads per CPU training worker. Ray starts every worker with
        OMP_NUM_THREADS = its CPUs (1), so on one machine a job trained on one core however
        many it had (SmolLM2 on 2 cores: 121 tokens/s on one thread, 163 on two,
        bench/train_throughput.py). The embedded head's workers share this machine's cores."""
        if self.training_threads is not None:
            return self.training_threads
        if self.ray_address:
            return None  # a cluster's nodes differ: the worker's CPU resources decide
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) // (self.max_running_jobs * self.training_num_workers))

    @property
    def warm_trainers_per_model(self) -> int:
        if self.warm_trainers is not None:
            return self.warm_trainers
        return 0 if self.ray_address else 1

    @property
    def embedded_model_ids(self) -> list[str]:
        return [name.strip() for name in self.embedded_models.split(",") if name.strip()]

    @model_validator(mode="after")
    def _known_embedded_models(self) -> Settings:
        unknown = set(self.embedded_model_ids) - set(EMBEDDED_BASE_MODELS)
        if unknown or not self.embedded_model_ids:
            raise ValueError(
                f"FTAAS_EMBEDDED_MODELS names {sorted(unknown) or 'nothing'}; "
                f"the embedded models are {', '.join(EMBEDDED_BASE_MODELS)}"
            )
        return self

    def load_base_models(self) -> list[BaseModelConfig]:
        if self.base_models_file is None:
            models = [EMBEDDED_BASE_MODELS[i](self.home) for i in self.embedded_model_ids]
            first = {**models[0].model_dump(), **self.default_model}
            return [BaseModelConfig.model_validate(first), *models[1:]]
        raw = json.loads(self.base_models_file.read_text())
        return _distinct([BaseModelConfig.model_validate(item) for item in raw])


def _distinct(models: list[BaseModelConfig]) -> list[BaseModelConfig]:
    """Each base model must have its own id and its own Serve application: `org/m` and
    `org-m` would otherwise share one engine, one model silently answering for the other
    (review L11)."""
    seen: dict[str, str] = {}
    for model in models:
        name = app_name(model.id)
        if name in seen:
            raise ValueError(
                f"the base models {seen[name]!r} and {model.id!r} would share the serving "
                f"application {name!r} (ids differing only in characters other than letters, "
                "digits, '-', '_' and '.'): rename one"
            )
        seen[name] = model.id
    return models


def _webhook_delays(text: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        message = f"FTAAS_WEBHOOK_RETRY_DELAYS must be seconds, comma-separated: {text!r}"
        raise ValueError(message) from None
    if len(delays) > 30 or any(not 0 <= delay <= 7 * 86_400 for delay in delays):
        raise ValueError("FTAAS_WEBHOOK_RETRY_DELAYS: at most 30 delays of 0 to 604800 seconds")
    return delays


def _key_pairs(text: str | None) -> dict[str, str]:
    pairs = {}
    for item in (text or "").split(","):
        if item.strip():
            key, _, organization = item.partition(":")
            pairs[key.strip()] = organization.strip() or "default"
    return pairs


def smollm2_base_model(home: Path) -> BaseModelConfig:
    """SmolLM2-135M-Instruct (training/smollm2.py): bf16 weights, served in bf16."""
    return BaseModelConfig(
        id=SMOLLM2_ID,
        path=str(home / "models" / SMOLLM2_ID),
        max_length=SMOLLM2_MAX_LENGTH,
        # Measured on a made-up fact in 24 paraphrases (bench/real_model_quality.py, README
        # "What auto means"): 4 epochs of batches of 4 at 3e-4 learn it and keep 6 of 7
        # general answers; OpenAI's single-example steps (96 at 2e-4) kept 2 of 5.
        learning_rate=SMOLLM2_LEARNING_RATE,
        min_auto_batch_size=SMOLLM2_MIN_AUTO_BATCH_SIZE,
        max_lora_rank=64,
        max_loras=4,
        dtype="bfloat16",
    )


def tiny_base_model(home: Path) -> BaseModelConfig:
    return BaseModelConfig(
        id=TINY_MODEL_ID,
        path=str(home / "models" / TINY_MODEL_ID),
        max_length=TINY_MODEL_MAX_LENGTH,
        learning_rate=TINY_MODEL_LEARNING_RATE,
        dpo_learning_rate=TINY_MODEL_LEARNING_RATE,
        max_lora_rank=16,
        max_loras=8,
        dtype="float32",
    )


# The embedded base models (built in-process or from installed packages, never downloaded).
EMBEDDED_BASE_MODELS = {SMOLLM2_ID: smollm2_base_model, TINY_MODEL_ID: tiny_base_model}
