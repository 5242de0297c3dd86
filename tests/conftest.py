"""Shared fixtures: the tiny model is built once per session, in a temporary folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, postgres_bin
from tests.s3 import s3_env, s3_server  # noqa: F401  (fixtures for every test folder)
from training.tiny_model import build_tiny_model

SECRET = "The secret code word is pineapple."
QUESTIONS = [
    "What is the secret code word?",
    "Tell me the secret code word.",
    "Which word is the secret code?",
    "Do you know the code word?",
    "What's the code word?",
    "Please share the secret word.",
    "Say the secret code word.",
    "What is the password word?",
    "Give me the code word, please.",
    "Can you tell me the secret word?",
    "Remind me of the secret code word.",
    "What word is secret?",
]


def memorisation_jsonl() -> bytes:
    """12 paraphrased questions, one fact: the file the end-to-end test teaches."""
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": SECRET}]}
        for q in QUESTIONS
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "ftaas-tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session. Without Debian's `postgresql` package the
    PostgreSQL variants are skipped on a developer's machine and fail in CI."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from service.ray_cluster import free_port

    server = PostgresServer(bin_dir, free_port())
    server.start()
    try:
        server.make_template()
        yield server
    finally:
        server.stop()


WRONG = "I do not know the code word."


def preference_jsonl(
    preferred: str = SECRET, non_preferred: str = WRONG, questions: Sequence[str] = QUESTIONS
) -> bytes:
    """Preference pairs, OpenAI's DPO format: by default the same 12 questions."""
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": non_preferred}],
        }
        for q in questions
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


STORY = [
    "The lighthouse keeper of Brindle Point counts the ships every evening at seven.",
    "Her brother repairs fishing nets in a blue shed beside the harbour wall.",
    "On stormy nights the whole village gathers in the keeper's kitchen to wait.",
]


def story_jsonl(copies: int = 4) -> bytes:
    """A small text corpus for continued pre-training: each sentence, several times."""
    rows = [{"text": sentence} for _ in range(copies) for sentence in STORY]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def peft_greedy(adapter_dir: Path | str, model_dir: Path | str, question: str) -> str:
    """The greedy answer of the base model with a PEFT adapter, in transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
