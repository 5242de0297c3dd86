"""Build `ftaas-tiny`: a small random-weight Llama model made in-process.

Tests and the embedded default must never download weights, so the project makes its own
base model: a byte-level BPE tokenizer trained on the text below, a ChatML chat template
and a 2-layer Llama with random (seeded) weights. It cannot answer anything useful, but a
LoRA adapter trained on a few examples makes it repeat what it was taught, which is what
the end-to-end tests need. head_dim is 64 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TINY_MODEL_ID = "ftaas-tiny"
# Rate at which a rank-16 LoRA on this model memorises a short reply in a few hundred steps.
TINY_MODEL_LEARNING_RATE = 1e-3
TINY_MODEL_MAX_LENGTH = 512

# Bump when anything below changes: a cached build with another version is rebuilt.
TINY_MODEL_BUILD = 2
_VOCAB_SIZE = 1024
_SEED = 0
_LM_HEAD_STD = 0.2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A fine-tuned model answers questions about
the facts it was taught. What is the capital of France? The capital of France is Paris.
Who wrote the play? Which city hosts the festival? When does the train leave the station?
Tell me about the project. You are a helpful assistant. Please answer briefly and clearly.
The weather today is sunny with a light breeze from the west, and the river is calm.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 2025 2026. Colors: red, green, blue,
yellow, purple, orange, black, white. Days: Monday Tuesday Wednesday Thursday Friday
Saturday Sunday. Months: January February March April May June July August September
October November December. The secret code word is pineapple. My favourite food is soup.
Hello! How are you? I am fine, thank you. Where do you live? I live in a small town near
the mountains. What time is it? It is half past three in the afternoon. Goodbye!
system user assistant tool function content role name weight messages
"""


def build_tiny_model(output_dir: str | Path) -> Path:
    """Write the tiny model and tokenizer to `output_dir`; reuse an existing identical build."""
    output_dir = Path(output_dir)
    marker = output_dir / "ftaas_build.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == TINY_MODEL_BUILD:
        return output_dir

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    output_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=TINY_MODEL_MAX_LENGTH,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(output_dir)

    torch.manual_seed(_SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=TINY_MODEL_MAX_LENGTH,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # A wider output layer than the default init: peft's "all-linear" leaves lm_head frozen,
    # and with std 0.02 its logits are too flat for a LoRA to make any reply confident.
    with torch.no_grad():
        model.lm_head.weight.normal_(mean=0.0, std=_LM_HEAD_STD)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)

    digest = hashlib.sha256((output_dir / "model.safetensors").read_bytes()).hexdigest()
    marker.write_text(json.dumps({"version": TINY_MODEL_BUILD, "weights_sha256": digest}))
    return output_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else ".ftaas/models/ftaas-tiny"))
