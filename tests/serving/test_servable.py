"""The servable check (serving/servable.py) without the API, and its table of the modules
vLLM applies LoRA to, asked of the installed vLLM again."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from serving.servable import (
    FALLBACK_MODULES,
    VLLM_LORA_MODULES,
    EngineBase,
    Unservable,
    servable,
)

LAYERS = {
    "model.embed_tokens": (512, 128),
    "model.layers.0.self_attn.qkv_proj": (128, 384),
    "model.layers.0.mlp.gate": (128, 4),
    "lm_head": (128, 512),
}


def refusal(base: EngineBase, config: dict, shapes: dict | None = None) -> Unservable:
    with pytest.raises(Unservable) as raised:
        servable(base, {"peft_type": "LORA", "r": 8} | config, shapes)
    return raised.value


def test_what_vllm_serves_depends_on_the_architecture():
    phi3 = EngineBase("phi", 16, "Phi3ForCausalLM", LAYERS)
    servable(phi3, {"peft_type": "LORA", "r": 8, "target_modules": ["qkv_proj"]})
    # all-linear takes the router too (never the embeddings or the output layer).
    error = refusal(phi3, {"target_modules": "all-linear"})
    assert error.field == "target_modules"
    assert error.message.startswith("all-linear includes model.layers.0.mlp.gate, which is")
    # An architecture ftaas has not asked vLLM about: the projections every decoder serves.
    other = EngineBase("other", 16, "SomeNewForCausalLM", LAYERS)
    error = refusal(other, {"target_modules": ["qkv_proj"]})
    assert error.message == (
        "model.layers.0.self_attn.qkv_proj is not a layer the engine serving other applies "
        f"LoRA to; it serves LoRA on {', '.join(sorted(FALLBACK_MODULES))} (ftaas's default "
        "list)"
    )
    # Before the base's weights can be read: by the names alone.
    building = EngineBase("building", 16)
    servable(building, {"peft_type": "LORA", "r": 8, "target_modules": ["self_attn.q_proj"]})
    assert refusal(building, {"target_modules": ["embed_tokens"]}).field == "target_modules"


def test_an_adapters_weights_decide_what_it_adapts_not_its_config():
    phi3 = EngineBase("phi", 16, "Phi3ForCausalLM", LAYERS)
    key = "base_model.model.model.layers.0.self_attn.qkv_proj"
    good = {f"{key}.lora_A.weight": ([8, 128], "BF16"), f"{key}.lora_B.weight": ([384, 8], "F32")}
    # peft keeps target_modules names that matched nothing; vLLM reads the weights.
    servable(phi3, {"peft_type": "LORA", "r": 8, "target_modules": ["qkv_proj", "c_attn"]}, good)
    router = {"base_model.model.model.layers.0.mlp.gate.lora_A.weight": ([8, 128], "F32")}
    assert refusal(phi3, {}, router).message.startswith(
        "The adapter has weights for model.layers.0.mlp.gate, which is not a layer"
    )
    bad_shape = good | {f"{key}.lora_B.weight": ([128, 8], "F32")}
    assert refusal(phi3, {}, bad_shape).message.endswith("phi needs [384, 8]")
    for config, field in [
        ({"r": 32}, "r"),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias"),
        ({"peft_type": "IA3"}, "peft_type"),
    ]:
        assert refusal(phi3, config, good).field == field


@pytest.mark.integration
def test_the_table_is_what_the_installed_vllm_says():
    """Builds each architecture's model in vLLM on the meta device (~20 s of vLLM's
    import and configuration), in a child process: vLLM's process groups stay there."""
    model_types = {
        "LlamaForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2",
        "Phi3ForCausalLM": "phi3",
    }
    found = subprocess.run(
        [sys.executable, "-m", "serving.vllm_lora_modules", *model_types.values()],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    for architecture in model_types:
        line = next(line for line in found.splitlines() if line.startswith(f"'{architecture}'"))
        served = ast.literal_eval(line.split(": ", 1)[1].rstrip(","))["served"]
        assert frozenset(served) == VLLM_LORA_MODULES[architecture], architecture
