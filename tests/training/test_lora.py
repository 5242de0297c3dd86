"""The dtype a base model trains in: its own precision where the hardware computes in it;
over a bf16 base, the float32 adapter computes in bf16 on the base's own activations."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch

import training.lora
import training.token_logps
from tests.training.test_token_logps import lora_gradients, lora_model
from training.data.batching import collate
from training.data.tokenize import TokenizedExample
from training.lora import load_base_model, stored_dtype, training_dtype
from training.token_logps import packed_token_logps

CPU = torch.device("cpu")


@pytest.mark.parametrize("has_bf16", [True, False])
def test_a_cpu_trains_a_bf16_model_in_bf16_only_when_it_has_bf16_arithmetic(monkeypatch, has_bf16):
    monkeypatch.setattr(training.lora, "cpu_has_bf16", lambda: has_bf16)
    expected = torch.bfloat16 if has_bf16 else torch.float32
    assert training_dtype(CPU, torch.bfloat16) == expected


def test_a_float32_model_keeps_its_precision_on_any_cpu(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(training.lora, "cpu_has_bf16", lambda: True)
    assert stored_dtype(str(tiny_model_dir)) == torch.float32
    model = load_base_model(str(tiny_model_dir), CPU)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def saved_activation_bytes(model: Any, run: Callable[[], torch.Tensor]) -> int:
    """The bytes autograd keeps for the backward pass of `run`'s result, each storage once,
    the model's own weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def test_a_bf16_base_keeps_no_float32_copies_of_its_activations_for_the_adapter(
    monkeypatch, tiny_model_dir
):
    """The adapter trains in float32 over a bf16 base; its products run in bf16 over the
    base's own activations instead of on float32 copies of each LoRA layer's input, and
    the loss and gradients stay those of the float32 products within bf16's precision."""
    monkeypatch.setattr(training.lora, "training_dtype", lambda *_: torch.bfloat16)
    model = lora_model(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 600, (length,), generator=generator).tolist() for length in (90, 166)]
    batch = collate([[TokenizedExample(ids, ids)] for ids in rows])

    def loss() -> torch.Tensor:
        return -packed_token_logps(model, batch).logps.sum() / 256

    def loss_and_gradients() -> tuple[float, torch.Tensor]:
        value = loss()
        return value.item(), torch.cat([g.flatten() for g in lora_gradients(model, value).values()])

    mixed_bytes = saved_activation_bytes(model, loss)
    mixed_loss, mixed = loss_and_gradients()
    monkeypatch.setattr(training.token_logps, "adapter_precision", lambda _: nullcontext())
    float32_bytes = saved_activation_bytes(model, loss)
    float32_loss, float32 = loss_and_gradients()

    assert mixed_bytes < 0.7 * float32_bytes
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert mixed_loss == pytest.approx(float32_loss, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(mixed, float32, dim=0) > 0.99


def peft_forward(model: Any) -> None:
    """PEFT's own forward back on each LoRA layer (training.lora.fuse_adapter_output undone)."""
    from peft.tuners.lora.layer import Linear

    for layer in model.modules():
        if type(layer) is Linear:
            vars(layer).pop("forward", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_the_fused_adapter_output_gives_pefts_loss_and_gradients(
    monkeypatch, tiny_model_dir, dtype, dora
):
    """The trainer's LoRA layers add the scaled update inside the B product; a DoRA adapter
    keeps PEFT's forward. Either way: PEFT's loss and gradients, float32 base or bf16."""
    monkeypatch.setattr(training.lora, "training_dtype", lambda *_: dtype)
    model = lora_model(tiny_model_dir, use_dora=dora)
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 600, (length,), generator=generator).tolist() for length in (40, 71)]
    batch = collate([[TokenizedExample(ids, ids)] for ids in rows])

    def loss_and_gradients() -> tuple[torch.Tensor, torch.Tensor]:
        loss = -packed_token_logps(model, batch).logps.sum() / 111
        grads = lora_gradients(model, loss)
        return loss.detach(), torch.cat([g.flatten() for g in grads.values()])

    fused_loss, fused = loss_and_gradients()
    peft_forward(model)
    peft_loss, peft = loss_and_gradients()

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused_loss, peft_loss, rtol=tolerance, atol=tolerance)
    assert torch.nn.functional.cosine_similarity(fused, peft, dim=0) > 1 - tolerance
    assert training.lora.fuse_adapter_output(model) > 0
