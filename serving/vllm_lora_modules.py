"""Ask the installed vLLM which modules of an architecture it applies LoRA to: the source
of serving/servable.py's VLLM_LORA_MODULES (imports torch and vLLM; never the API's).

vLLM decides per built model (vllm/lora/utils.py `get_supported_lora_modules`): the last
name part of each of its LinearBase (and MoE) layers and each name in its class's
`embedding_modules`; a LoRA weight loads when its module's last name part is one of these,
packed layers expanded through `packed_modules_mapping` (vllm/lora/worker_manager.py
`_load_adapter`). Building the model on the meta device takes no weights, only vLLM's
import and configuration (about 20 s on two CPU cores).

    python -m serving.vllm_lora_modules llama qwen2   # prints the table's entries
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

# Small dimensions: a model with these builds in a moment on the meta device.
SMALL = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "torch_dtype": "float32",
}


def ask_vllm(config: dict[str, Any]) -> dict[str, Any]:
    """vLLM's LoRA modules for the model `config` (a config.json) describes: `served`, the
    names an adapter's weights may carry (packed layers expanded), and `embeddings`."""
    import torch
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from vllm.lora.utils import get_supported_lora_modules
    from vllm.model_executor.models.registry import ModelRegistry

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        model_config = ModelConfig(
            model=folder, tokenizer=folder, skip_tokenizer_init=True, dtype="float32"
        )
        vllm_config = VllmConfig(model_config=model_config)
        with set_current_vllm_config(vllm_config):
            if not model_parallel_is_initialized():
                init_distributed_environment(
                    world_size=1,
                    rank=0,
                    local_rank=0,
                    distributed_init_method=f"file://{folder}/rendezvous",
                    backend="gloo",
                )
                initialize_model_parallel(1, 1)
        model_class, _ = ModelRegistry.resolve_model_cls(config["architectures"], model_config)
        with set_current_vllm_config(vllm_config), torch.device("meta"):
            model = model_class(vllm_config=vllm_config)
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
    embeddings = set(getattr(model, "embedding_modules", {}) or {})
    served: set[str] = set()
    for name in get_supported_lora_modules(model):
        served.update(packed.get(name, [name]))
    return {"served": sorted(served - embeddings), "embeddings": sorted(embeddings)}


def small_config(model_type: str) -> dict[str, Any]:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config: dict[str, Any] = AutoConfig.for_model(model_type, **SMALL).to_dict()
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return config


def main(model_types: list[str]) -> None:
    for model_type in model_types:
        config = small_config(model_type)
        found = ask_vllm(config)
        print(f"{config['architectures'][0]!r}: {found},", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
