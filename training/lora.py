"""The base model with a LoRA adapter, configured from the resolved hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.attention import packed_attention_implementation
from training.hyperparameters import ResolvedHyperparameters


def training_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it; float32 elsewhere (CPUs and older GPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(
    base_model_path: str, device: torch.device, packed_attention: bool = True
) -> Any:
    """The base model in the training dtype of `device`, still on the CPU.
    `packed_attention`: attention per example inside packed rows (training.attention); off,
    transformers' default, for callers that pad batches with an attention mask."""
    from transformers import AutoModelForCausalLM

    dtype = training_dtype(device)
    attention = packed_attention_implementation(device, dtype) if packed_attention else None
    model = AutoModelForCausalLM.from_pretrained(
        base_model_path, dtype=dtype, attn_implementation=attention
    )
    model.config.use_cache = False  # a cache would also hide packed sequences from the mask
    return model


def build_lora_model(
    base_model_path: str,
    hp: ResolvedHyperparameters,
    device: torch.device,
    start_adapter: str | Path | None = None,
    packed_attention: bool = True,
    base: Any | None = None,
) -> Any:
    """`start_adapter`: a PEFT adapter folder to go on training (its own rank and target
    modules, not `hp`'s); a new adapter from `hp` when unset. `base`: the base model as
    load_base_model gives it, already loaded (a warm trainer's copy), which this run then
    owns and changes; loaded from `base_model_path` when unset."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = base if base is not None else load_base_model(base_model_path, device, packed_attention)
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tuned: Any
    if start_adapter is not None:
        tuned = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True).to(device)
    else:
        lora = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.target_modules,
            use_rslora=hp.use_rslora,
            use_dora=hp.use_dora,
            task_type="CAUSAL_LM",
        )
        tuned = get_peft_model(model, lora).to(device)
    for parameter in tuned.parameters():
        if parameter.requires_grad:  # adapters train in float32 even on a bf16 base
            parameter.data = parameter.data.float()
    return tuned
