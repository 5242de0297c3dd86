"""The base model with a LoRA adapter, configured from the resolved hyperparameters."""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from training.attention import packed_attention_implementation
from training.hyperparameters import ResolvedHyperparameters


def training_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """The base model's dtype for training on `device` (LoRA adapters train in float32
    whatever it is). A GPU with bf16: bf16. A CPU with native bf16 arithmetic (AVX512-BF16,
    AMX) and a model stored in bf16 (`stored`, SmolLM2's and most released models'): bf16,
    which loses nothing of the weights and halves the weights' and activations' memory, and
    whose matrix products run faster than float32's there (bench/train_throughput.py's
    ftaas-fp32 row). Otherwise float32: a model stored in float32 (ftaas-tiny) keeps its
    precision, and a CPU without bf16 arithmetic would emulate it, slower than float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if stored == torch.bfloat16 and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def stored_dtype(base_model_path: str) -> torch.dtype | None:
    """The dtype a model's weights are saved in, as its config says."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(base_model_path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def load_base_model(
    base_model_path: str, device: torch.device, packed_attention: bool = True
) -> Any:
    """The base model in the training dtype of `device`, still on the CPU.
    `packed_attention`: attention per example inside packed rows (training.attention); off,
    transformers' default, for callers that pad batches with an attention mask."""
    from transformers import AutoModelForCausalLM

    dtype = training_dtype(device, stored_dtype(base_model_path))
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
    fused_adapter_output: bool = True,
) -> Any:
    """`start_adapter`: a PEFT adapter folder to go on training (its own rank and target
    modules, not `hp`'s); a new adapter from `hp` when unset. `base`: the base model as
    load_base_model gives it, already loaded (a warm trainer's copy), which this run then
    owns and changes; loaded from `base_model_path` when unset. `fused_adapter_output`:
    LoRA layers add their scaled update inside the adapter's last matrix product
    (fuse_adapter_output); off, PEFT's own forward (the bench's peers, as their users run)."""
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
    if fused_adapter_output:
        fuse_adapter_output(tuned)
    return tuned


def fuse_adapter_output(model: Any) -> int:
    """Give each plain LoRA linear layer of `model` a forward that adds its scaled update
    to the base layer's output in the adapter's B product (`addmm(base, A(x), Bᵀ, alpha=
    scaling)`, one kernel), where PEFT multiplies the update by the scaling and then adds
    it, two more passes over an output-sized tensor each way (for SmolLM2's 1,536-wide MLP
    products, slower on a CPU than the rank-16 products themselves). Values and gradients
    are PEFT's (test_lora). Layers PEFT gives more (DoRA, several adapters, merged weights,
    a bias on B, mixed-adapter batches) keep PEFT's forward, per call. Returns the number of
    layers given it."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear]
    for layer in layers:
        layer.forward = types.MethodType(_fused_lora_forward, layer)  # type: ignore[method-assign]
    return len(layers)


def _fused_lora_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    plain = (
        name is not None
        and not args
        and not kwargs
        and not layer.disable_adapters
        and not layer.merged
        and name in layer.lora_A
        and name not in layer.lora_variant
        and layer.lora_B[name].bias is None
        # One dtype for every product, as autocast gives; otherwise PEFT's type promotion.
        and (
            torch.is_autocast_enabled(x.device.type)
            or x.dtype
            == getattr(layer.base_layer, "weight", x).dtype
            == layer.lora_A[name].weight.dtype
            == layer.lora_B[name].weight.dtype
        )
    )
    if not plain:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    update = layer.lora_A[name](layer.lora_dropout[name](x))
    fused = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        update.reshape(-1, update.shape[-1]),
        layer.lora_B[name].weight.t(),
        alpha=layer.scaling[name],
    )
    return fused.view(result.shape)


@contextlib.contextmanager
def adapter_precision(model: Any) -> Iterator[None]:
    """A forward pass of a LoRA model whose base is in bf16 and whose adapter is in float32
    (build_lora_model) computes the adapter's products in bf16 over the base's own
    activations, as mixed precision does: under autocast, with PEFT's cast of each LoRA
    layer's input to float32 switched off (as peft.helpers.disable_input_dtype_casting
    does, on layers found once per model rather than at every pass). Otherwise every LoRA
    layer keeps a float32 copy of its input for the backward pass, as much memory again as
    the base's bf16 activations (seven copies a layer with all-linear targets). The
    adapter's weights, gradients and optimizer stay in float32. A model in one dtype is
    left as it is."""
    base_dtype, layers = _adapter_layout(model)
    if base_dtype not in (torch.bfloat16, torch.float16) or not layers:
        yield
        return
    casting = [layer.cast_input_dtype_enabled for layer in layers]
    device_type = next(model.parameters()).device.type
    try:
        for layer in layers:
            layer.cast_input_dtype_enabled = False
        with torch.autocast(device_type, dtype=base_dtype):
            yield
    finally:
        for layer, enabled in zip(layers, casting, strict=True):
            layer.cast_input_dtype_enabled = enabled


_ADAPTER_LAYOUTS: weakref.WeakKeyDictionary[Any, tuple[torch.dtype | None, list[Any]]] = (
    weakref.WeakKeyDictionary()
)


def _adapter_layout(model: Any) -> tuple[torch.dtype | None, list[Any]]:
    """The dtype of the model's first frozen parameter (the base's, under LoRA) and its
    PEFT layers, found once per model."""
    layout = _ADAPTER_LAYOUTS.get(model)
    if layout is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        frozen = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        layout = _ADAPTER_LAYOUTS[model] = (frozen, layers)
    return layout
