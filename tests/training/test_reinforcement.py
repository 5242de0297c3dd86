"""Reinforcement fine-tuning in-process on the tiny model: GRPO's advantages and loss, the
grader as reward (a failing grader scores 0 and is counted), the reward reports, and a
run whose held-out reward rises. Ray adds only the workers around this loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_sft import make_spec, records, start, train
from training.checkpoints import checkpoint_steps
from training.data.tokenize import IGNORE_INDEX
from training.data.validation import validate_jsonl
from training.hyperparameters import ReinforcementHyperparameters as RH
from training.hyperparameters import resolve
from training.recipes.reinforcement import Rollout, group_advantages
from training.sampling import Completion
from training.storage import LocalStore
from training.token_logps import packed_logits

TARGET = "Paris"
QUESTIONS = [
    "What is the capital of France?",
    "Which city is the capital of France?",
    "Name the capital of France.",
    "France's capital city is which one?",
    "Tell me the capital of France.",
    "Where is the French government seated?",
    "What city is France's capital?",
    "The capital of France is called what?",
]
FUZZY = {
    "type": "text_similarity",
    "name": "close to the answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
}


# Rare in the tiny model's random answers at first (about 1 in 6 says "in"): a sparse
# reward that a few steps of GRPO make the rule (held-out 0 → 1 on every seed tried).
CONTAINS = {
    "type": "string_check",
    "name": "says the word",
    "input": "{{sample.output_text}}",
    "reference": "{{item.word}}",
    "operation": "ilike",
}


def prompts_jsonl(questions: list[str]) -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": q}], "answer": TARGET, "word": "in"}
        for q in questions
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def rft_spec(
    tmp_path: Path,
    model_dir: Path,
    name: str,
    grader=FUZZY,
    response_format=None,
    **hyperparameters,
):
    store = LocalStore(tmp_path)
    store.put_bytes("train.jsonl", prompts_jsonl(QUESTIONS[:6]))
    store.put_bytes("valid.jsonl", prompts_jsonl(QUESTIONS[6:]))
    hp = {
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 5e-3,
        "group_size": 6,
        "max_completion_tokens": 6,
        "eval_interval": 2,
        **hyperparameters,
    }
    return make_spec(
        tmp_path,
        model_dir,
        name,
        store=store,
        method="reinforcement",
        data_format="reinforcement",
        validation_file="valid.jsonl",
        grader=grader,
        response_format=response_format,
        hyperparameters=hp,
    )


def test_advantages_are_relative_to_the_group():
    advantages = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert sum(advantages) == pytest.approx(0.0)
    assert advantages[0] == pytest.approx(-advantages[1]) and advantages[0] > 0
    assert torch.tensor(advantages).std().item() == pytest.approx(1.0, abs=1e-3)
    # Answers that all score alike teach nothing.
    assert group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]


def test_prompt_files_validate_and_a_stray_answer_is_named():
    good = prompts_jsonl(QUESTIONS)
    assert validate_jsonl(good.splitlines(keepends=True)).data_format == "reinforcement"
    # A prompt must end with the user's turn: a chat example among prompts is the one named.
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    lines = [*good.splitlines(keepends=True), (json.dumps(chat) + "\n").encode()]
    report = validate_jsonl(lines)
    assert report.data_format == "reinforcement"
    assert [p.line for p in report.problems] == [len(QUESTIONS) + 1]


def test_reinforcement_hyperparameters_resolve_from_openai_autos():
    resolved = resolve(RH(compute_multiplier=2.0), n_examples=40, base_learning_rate=1e-3)
    assert resolved.group_size == 8  # 4 answers per prompt, times the multiplier
    steps = -(-40 // resolved.batch_size) * resolved.n_epochs
    assert resolved.eval_interval == -(-steps // 10)  # about ten validations per run
    assert resolved.eval_samples == 1 and resolved.loss_type == "dapo"
    assert resolve(RH(group_size=3, eval_interval=5), 40, 1e-3).eval_interval == 5


def test_the_loss_is_the_policy_gradient_normalised_by_answer_tokens(tiny_model_dir, tmp_path):
    run = start(rft_spec(tmp_path, tiny_model_dir, "loss"), tmp_path)
    try:
        prompt = run.train_units[0].prompt_ids
        good = Rollout([*prompt, 5, 6, 7], [IGNORE_INDEX] * len(prompt) + [5, 6, 7], advantage=1.5)
        bad = Rollout([*prompt, 8, 9], [IGNORE_INDEX] * len(prompt) + [8, 9], advantage=-0.5)
        rows = [[good, bad]]
        n_tokens = good.n_target_tokens + bad.n_target_tokens
        loss, tally = run.forward(run.model, rows, float(n_tokens))
        # ρ = 1: the loss is −Σ A over answer tokens, divided by their number.
        expected = -(1.5 * good.n_target_tokens - 0.5 * bad.n_target_tokens) / n_tokens
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert tally.n_tokens == n_tokens
        # Its gradient is the advantage-weighted gradient of the answers' log-likelihood.
        loss.backward()
        grads = [p.grad.clone() for p in run.trainable]
        run.optimizer.zero_grad()
        batch = run.batch(rows)
        logits = packed_logits(run.model, batch)
        logps = -torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            batch.labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(batch.labels)
        start_bad = len(good.input_ids)
        weighted = 1.5 * logps[0, :start_bad].sum() - 0.5 * logps[0, start_bad:].sum()
        (-weighted / n_tokens).backward()
        # (The loss projects the hidden states a chunk at a time: float32 rounding differs.)
        for ours, reference in zip(grads, (p.grad for p in run.trainable), strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    finally:
        run.close()


class ScriptedSampler:
    """Answers as scripted, to test the step's bookkeeping without sampling."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts

    def sample(self, prompt_ids, n, max_new_tokens, temperature):
        answers = []
        for i in range(n):
            text = self.texts[i % len(self.texts)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
            answers.append(Completion(ids, text, finished=len(ids) < max_new_tokens))
        return answers


def test_a_step_grades_every_answer_and_a_failing_grader_scores_zero(tiny_model_dir, tmp_path):
    bad_variable = {**FUZZY, "reference": "{{item.missing}}"}
    spec = rft_spec(tmp_path, tiny_model_dir, "step", grader=bad_variable)
    run = start(spec, tmp_path)
    run._sampler = ScriptedSampler(run.tokenizer, ["Paris", "London"])
    try:
        tally = run.train_step(run.train_units[:2])
        metrics = tally.metrics()
        assert tally.n_answers == 12 and metrics["grader_error_rate"] == 1.0
        assert metrics["reward_mean"] == 0.0 and metrics["frac_reward_zero_std"] == 1.0
        assert metrics["loss"] == 0.0  # nothing to learn from rewards all alike

        good = start(rft_spec(tmp_path / "b", tiny_model_dir, "step2"), tmp_path / "b")
        good._sampler = ScriptedSampler(good.tokenizer, ["Paris", "London"])
        metrics = good.train_step(good.train_units[:2]).metrics()
        assert metrics["grader_error_rate"] == 0.0
        assert metrics["reward_mean"] == pytest.approx((1.0 + 0.0) / 2, abs=0.25)
        assert metrics["frac_reward_zero_std"] == 0.0
        good.close()
    finally:
        run.close()


def test_a_run_raises_the_held_out_reward_and_reports_it(tiny_model_dir, tmp_path):
    spec = rft_spec(
        tmp_path, tiny_model_dir, "rises", CONTAINS, n_epochs=3, learning_rate=1e-2, group_size=8
    )
    assert train(spec, tmp_path) == "completed"
    metrics = records(spec, "metrics")
    assert all("train_reward_mean" in m for m in metrics)
    validated = [m for m in metrics if "valid_reward_mean" in m]
    last = len(metrics)  # every eval_interval steps, and at the last
    assert [m["step"] for m in validated] == sorted({*range(2, last + 1, 2), last})
    for name in ("train_completion_tokens_mean", "train_truncated_ratio", "train_loss"):
        assert name in metrics[-1]
    (start_eval,) = [e for e in records(spec, "evaluation") if e["stage"] == "start"]
    (end_eval,) = [e for e in records(spec, "evaluation") if e["stage"] == "end"]
    before = start_eval["metrics"]["full_valid_reward_mean"]
    after = end_eval["metrics"]["full_valid_reward_mean"]
    assert before <= 0.5 and after == 1.0, (before, after)
    rewards = [m["train_reward_mean"] for m in metrics]
    assert rewards[0] < 0.5 and max(rewards[-3:]) == 1.0, rewards
    assert LocalStore(tmp_path).exists(f"{spec.adapter_key}/adapter_model.safetensors")
    # A checkpoint at each validation; the three best by valid_reward_mean stay, and the
    # newest (a restart continues from it).
    written = records(spec, "checkpoint")
    assert [c["step"] for c in written] == [m["step"] for m in validated]
    reward = {c["step"]: c["metrics"]["valid_reward_mean"] for c in written}
    best = sorted(reward, key=lambda step: (-reward[step], -step))[:3]
    kept = checkpoint_steps(LocalStore(tmp_path), spec.checkpoints_key)
    assert set(kept) == {*best, last}


def test_a_multi_graders_parts_are_reported_each(tiny_model_dir, tmp_path):
    exact = {**CONTAINS, "name": "exact", "reference": "{{item.answer}}", "operation": "eq"}
    multi = {
        "type": "multi",
        "name": "exact and close",
        "graders": {"exact": exact, "close": FUZZY},
        "calculate_output": "0.5 * exact + 0.5 * close",
    }
    run = start(rft_spec(tmp_path, tiny_model_dir, "multi", grader=multi), tmp_path)
    run._sampler = ScriptedSampler(run.tokenizer, ["Paris", "London"])
    try:
        metrics = run.train_step(run.train_units[:2]).metrics()
        assert metrics["exact_reward_mean"] == 0.5  # "Paris" half the time
        assert 0.5 <= metrics["close_reward_mean"] < 1.0  # "London" is not close
        expected = 0.5 * metrics["exact_reward_mean"] + 0.5 * metrics["close_reward_mean"]
        assert metrics["reward_mean"] == pytest.approx(expected)
    finally:
        run.close()


CITY_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "London", "Rome", "Madrid"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NAMES_THE_CITY = {
    "type": "string_check",
    "name": "names the city",
    "input": "{{sample.output_json.city}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def test_a_response_format_shapes_every_sampled_answer_and_the_grader_reads_its_json(
    tiny_model_dir, tmp_path
):
    spec = rft_spec(
        tmp_path,
        tiny_model_dir,
        "shaped",
        NAMES_THE_CITY,
        response_format=CITY_SCHEMA,
        max_completion_tokens=24,
        n_epochs=3,
        learning_rate=1e-2,
        group_size=8,
    )
    run = start(spec, tmp_path)
    try:
        # The random-weights model, left to itself, never writes JSON; shaped, always.
        answers = run.sampler.sample(run.train_units[0].prompt_ids, 8, 24, 1.0)
        for answer in answers:
            assert answer.finished, answer
            assert json.loads(answer.text)["city"] in {"Paris", "London", "Rome", "Madrid"}
    finally:
        run.close()
    assert train(spec, tmp_path) == "completed"
    metrics = records(spec, "metrics")
    assert all(m["train_grader_error_rate"] == 0.0 for m in metrics)  # every answer parsed
    (start_eval,) = [e for e in records(spec, "evaluation") if e["stage"] == "start"]
    (end_eval,) = [e for e in records(spec, "evaluation") if e["stage"] == "end"]
    before = start_eval["metrics"]["full_valid_reward_mean"]
    after = end_eval["metrics"]["full_valid_reward_mean"]
    assert after == 1.0 and before < after, (before, after)  # it learnt to say Paris


def test_a_schema_the_grammar_cannot_express_fails_the_job_naming_the_field(
    tiny_model_dir, tmp_path
):
    unknown_type = {**CITY_SCHEMA, "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    spec = rft_spec(tmp_path, tiny_model_dir, "unshaped", response_format=unknown_type)
    run = start(spec, tmp_path)
    try:
        with pytest.raises(ValueError, match=r"response_format\.json_schema\.schema"):
            run.sampler  # noqa: B018 (compiled when first asked for)
    finally:
        run.close()
