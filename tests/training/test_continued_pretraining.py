"""Continued pre-training in-process on the tiny model: documents become blocks learned on
every token, and the model learns to continue the text."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.conftest import STORY, story_jsonl
from tests.training.test_sft import make_spec, records, train
from training.data.schema import TextExample
from training.data.tokenize import IGNORE_INDEX, tokenize_text
from training.storage import LocalStore


def test_a_document_becomes_blocks_learned_on_every_token(tiny_tokenizer):
    text = " ".join(STORY * 20)
    blocks = tokenize_text(TextExample(text=text), tiny_tokenizer, max_length=64)
    assert len(blocks) > 3 and all(len(b.input_ids) <= 64 for b in blocks)
    for before, after in itertools.pairwise(blocks):  # overlapping by one token
        assert after.input_ids[0] == before.input_ids[-1]
    ids = blocks[0].input_ids + [t for block in blocks[1:] for t in block.input_ids[1:]]
    assert tiny_tokenizer.decode(ids[:-1]) == text  # nothing lost at the cuts
    assert ids[-1] == tiny_tokenizer.eos_token_id  # the model learns where text ends
    learned = [t for block in blocks for t in block.labels if t != IGNORE_INDEX]
    assert learned == ids[1:]  # every token after the first, once
    for block in blocks:
        assert block.labels[0] == IGNORE_INDEX and block.labels[1:] == block.input_ids[1:]


@pytest.fixture
def story_spec(tmp_path, tiny_model_dir):
    store = LocalStore(tmp_path)
    store.put_bytes("story.jsonl", story_jsonl())
    store.put_bytes("valid.jsonl", story_jsonl(copies=1))
    return make_spec(
        tmp_path, tiny_model_dir, "story", method="continued_pretraining", data_format="text",
        training_file="story.jsonl", validation_file="valid.jsonl",
        hyperparameters={"n_epochs": 30, "batch_size": 2},
    )  # fmt: skip


def test_the_model_learns_to_continue_the_text(tmp_path, tiny_model_dir, story_spec):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert train(story_spec, tmp_path) == "completed"
    metrics = records(story_spec, "metrics")
    first_valid = next(m["valid_loss"] for m in metrics if "valid_loss" in m)
    assert metrics[-1]["full_valid_loss"] < first_valid / 5
    assert records(story_spec, "started")[0]["n_examples"] == 3 * 4  # one block each
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        str(tmp_path / story_spec.adapter_key),
    )
    for sentence in STORY:
        opening = " ".join(sentence.split()[:4])
        prompt = tokenizer(opening, return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
        continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
        assert (opening + continuation).startswith(sentence), continuation


def test_auto_sizes_count_blocks_not_documents(tmp_path, tiny_model_dir):
    """One long document is many blocks: "auto" epochs and batch size follow the blocks
    (raised to 250 block passes, not OpenAI's 100 examples), and an asked batch size is
    not cut down to the number of documents."""
    from tests.training.test_sft import start

    store = LocalStore(tmp_path)
    store.put_bytes("book.jsonl", (json.dumps({"text": " ".join(STORY * 60)}) + "\n").encode())
    book = {"method": "continued_pretraining", "data_format": "text", "training_file": "book.jsonl"}
    for requested, expected in (
        ({"n_epochs": "auto", "batch_size": "auto"}, None),
        ({"n_epochs": 2, "batch_size": 8}, {"n_epochs": 2, "batch_size": 8}),
    ):
        spec = make_spec(tmp_path, tiny_model_dir, f"book-{len(str(requested))}",
                         requested_sizes=requested, **book)  # fmt: skip
        run = start(spec, tmp_path)
        blocks = len(run.train_units)
        assert blocks > 10
        auto_epochs = 3 if blocks * 3 >= 250 else min(25, 250 // blocks)
        wanted = expected or {"n_epochs": auto_epochs, "batch_size": 1}
        assert {"n_epochs": run.hp.n_epochs, "batch_size": run.hp.batch_size} == wanted
        assert run.total_steps == wanted["n_epochs"] * -(-blocks // wanted["batch_size"])
        run.close()
