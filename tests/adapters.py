"""Random LoRA adapters of a base model, made with peft in-process, for tests and benchmarks
that need many distinct tuned models without training each one: each changes the model's
answers (its B matrices are not zero), and imports as a tar.gz (POST /v1/models)."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(model_dir: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A rank-`rank` LoRA of every linear layer, with random (seeded) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGET_MODULES,
        init_lora_weights=False,  # B random too: the adapter changes what the model says
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def archive(folder: Path) -> bytes:
    """The adapter folder as the tar.gz POST /v1/models imports."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buffer.getvalue()


def zero_bomb(claimed: int) -> bytes:
    """A .tar.gz of one adapter_model.safetensors of `claimed` zero bytes, about a
    thousand times smaller: one deflate stream in which, after a full flush, every MiB of
    zeros compresses to the same bytes (so it is made by repeating them). It has no end:
    nothing reads that far."""
    member = tarfile.TarInfo("adapter/adapter_model.safetensors")
    member.size = claimed
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip
    head = deflate.compress(member.tobuf(format=tarfile.PAX_FORMAT))
    head += deflate.flush(zlib.Z_FULL_FLUSH)
    mib = b"\0" * 1024 * 1024
    block = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH) == block
    return head + block * (claimed // len(mib))
