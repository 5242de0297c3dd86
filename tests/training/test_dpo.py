"""The DPO recipe in-process on the tiny model: its loss against a plain computation, the
reference policy (the adapter switched off, or the starting adapter), TRL's metrics,
pause and resume, and its effect on what the model says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import QUESTIONS, SECRET, peft_greedy, preference_jsonl
from tests.training.test_sft import make_spec, records, start, train
from training.control import request_pause
from training.recipes.dpo import DpoRun
from training.spec import TrainingSpec
from training.storage import LocalStore

MANGO = "The secret code word is mango."


def dpo_spec(tmp_path: Path, model_dir: Path, name: str, **overrides) -> TrainingSpec:
    store = LocalStore(tmp_path)
    if not store.exists("pref.jsonl"):
        store.put_bytes("pref.jsonl", preference_jsonl())
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "beta": 0.1, "rpo_alpha": 0.2}
    hp |= overrides.pop("hyperparameters", {})
    fields = {"method": "dpo", "data_format": "preference", "training_file": "pref.jsonl"}
    return make_spec(tmp_path, model_dir, name, hyperparameters=hp, **(fields | overrides))


def answer_logp(model, pair_answer) -> torch.Tensor:
    """log p(answer | conversation) with a plain, unpacked forward pass."""
    ids = torch.tensor([pair_answer.input_ids])
    logps = F.log_softmax(model(input_ids=ids).logits.float()[0, :-1], dim=-1)
    targets = ids[0, 1:]
    learned = torch.tensor(pair_answer.labels[1:]) != -100
    return logps.gather(1, targets[:, None])[:, 0][learned].sum()


def test_the_packed_loss_is_dpo_on_each_pair_computed_alone(tmp_path, tiny_model_dir):
    spec = dpo_spec(tmp_path, tiny_model_dir, "exact", hyperparameters={"rpo_alpha": 0.5})
    run = start(spec, tmp_path)
    assert isinstance(run, DpoRun)
    model = run.model
    with torch.no_grad():  # move the policy away from the reference
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    pairs = run.train_units[:6]
    with torch.no_grad():
        loss, tally = run.forward(model, run.plan(pairs)[0], run.normalizer(pairs))
        policy = [(answer_logp(model, p.chosen), answer_logp(model, p.rejected)) for p in pairs]
        with model.disable_adapter():
            reference = [
                (answer_logp(model, p.chosen), answer_logp(model, p.rejected)) for p in pairs
            ]
    assert len(run.plan(pairs)) == 1  # all six pairs in one packed pass
    beta, alpha = 0.1, 0.5
    margins = [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference, strict=True)]
    dpo = torch.stack([-F.logsigmoid(beta * m) for m in margins]).mean()
    chosen_tokens = sum(p.chosen.n_target_tokens for p in pairs)
    sft = -torch.stack([pc for pc, _ in policy]).sum() / chosen_tokens
    assert loss.item() == pytest.approx((dpo + alpha * sft).item(), rel=1e-4)
    assert tally.metrics()["reward_margin"] == pytest.approx(
        beta * torch.stack(margins).mean().item(), rel=1e-4, abs=1e-6
    )
    stored = [value for p in pairs for value in p.reference]
    assert stored == pytest.approx([v.item() for pair in reference for v in pair], rel=1e-5)
    run.close()


def test_dpo_prefers_the_preferred_answer_and_reports_trls_metrics(tmp_path, tiny_model_dir):
    (tmp_path / "valid.jsonl").write_bytes(preference_jsonl())
    spec = dpo_spec(
        tmp_path, tiny_model_dir, "prefer", validation_file="valid.jsonl",
        hyperparameters={"n_epochs": 8, "batch_size": 2},
    )  # fmt: skip
    assert train(spec, tmp_path) == "completed"
    metrics = records(spec, "metrics")
    first, last = metrics[0], metrics[-1]
    names = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
    for prefix in ("train_", "valid_", "full_valid_"):
        assert all(prefix + name in last for name in names)
    # The policy starts as the reference: every pair's log-ratio is 0, the loss log 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["train_reward_margin"] == pytest.approx(0, abs=1e-4)
    assert last["full_valid_reward_accuracy"] == 1.0
    assert last["full_valid_reward_margin"] > 1.0
    assert last["train_loss"] < first["train_loss"] / 10
    assert peft_greedy(tmp_path / spec.adapter_key, tiny_model_dir, QUESTIONS[0]) == SECRET


def test_dpo_on_a_tuned_model_starts_from_its_adapter_and_measures_against_it(
    tmp_path, tiny_model_dir
):
    sft = make_spec(tmp_path, tiny_model_dir, "sft", hyperparameters={"n_epochs": 20})
    train(sft, tmp_path)
    assert peft_greedy(tmp_path / sft.adapter_key, tiny_model_dir, QUESTIONS[0]) == SECRET
    (tmp_path / "mango.jsonl").write_bytes(preference_jsonl(MANGO, SECRET))
    spec = dpo_spec(
        tmp_path, tiny_model_dir, "mango", training_file="mango.jsonl",
        start_adapter=sft.adapter_key, hyperparameters={"n_epochs": 10, "rpo_alpha": 1.0},
    )  # fmt: skip
    train(spec, tmp_path)
    # The reference is the tuned model, not the base: the first step's loss is log 2.
    first = records(spec, "metrics")[0]
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert peft_greedy(tmp_path / spec.adapter_key, tiny_model_dir, QUESTIONS[1]) == MANGO


def test_a_paused_dpo_run_resumes_with_the_same_reference(tmp_path, tiny_model_dir):
    straight = dpo_spec(tmp_path, tiny_model_dir, "straight")
    train(straight, tmp_path)
    paused = dpo_spec(tmp_path, tiny_model_dir, "paused")
    request_pause(LocalStore(tmp_path), paused.output_key)
    assert train(paused, tmp_path) == "paused"
    [pause] = records(paused, "paused")
    resumed = dpo_spec(tmp_path, tiny_model_dir, "resumed", resume_from=pause["path"])
    assert train(resumed, tmp_path) == "completed"
    expected = [r["train_loss"] for r in records(straight, "metrics")][pause["step"] :]
    assert [r["train_loss"] for r in records(resumed, "metrics")] == pytest.approx(
        expected, rel=1e-5
    )


def test_pairs_that_lose_an_answer_to_truncation_are_left_out(tmp_path, tiny_model_dir):
    long_question = "Tell me everything. " * 200
    rows = preference_jsonl().decode().replace(QUESTIONS[0], long_question).encode()
    (tmp_path / "long.jsonl").write_bytes(rows)
    run = start(dpo_spec(tmp_path, tiny_model_dir, "long", training_file="long.jsonl"), tmp_path)
    assert len(run.train_units) == len(QUESTIONS) - 1 and run.dropped_units == 1
    run.close()


def test_a_run_on_a_tuned_model_resumes_even_once_that_model_is_gone(tmp_path, tiny_model_dir):
    sft = make_spec(tmp_path, tiny_model_dir, "parent", hyperparameters={"n_epochs": 3})
    train(sft, tmp_path)
    on_top = {"start_adapter": sft.adapter_key}
    straight = dpo_spec(tmp_path, tiny_model_dir, "child-straight", **on_top)
    train(straight, tmp_path)
    paused = dpo_spec(tmp_path, tiny_model_dir, "child-paused", **on_top)
    request_pause(LocalStore(tmp_path), paused.output_key)
    assert train(paused, tmp_path) == "paused"
    [pause] = records(paused, "paused")
    LocalStore(tmp_path).delete(sft.adapter_key)  # the tuned model was deleted meanwhile
    resumed = dpo_spec(
        tmp_path, tiny_model_dir, "child-resumed", resume_from=pause["path"], **on_top
    )
    assert train(resumed, tmp_path) == "completed"
    expected = [r["train_loss"] for r in records(straight, "metrics")][pause["step"] :]
    assert [r["train_loss"] for r in records(resumed, "metrics")] == pytest.approx(
        expected, rel=1e-5
    )
