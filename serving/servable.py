"""What the vLLM engine serving a base model can load as a LoRA adapter: the one check the
API makes when a job is created (before it trains), when an adapter is imported, and
before it tells serving to load a new model. No torch, no vLLM: the API imports it.

`servable(base, lora_config, shapes)` refuses, with an `Unservable` naming the field, what
vLLM 0.32 would refuse at load time (vllm/lora/peft_helper.py `validate_legal`,
vllm/lora/lora_model.py `from_local_checkpoint`): a rank above the engine's
`max_lora_rank`, DoRA, `modules_to_save`, trained biases, another PEFT type, and weights on
a module vLLM applies no LoRA to, or of the wrong shape for the base.

Which modules vLLM applies LoRA to depends on its implementation of the architecture
(vllm/lora/utils.py `get_supported_lora_modules`: its LinearBase layers, packed ones such
as qkv_proj expanded to the names peft writes). Finding it means building the model in
vLLM (serving/vllm_lora_modules.py, ~20 s), so the answer for the architectures below was
taken from vLLM 0.32 and is kept in VLLM_LORA_MODULES; tests/serving/test_servable.py asks
the installed vLLM again. An architecture not in the table gets FALLBACK_MODULES, the
attention and MLP projections every decoder vLLM implements serves; anything else (a MoE
router, a vision tower) is refused, since that is where vLLM's implementations differ.

ftaas serves no LoRA on embeddings or the output layer even where vLLM lists them
(`embedding_modules`): peft writes those as other weights (lora_embedding_A/B) or on tied
weights, peft's `all-linear` never targets them, and no test here has served them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ATTENTION_AND_MLP = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
# vLLM 0.32, by `python -m serving.vllm_lora_modules llama mistral qwen2 qwen3 gemma2 phi3`.
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": ATTENTION_AND_MLP,
    "MistralForCausalLM": ATTENTION_AND_MLP,
    "Qwen2ForCausalLM": ATTENTION_AND_MLP,
    "Qwen3ForCausalLM": ATTENTION_AND_MLP,
    "Gemma2ForCausalLM": ATTENTION_AND_MLP,
    "Phi3ForCausalLM": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
}
FALLBACK_MODULES = ATTENTION_AND_MLP
# Embeddings and output layers: 2-D weights that are no Linear layer peft's `all-linear`
# adapts (see the module's docstring), by their last name part.
EMBEDDINGS = frozenset(
    {"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings"}
)
SERVABLE_DTYPES = ("F32", "F16", "BF16")
# peft's names for a LoRA weight: <module>.lora_A.weight / <module>.lora_B.weight.
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")

# The peft adapter_config.json fields a refusal names.
RANK, TARGETS, DORA, WEIGHTS = "r", "target_modules", "use_dora", "weights"


class Unservable(ValueError):
    """What the engine could not load, and the adapter config field (or `weights`) that
    says so; the API turns it into a 400 naming its own parameter."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class EngineBase:
    """What the check knows of one base model's engine: its name, the largest rank it
    accepts, its architecture (config.json's `architectures[0]`; None when not known yet)
    and its linear layers (name → (in, out features); None when its weights cannot be read
    yet, e.g. an embedded model still being built)."""

    id: str
    max_lora_rank: int
    architecture: str | None = None
    layers: Mapping[str, tuple[int, int]] | None = field(default=None, compare=False)

    @property
    def served(self) -> frozenset[str]:
        """The last name parts of the modules vLLM applies LoRA to for this base."""
        return VLLM_LORA_MODULES.get(self.architecture or "", FALLBACK_MODULES)

    def refuse(self, subject: str, field: str, hint: str = "") -> Unservable:
        """`subject` (a layer, said as the user would read it) is no LoRA layer here."""
        known = "" if self.architecture in VLLM_LORA_MODULES else " (ftaas's default list)"
        return Unservable(
            f"{subject} is not a layer the engine serving {self.id} applies LoRA to; it "
            f"serves LoRA on {', '.join(sorted(self.served))}{known}{hint}",
            field,
        )


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def expand_targets(base: EngineBase, target_modules: str | list[str]) -> list[str]:
    """The layers peft adapts for `target_modules`: `all-linear` is every linear layer but
    embeddings and the output layer; a name matches a layer it equals or ends with (after a
    dot). Without the base's layers, the names themselves."""
    if base.layers is None:
        return [] if isinstance(target_modules, str) else list(target_modules)
    if isinstance(target_modules, str):  # "all-linear"
        return [name for name in base.layers if _last(name) not in EMBEDDINGS]
    matched: list[str] = []
    for target in target_modules:
        found = [name for name in base.layers if name == target or name.endswith("." + target)]
        if not found:
            raise Unservable(f"{target} matches no linear layer of {base.id}", TARGETS)
        matched += found
    return matched


def check_config(base: EngineBase, config: Mapping[str, Any]) -> None:
    """Refuse a peft LoRA config (adapter_config.json's fields) the engine for `base`
    could not load."""
    if config.get("peft_type", "LORA") != "LORA":
        raise Unservable(
            f"Only LoRA adapters can be served (peft_type is {config.get('peft_type')!r})",
            "peft_type",
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= base.max_lora_rank:
        raise Unservable(
            f"rank {rank!r} is outside 1..{base.max_lora_rank}, the adapter ranks the engine "
            f"serving {base.id} accepts",
            RANK,
        )
    if config.get("use_dora"):
        raise Unservable(
            "DoRA adapters cannot be served by the vLLM engine; use LoRA (optionally with "
            "use_rslora)",
            DORA,
        )
    if config.get("modules_to_save"):
        raise Unservable(
            "The adapter has modules_to_save (fully trained layers), which vLLM cannot serve",
            "modules_to_save",
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise Unservable(
            f"The adapter trains biases (bias={config.get('bias')!r}), which vLLM refuses",
            "bias",
        )
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise Unservable(f"lora_alpha must be a positive number, not {alpha!r}", "lora_alpha")


def check_targets(base: EngineBase, target_modules: str | list[str]) -> None:
    """Refuse `target_modules` (a job's: "all-linear" or names) that would adapt a layer
    the engine for `base` applies no LoRA to."""
    for name in expand_targets(base, target_modules):
        if _last(name) not in base.served:
            if isinstance(target_modules, str):
                raise base.refuse(
                    f"all-linear includes {name}, which",
                    TARGETS,
                    ": name the layers to adapt in target_modules instead",
                )
            raise base.refuse(name, TARGETS)


def check_weights(
    base: EngineBase, shapes: Mapping[str, tuple[list[int], str]], rank: int | None = None
) -> None:
    """Refuse adapter weights (key → (shape, safetensors dtype)) the engine for `base`
    could not load: LoRA matrices of modules it serves, of its layers' shapes, at `rank`
    (any it accepts, when None: the header is checked before the config may be read)."""
    if not shapes:
        raise Unservable("The adapter holds no weights", WEIGHTS)
    for key, (shape, dtype) in shapes.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise Unservable(f"{key} is not a LoRA weight (lora_A or lora_B)", WEIGHTS)
        module = match["module"]
        if _last(module) not in base.served:
            raise base.refuse(f"The adapter has weights for {module}, which", WEIGHTS)
        if dtype not in SERVABLE_DTYPES:
            raise Unservable(
                f"{key} is {dtype}; the engine serves {', '.join(SERVABLE_DTYPES)}", WEIGHTS
            )
        if base.layers is None:
            continue
        if module not in base.layers:
            raise Unservable(
                f"The adapter targets {module}, which {base.id} does not have", WEIGHTS
            )
        in_features, out_features = base.layers[module]
        side = match["side"]
        found = (shape[0] if side == "A" else shape[-1]) if len(shape) == 2 else 0
        r = rank if rank is not None else found
        if not 1 <= r <= base.max_lora_rank:
            raise Unservable(
                f"{key} has shape {list(shape)}: rank {r} is outside 1..{base.max_lora_rank}, "
                f"the ranks the engine serving {base.id} accepts",
                WEIGHTS,
            )
        expected = [r, in_features] if side == "A" else [out_features, r]
        if list(shape) != expected:
            raise Unservable(f"{key} has shape {list(shape)}; {base.id} needs {expected}", WEIGHTS)


def servable(
    base: EngineBase,
    lora_config: Mapping[str, Any],
    shapes: Mapping[str, tuple[list[int], str]] | None = None,
) -> None:
    """Refuse (Unservable) a LoRA adapter the engine serving `base` could not load: its
    config, and its weights when given (an adapter's; vLLM reads which modules it adapts
    from them, not from `target_modules`), else the config's `target_modules` (a job's,
    before it trains)."""
    check_config(base, lora_config)
    if shapes is not None:
        check_weights(base, shapes, lora_config.get("r"))
    else:
        check_targets(base, lora_config.get("target_modules") or "all-linear")
