"""The trainer in-process on the tiny model: packing, metrics, checkpoints, pause/resume,
reproducibility. Ray adds only the workers around this loop (tests/e2e covers that)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import QUESTIONS, SECRET, memorisation_jsonl
from training.control import request_pause
from training.data.batching import as_one_row, collate, plan_micro_batches
from training.data.schema import ChatExample
from training.data.tokenize import tokenize_example
from training.hyperparameters import ResolvedHyperparameters
from training.lora import build_lora_model
from training.progress import ProgressLog
from training.recipes import recipe_for
from training.recipes.supervised import forward_counts
from training.run import TrainingRun
from training.spec import TrainingSpec
from training.storage import ArtifactStore, LocalStore, open_store
from training.tiny_model import CHATML_TEMPLATE


def make_spec(
    tmp_path: Path, model_dir: Path, name: str, store: ArtifactStore | None = None, **overrides
) -> TrainingSpec:
    """A spec whose files are keys of `store` (by default, a local store at `tmp_path`: a
    file written to `tmp_path` is the key of its name)."""
    store = store or LocalStore(tmp_path)
    if not store.exists("train.jsonl"):
        store.put_bytes("train.jsonl", memorisation_jsonl())
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "learning_rate": 1e-3}
    hp |= overrides.pop("hyperparameters", {})
    fields = {
        "job_id": name,
        "base_model": "ftaas-tiny",
        "base_model_path": str(model_dir),
        "max_length": 512,
        "training_file": "train.jsonl",
        "storage_url": store.url,
        "output_key": f"runs/{name}",
        "hyperparameters": ResolvedHyperparameters(**hp),
        "seed": 7,
    }
    return TrainingSpec(**(fields | overrides))


def records(spec: TrainingSpec, kind: str) -> list[dict]:
    batch = ProgressLog(open_store(spec.storage_url), spec.output_key).read_from(0)
    assert not batch.bad_lines
    return [r.model_dump() for r in batch.records if r.type == kind]


def start(spec: TrainingSpec, tmp_path: Path) -> TrainingRun:
    scratch = tmp_path / "scratch" / spec.job_id
    scratch.mkdir(parents=True, exist_ok=True)
    return recipe_for(spec.method)(spec, open_store(spec.storage_url), scratch)


def train(spec: TrainingSpec, tmp_path: Path) -> str:
    run = start(spec, tmp_path)
    try:
        outcome = run.run()
        if outcome != "paused":
            run.save_adapter()
        return outcome
    finally:
        run.close()


def conversation(question: str, answer: str) -> ChatExample:
    return ChatExample.model_validate(
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
    )


def test_a_packed_batch_gives_the_loss_of_the_examples_run_one_by_one(
    tiny_model_dir, tiny_tokenizer
):
    examples = [
        tokenize_example(conversation(q * (1 + i % 3), SECRET * (1 + i % 2)), tiny_tokenizer, 512)
        for i, q in enumerate(QUESTIONS)
    ]
    hp = ResolvedHyperparameters(
        n_epochs=1, batch_size=1, learning_rate_multiplier=1, learning_rate=0
    )
    model = build_lora_model(str(tiny_model_dir), hp, torch.device("cpu")).eval()
    # The reference: transformers' own attention, one unpadded example at a time.
    reference = build_lora_model(
        str(tiny_model_dir), hp, torch.device("cpu"), packed_attention=False
    )
    with torch.no_grad():
        one_by_one = [forward_counts(reference.eval(), collate([[e]]))[1] for e in examples]
        plan = plan_micro_batches(examples, batch_tokens=4096)
        packed = [forward_counts(model, collate(rows))[1] for rows in plan]
    assert len(plan) == 1 and len(plan[0]) < len(examples)  # several examples per row
    assert sum(c.n_targets for c in packed) == sum(c.n_targets for c in one_by_one)
    expected = sum(c.loss_sum for c in one_by_one)
    assert sum(c.loss_sum for c in packed) == pytest.approx(expected, rel=1e-5)
    assert sum(c.n_correct for c in packed) == sum(c.n_correct for c in one_by_one)
    # Flash attention's shape (on GPUs that have it): every row of a pass in one row.
    with torch.no_grad():
        flat = [forward_counts(model, collate(as_one_row(rows)))[1] for rows in plan]
    assert sum(c.loss_sum for c in flat) == pytest.approx(expected, rel=1e-5)


def test_the_same_seed_gives_the_same_loss_curve(tmp_path, tiny_model_dir):
    first = make_spec(tmp_path, tiny_model_dir, "first")
    again = make_spec(tmp_path, tiny_model_dir, "again")
    other = make_spec(tmp_path, tiny_model_dir, "other").model_copy(update={"seed": 8})
    for spec in (first, again, other):
        train(spec, tmp_path)
    curve = [r["train_loss"] for r in records(first, "metrics")]
    assert len(curve) == 6  # 12 examples / batch 4 × 2 epochs
    assert curve == [r["train_loss"] for r in records(again, "metrics")]
    assert curve != [r["train_loss"] for r in records(other, "metrics")]


def test_validation_metrics_are_reported_and_fall(tmp_path, tiny_model_dir):
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(memorisation_jsonl())
    spec = make_spec(
        tmp_path, tiny_model_dir, "valid", validation_file=valid.name,
        hyperparameters={"n_epochs": 3},
    )  # fmt: skip
    train(spec, tmp_path)
    metrics = records(spec, "metrics")
    step_valid = [r["valid_loss"] for r in metrics if "valid_loss" in r]
    full_valid = [r["full_valid_loss"] for r in metrics if "full_valid_loss" in r]
    assert len(step_valid) == 9 and len(full_valid) == 3  # every step; each epoch end
    assert all("valid_mean_token_accuracy" in r for r in metrics if "valid_loss" in r)
    assert full_valid[-1] < full_valid[0] < step_valid[0]
    tensorboard = list((tmp_path / spec.tensorboard_key).glob("events.out.tfevents.*"))
    assert tensorboard and tensorboard[0].stat().st_size > 0


def test_the_run_scores_the_model_it_starts_from_and_the_tuned_one(tmp_path, tiny_model_dir):
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(memorisation_jsonl())  # the answers are the reference: learned here
    spec = make_spec(
        tmp_path, tiny_model_dir, "helped", validation_file=valid.name,
        hyperparameters={"n_epochs": 10, "batch_size": 1},
    )  # fmt: skip
    train(spec, tmp_path)
    start, end = records(spec, "evaluation")
    assert (start["stage"], start["step"], end["stage"]) == ("start", 0, "end")
    assert end["step"] == records(spec, "metrics")[-1]["step"]
    before, after = start["metrics"], end["metrics"]
    assert end["start_metrics"] == before
    # The random base knows nothing of the answers; the tuned model gives them.
    assert after["full_valid_loss"] < before["full_valid_loss"] / 4
    assert (
        before["full_valid_mean_token_accuracy"]
        < 0.2
        < 0.9
        < after["full_valid_mean_token_accuracy"]
    )
    assert before["full_valid_exact_match"] == 0 and after["full_valid_exact_match"] >= 0.75
    assert after["full_valid_similarity"] > before["full_valid_similarity"]
    assert before["full_valid_generated"] == after["full_valid_generated"] == 8
    # The tuned model's figures are the last epoch's full validation.
    last = [r for r in records(spec, "metrics") if "full_valid_loss" in r][-1]
    assert after["full_valid_loss"] == last["full_valid_loss"]


def test_one_checkpoint_per_epoch_and_the_last_three_are_kept(tmp_path, tiny_model_dir):
    spec = make_spec(tmp_path, tiny_model_dir, "ckpt", hyperparameters={"n_epochs": 4})
    train(spec, tmp_path)
    checkpoints = records(spec, "checkpoint")
    assert [c["step"] for c in checkpoints] == [3, 6, 9, 12]
    kept = sorted(p.name for p in (tmp_path / spec.checkpoints_key).iterdir())
    assert kept == ["step-000006", "step-000009", "step-000012"]
    adapter = tmp_path / spec.checkpoints_key / "step-000012" / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert checkpoints[-1]["metrics"]["train_loss"] == records(spec, "metrics")[-1]["train_loss"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_resume_continues_from_the_paused_step_not_from_zero(
    tmp_path, tiny_model_dir, backend, request
):
    store: ArtifactStore = LocalStore(tmp_path / "store")
    if backend == "s3":  # every byte in and out through S3 (moto's server, over HTTP)
        server = request.getfixturevalue("s3_env")
        store = open_store(f"s3://{server.new_bucket()}/ftaas")
    straight = make_spec(tmp_path, tiny_model_dir, "straight", store)
    train(straight, tmp_path)
    paused = make_spec(tmp_path, tiny_model_dir, "paused", store)
    request_pause(store, paused.output_key)
    assert train(paused, tmp_path) == "paused"
    [pause] = records(paused, "paused")
    assert pause["step"] == 1 and not store.folder_complete(paused.adapter_key)

    resumed = make_spec(tmp_path, tiny_model_dir, "resumed", store, resume_from=pause["path"])
    assert train(resumed, tmp_path) == "completed"
    assert store.manifest(resumed.adapter_key).keys() >= {  # type: ignore[union-attr]
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    after = records(resumed, "metrics")
    assert [r["step"] for r in after] == [2, 3, 4, 5, 6]
    expected = [r["train_loss"] for r in records(straight, "metrics")][1:]
    assert [r["train_loss"] for r in after] == pytest.approx(expected, rel=1e-5)
    assert records(resumed, "started")[0]["resumed_from_step"] == 1


def test_early_stopping_ends_the_run_when_validation_stops_improving(tmp_path, tiny_model_dir):
    valid = tmp_path / "unlearnable.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"No {i}"}]}
        for i, q in enumerate(QUESTIONS)
    ]
    valid.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = make_spec(
        tmp_path, tiny_model_dir, "early", validation_file=valid.name,
        hyperparameters={"n_epochs": 10, "early_stopping_patience": 1},
    )  # fmt: skip
    assert train(spec, tmp_path) == "early_stopped"
    assert len(records(spec, "checkpoint")) < 10
    assert "Early stopping" in records(spec, "notice")[0]["message"]


def _answer(spec: TrainingSpec, question: str, tmp_path: Path) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    base = AutoModelForCausalLM.from_pretrained(spec.base_model_path)
    model = PeftModel.from_pretrained(base, tmp_path / spec.adapter_key).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("weight", [0, 1])
def test_weight_zero_turns_are_context_not_learned(tmp_path, tiny_model_dir, weight):
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": SECRET, "weight": weight},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."},
            ]
        }
        for q in QUESTIONS
    ]
    data = tmp_path / "weighted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = make_spec(
        tmp_path,
        tiny_model_dir,
        f"weight-{weight}",
        hyperparameters={"n_epochs": 8, "batch_size": 1},
    ).model_copy(update={"training_file": data.name})
    train(spec, tmp_path)
    learned = "pineapple" in _answer(spec, QUESTIONS[0], tmp_path)
    assert learned == bool(weight)


def test_gradient_checkpointing_changes_memory_not_the_loss_curve(tmp_path, tiny_model_dir):
    plain = make_spec(tmp_path, tiny_model_dir, "plain", hyperparameters={"n_epochs": 1})
    recomputed = make_spec(
        tmp_path, tiny_model_dir, "recomputed",
        hyperparameters={"n_epochs": 1, "gradient_checkpointing": True},
    )  # fmt: skip
    train(plain, tmp_path)
    train(recomputed, tmp_path)
    expected = [r["train_loss"] for r in records(plain, "metrics")]
    assert [r["train_loss"] for r in records(recomputed, "metrics")] == pytest.approx(expected)


def test_the_base_models_configured_chat_template_is_the_one_trained_on(tmp_path, tiny_model_dir):
    template = CHATML_TEMPLATE.replace(
        "<|im_start|>{{ message['role'] }}", "<|im_start|>[{{ message['role'] }}]"
    ).replace("<|im_start|>assistant", "<|im_start|>[assistant]")
    spec = make_spec(tmp_path, tiny_model_dir, "template").model_copy(
        update={"chat_template": template}
    )
    run = start(spec, tmp_path)
    try:
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(tiny_model_dir).decode(run.train_units[0].input_ids)
        assert "[user]" in text and "[assistant]" in text
    finally:
        run.close()


def test_a_validation_file_may_hold_the_other_supervised_format(tmp_path, tiny_model_dir):
    validation = tmp_path / "valid.jsonl"
    rows = [{"prompt": q, "completion": " " + SECRET} for q in QUESTIONS]
    validation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = make_spec(tmp_path, tiny_model_dir, "formats").model_copy(
        update={"validation_file": validation.name, "validation_data_format": "prompt_completion"}
    )
    run = start(spec, tmp_path)
    try:
        assert len(run.valid_units) == len(QUESTIONS)
    finally:
        run.close()


def test_examples_with_nothing_to_learn_are_counted_and_none_left_fails(tmp_path, tiny_model_dir):
    spec = make_spec(tmp_path, tiny_model_dir, "short").model_copy(update={"max_length": 4})
    with pytest.raises(ValueError, match="No training example has a token to learn"):
        start(spec, tmp_path)


def test_the_newest_whole_checkpoint_is_found(tmp_path):
    from training.checkpoints import latest_checkpoint

    store = LocalStore(tmp_path)
    assert latest_checkpoint(store, "ckpt") is None
    for step in (3, 12, 9):
        folder = tmp_path / "local" / str(step)
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        store.put_folder(folder, f"ckpt/step-{step:06d}")
    store.put_bytes("ckpt/step-000015/adapter_model.safetensors", b"no manifest yet")
    assert latest_checkpoint(store, "ckpt") == "ckpt/step-000012"
