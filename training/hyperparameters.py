"""The hyperparameter model: what a job may ask for, and how "auto" becomes numbers.

Defined once here; the API's request schema, the job object and the trainer all use it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]
# OpenAI's published rule (cookbook "Chat_finetuning_data_prep"): 3 epochs, adjusted so
# that examples × epochs stays within [100, 25000], and never outside [1, 25].
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25
# Continued pre-training's units are blocks of raw text, every token of which is learned:
# a real model takes about 2.5 times the passes to continue a text it was given as to
# recall a fact it was taught in answers (measured on smollm2-135m-instruct, 12 short
# documents, README "What auto means": 8 epochs, OpenAI's 100, continued 1 of 3; 20
# epochs continued 3 of 3 and kept 6 of 7 general answers).
MIN_TARGET_BLOCKS = 250
# DPO's units are preference pairs. On smollm2-135m-instruct, 10 pairs preferring a
# rephrased fact over the wording it was tuned on (tests/e2e/test_real_model.py): OpenAI's
# 100 (10 epochs) moved the held-out log-probability margin from -8.8 only to 0.1, 2 of 4
# greedy answers taking the preferred wording; 200 (20 epochs) moved it to 8.7, 4 of 4.
MIN_TARGET_PAIRS = 200
# LoRA prefers small effective batches (TRL "LoRA without regret": keep it under 32).
MAX_AUTO_BATCH_SIZE = 16


# Names peft may target (module names, not regular expressions). Which of them the engine
# serves depends on the base model: the API checks that (serving/servable.py).
TARGET_MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*$"
DEFAULT_LORA_R = 16
DEFAULT_WARMUP_RATIO = 0.05
DEFAULT_MAX_GRAD_NORM = 1.0


def default_lora_alpha(lora_r: int) -> int:
    """alpha = 2 × r when unset (the scaling the LoRA guides we learn from use)."""
    return 2 * lora_r


class SupervisedHyperparameters(BaseModel):
    """What the user sends in `method.supervised.hyperparameters`.

    The first three are OpenAI's (each may be "auto"); the rest are ftaas extensions,
    documented in the README, with defaults that follow the LoRA guides we learn from."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = Field(
        default="auto", description="passes over the training file (1-50)"
    )
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = Field(
        default="auto", description="examples per optimizer step (1-256)"
    )
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = Field(
        default="auto", description="multiplies the base model's recommended LoRA learning rate"
    )
    lora_r: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=DEFAULT_LORA_R, description="adapter rank"
    )
    lora_alpha: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        default=None, description="LoRA scaling numerator; default 2 × lora_r"
    )
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: (
        Literal["all-linear"]
        | list[Annotated[str, Field(pattern=TARGET_MODULE_PATTERN, max_length=128)]]
    ) = Field(
        default="all-linear", min_length=1, max_length=64, description="layers that get adapters"
    )
    use_rslora: bool = Field(default=False, description="scale by alpha/sqrt(r) (rsLoRA)")
    use_dora: bool = Field(default=False, description="weight-decomposed LoRA (DoRA)")
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] = DEFAULT_WARMUP_RATIO
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = DEFAULT_MAX_GRAD_NORM
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations: less memory, ~30% more compute"
    )
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="stop after this many epochs without a better full validation loss",
    )


# OpenAI: "auto" is "a value configured by the platform"; TRL's default.
DEFAULT_DPO_BETA = 0.1
# Llama 3's DPO recipe (Dubey et al. 2024, §4.1.4) adds the preferred answers' token loss
# with weight 0.2: without it DPO lowers the likelihood of both answers and, on a model far
# from the data, degenerates (measured on ftaas-tiny: repeated fragments instead of the
# preferred answer). 0 gives plain DPO.
DEFAULT_RPO_ALPHA = 0.2


class DpoHyperparameters(SupervisedHyperparameters):
    """`method.dpo.hyperparameters`: OpenAI's four (with `beta`) and the supervised
    extensions, plus two documented DPO variants (training/recipes/dpo.py)."""

    beta: Auto | Annotated[float, Field(gt=0, le=2)] = Field(
        default="auto", description="how far from the reference the policy may move (0-2]"
    )
    rpo_alpha: Annotated[float, Field(ge=0, le=10)] = Field(
        default=DEFAULT_RPO_ALPHA,
        description="weight of the preferred answers' token loss (RPO); 0 for plain DPO",
    )
    normalize_logratios_by_length: bool = Field(
        default=False, description="compare per-token rather than summed log-ratios"
    )


# Reinforcement fine-tuning (training/recipes/reinforcement.py). With `"auto"`: answers
# per prompt (GRPO's group) are 4 × compute_multiplier; about ten validations per run.
AUTO_GROUP_SIZE = 4
AUTO_VALIDATIONS = 10
DEFAULT_MAX_COMPLETION_TOKENS = 256
# TRL GRPOConfig's defaults: the PPO clip range, and no KL penalty (no reference model).
DEFAULT_CLIP_EPSILON = 0.2
DEFAULT_KL_COEFFICIENT = 0.0


class ReinforcementHyperparameters(SupervisedHyperparameters):
    """`method.reinforcement.hyperparameters`: OpenAI's (each may be "auto";
    `reasoning_effort` is accepted and, on models that do not reason, has no effect), and
    the supervised extensions, plus the sampling and GRPO settings ftaas exposes."""

    eval_interval: Auto | Annotated[int, Field(ge=1)] = Field(
        default="auto", description="training steps between full validations"
    )
    eval_samples: Auto | Annotated[int, Field(ge=1, le=16)] = Field(
        default="auto", description="answers sampled per validation prompt (1: greedy)"
    )
    compute_multiplier: Auto | Annotated[float, Field(gt=0.00001, le=10)] = Field(
        default="auto", description="scales the answers sampled per prompt (exploration)"
    )
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    group_size: Auto | Annotated[int, Field(ge=2, le=64)] = Field(
        default="auto", description="answers sampled per prompt and step (GRPO's group)"
    )
    max_completion_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=DEFAULT_MAX_COMPLETION_TOKENS, description="longest sampled answer"
    )
    temperature: Annotated[float, Field(gt=0, le=2)] = Field(
        default=1.0, description="sampling temperature of the training answers"
    )
    clip_epsilon: Annotated[float, Field(gt=0, le=1)] = Field(
        default=DEFAULT_CLIP_EPSILON, description="PPO clip range of the policy ratio"
    )
    kl_coefficient: Annotated[float, Field(ge=0, le=1)] = Field(
        default=DEFAULT_KL_COEFFICIENT,
        description="weight of the KL penalty to the starting model (0: none, as TRL)",
    )
    loss_type: Literal["dapo", "dr_grpo"] = Field(
        default="dapo",
        description="token normalisation: by the step's answer tokens (dapo, TRL's "
        "default) or by answers × max_completion_tokens (Dr. GRPO)",
    )
    rollouts: Literal["auto", "serving", "trainer"] = Field(
        default="auto",
        description="where answers are sampled: the base model's serving engine with the "
        "policy's LoRA weights hot-loaded each step, or the trainer's own generate "
        "(auto: the server's FTAAS_RFT_ROLLOUTS)",
    )


def auto_group_size(compute_multiplier: float) -> int:
    return max(2, min(64, round(AUTO_GROUP_SIZE * compute_multiplier)))


class ResolvedHyperparameters(BaseModel):
    """Concrete values a run uses; stored with the job and echoed in its object. The
    defaults, the request's own, let a job stored before a field existed still load."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    lora_r: int = DEFAULT_LORA_R
    lora_alpha: int = default_lora_alpha(DEFAULT_LORA_R)
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    weight_decay: float = 0.0
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    gradient_checkpointing: bool = False
    early_stopping_patience: int | None = None
    # DPO only
    beta: float = DEFAULT_DPO_BETA
    rpo_alpha: float = DEFAULT_RPO_ALPHA
    normalize_logratios_by_length: bool = False
    # Reinforcement only
    eval_interval: int = 1
    eval_samples: int = 1
    compute_multiplier: float = 1.0
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    group_size: int = AUTO_GROUP_SIZE
    max_completion_tokens: int = DEFAULT_MAX_COMPLETION_TOKENS
    temperature: float = 1.0
    clip_epsilon: float = DEFAULT_CLIP_EPSILON
    kl_coefficient: float = DEFAULT_KL_COEFFICIENT
    loss_type: Literal["dapo", "dr_grpo"] = "dapo"
    rollouts: Literal["auto", "serving", "trainer"] = "auto"


def auto_n_epochs(n_examples: int, min_target: int = MIN_TARGET_EXAMPLES) -> int:
    """OpenAI's rule; `min_target` is the fewest unit passes a small file is raised to."""
    n_epochs = TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < min_target:
        n_epochs = min(MAX_DEFAULT_EPOCHS, min_target // max(n_examples, 1))
    elif n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        n_epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return n_epochs


def auto_batch_size(n_examples: int, minimum: int = 1) -> int:
    """About 0.2% of the examples (OpenAI's legacy rule), between the base model's
    `minimum` and MAX_AUTO_BATCH_SIZE, and never more than the examples."""
    size = min(MAX_AUTO_BATCH_SIZE, max(minimum, math.ceil(n_examples * 0.002)))
    return max(1, min(size, n_examples))


def resolve_sizes(
    n_epochs: Auto | int,
    batch_size: Auto | int,
    n_examples: int,
    min_batch_size: int = 1,
    min_target: int = MIN_TARGET_EXAMPLES,
) -> dict[str, int]:
    """Epochs and batch size for `n_examples` training units ("auto" or as asked, the
    batch never larger than the data)."""
    return {
        "n_epochs": (
            auto_n_epochs(n_examples, min_target) if n_epochs == "auto" else int(n_epochs)
        ),
        "batch_size": (
            auto_batch_size(n_examples, min_batch_size)
            if batch_size == "auto"
            else max(1, min(int(batch_size), n_examples))
        ),
    }


def resolve(
    requested: SupervisedHyperparameters,
    n_examples: int,
    base_learning_rate: float,
    min_batch_size: int = 1,
    min_target: int = MIN_TARGET_EXAMPLES,
) -> ResolvedHyperparameters:
    sizes = resolve_sizes(
        requested.n_epochs, requested.batch_size, n_examples, min_batch_size, min_target
    )
    n_epochs, batch_size = sizes["n_epochs"], sizes["batch_size"]
    multiplier = (
        1.0
        if requested.learning_rate_multiplier == "auto"
        else float(requested.learning_rate_multiplier)
    )
    extensions = requested.model_dump(
        exclude={"n_epochs", "batch_size", "learning_rate_multiplier", "lora_alpha", "beta"}
    )
    if isinstance(requested, DpoHyperparameters):
        extensions["beta"] = DEFAULT_DPO_BETA if requested.beta == "auto" else requested.beta
    if isinstance(requested, ReinforcementHyperparameters):
        extensions |= _resolve_reinforcement(requested, n_examples, n_epochs, batch_size)
    return ResolvedHyperparameters(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=multiplier,
        learning_rate=base_learning_rate * multiplier,
        lora_alpha=requested.lora_alpha or default_lora_alpha(requested.lora_r),
        **extensions,
    )


def _resolve_reinforcement(
    requested: ReinforcementHyperparameters, n_examples: int, n_epochs: int, batch_size: int
) -> dict[str, Any]:
    multiplier = 1.0 if requested.compute_multiplier == "auto" else requested.compute_multiplier
    total_steps = math.ceil(n_examples / batch_size) * n_epochs
    return {
        "compute_multiplier": multiplier,
        "group_size": (
            auto_group_size(multiplier) if requested.group_size == "auto" else requested.group_size
        ),
        "eval_interval": (
            max(1, math.ceil(total_steps / AUTO_VALIDATIONS))
            if requested.eval_interval == "auto"
            else requested.eval_interval
        ),
        "eval_samples": 1 if requested.eval_samples == "auto" else requested.eval_samples,
    }


def start_adapter_shape(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The LoRA settings a job inherits when it trains on top of a tuned model: its
    adapter's own (`adapter_config.json`), whatever the request said."""
    target = adapter_config.get("target_modules") or "all-linear"
    return {
        "lora_r": int(adapter_config["r"]),
        "lora_alpha": int(
            adapter_config.get("lora_alpha") or default_lora_alpha(int(adapter_config["r"]))
        ),
        "lora_dropout": float(adapter_config.get("lora_dropout") or 0.0),
        "target_modules": sorted(target) if isinstance(target, list | set) else target,
        "use_rslora": bool(adapter_config.get("use_rslora", False)),
        "use_dora": bool(adapter_config.get("use_dora", False)),
    }
