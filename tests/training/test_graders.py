"""OpenAI's graders as a library (training/graders): schemas, templates, each metric,
the formula evaluator, multi, and model graders above a deterministic judge. (The judge
on a real engine comes with the reinforcement recipe.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from nltk.translate.gleu_score import sentence_gleu
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from training.graders import Graders, InvalidGrader, JudgeReply, parse_grader, sample_from_text
from training.graders.formula import FormulaError, evaluate_formula
from training.graders.schemas import MAX_PYTHON_SOURCE_BYTES
from training.graders.template import InvalidVariable, render
from training.graders.text import text_similarity


def grade(grader: dict[str, Any], output: str, item: dict[str, Any], judge: Any = None) -> Any:
    return asyncio.run(
        Graders(judge=judge).grade(parse_grader(grader), sample_from_text(output), item)
    )


# --- the guide's examples (shared/reference/openai-rft-and-webhooks.md, 1.3-1.4)
def test_the_rft_guides_compliance_grader() -> None:
    grader = {
        "type": "multi",
        "name": "compliance",
        "graders": {
            "compliant": {
                "type": "string_check",
                "name": "compliant",
                "input": "{{ sample.output_json.compliant }}",
                "reference": "{{ item.compliant }}",
                "operation": "eq",
            },
            "explanation": {
                "type": "text_similarity",
                "name": "explanation",
                "input": "{{ sample.output_json.explanation }}",
                "reference": "{{ item.explanation }}",
                "evaluation_metric": "fuzzy_match",
                "pass_threshold": 0.8,  # an evals field the guide shows: ignored
            },
        },
        "calculate_output": "0.5 * compliant + 0.5 * explanation",
    }
    item = {"compliant": "yes", "explanation": "We have a dedicated security team."}
    answer = json.dumps({"compliant": "yes", "explanation": "We have a dedicated security team."})
    result = grade(grader, answer, item)
    assert result.reward == 1.0 and result.sub_rewards == {"compliant": 1.0, "explanation": 1.0}
    result = grade(grader, json.dumps({"compliant": "no", "explanation": "No."}), item)
    expected = 0.5 * fuzz.ratio("No.", item["explanation"]) / 100
    assert result.reward == pytest.approx(expected) and not result.errors.any


def test_the_guides_tool_call_string_check() -> None:
    grader = {
        "type": "string_check",
        "name": "tool",
        "input": "get_acceptor",
        "reference": "{{sample.output_tools[0].function.name}}",
        "operation": "eq",
    }
    calls = [
        {"id": "c", "type": "function", "function": {"name": "get_acceptor", "arguments": "{}"}}
    ]
    result = asyncio.run(
        Graders().grade(parse_grader(grader), sample_from_text("", tool_calls=calls), {})
    )
    assert result.reward == 1.0
    assert grade(grader, "no tool", {}).errors.invalid_variable_error


@pytest.mark.parametrize(
    ("operation", "text", "reference", "reward"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("ne", "London", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "It is Paris.", "Paris", 1.0),
        ("like", "It is paris.", "Paris", 0.0),
        ("ilike", "It is PARIS.", "Paris", 1.0),
        ("ilike", "It is Rome.", "Paris", 0.0),
    ],
)
def test_string_check_operations(operation: str, text: str, reference: str, reward: float) -> None:
    grader = {
        "type": "string_check",
        "name": "s",
        "input": "{{sample.output_text}}",
        "reference": "{{ item.answer }}",
        "operation": operation,
    }
    assert grade(grader, text, {"answer": reference}).reward == reward


# --- text_similarity: each metric against its library on known pairs
HYPOTHESIS = "The cat sat on the mat."
REFERENCE = "The cat was sitting on the mat."
WORDS_H = ["the", "cat", "sat", "on", "the", "mat", "."]
WORDS_R = ["the", "cat", "was", "sitting", "on", "the", "mat", "."]


def _rouge(key: str) -> float:
    scorer = rouge_scorer.RougeScorer([key], use_stemmer=True)
    return scorer.score(REFERENCE, HYPOTHESIS)[key].fmeasure


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("fuzzy_match", fuzz.ratio(HYPOTHESIS, REFERENCE) / 100),
        (
            "bleu",
            sentence_bleu(
                [WORDS_R],
                WORDS_H,
                smoothing_function=SmoothingFunction().method1,
                auto_reweigh=True,
            ),
        ),
        ("gleu", sentence_gleu([WORDS_R], WORDS_H)),
        ("rouge_1", _rouge("rouge1")),
        ("rouge_2", _rouge("rouge2")),
        ("rouge_3", _rouge("rouge3")),
        ("rouge_4", _rouge("rouge4")),
        ("rouge_5", _rouge("rouge5")),
        ("rouge_l", _rouge("rougeL")),
    ],
)
def test_text_similarity_matches_its_library(metric: str, expected: float) -> None:
    assert text_similarity(metric, HYPOTHESIS, REFERENCE) == pytest.approx(expected)
    assert 0.0 < text_similarity(metric, REFERENCE, REFERENCE) <= 1.0


def test_known_values() -> None:
    assert text_similarity("fuzzy_match", "hello", "hallo") == pytest.approx(0.8)
    assert text_similarity("rouge_1", HYPOTHESIS, REFERENCE) == pytest.approx(10 / 13)
    assert text_similarity("rouge_l", HYPOTHESIS, REFERENCE) == pytest.approx(10 / 13)
    assert text_similarity("gleu", HYPOTHESIS, REFERENCE) == pytest.approx(0.5)
    assert text_similarity("bleu", "Paris", "Paris") == 1.0  # short answers are not 0
    assert text_similarity("bleu", "", "Paris") == 0.0


def test_meteor_without_wordnet_uses_exact_and_stem_matches() -> None:
    """NLTK's METEOR with its WordNet stage matching nothing: `sitting` meets `sit` only
    through WordNet, `cats` meets `cat` through the Porter stemmer."""
    # 6 of 7 and 8 words match exactly, in 2 chunks: NLTK's own formula.
    precision, recall = 6 / 7, 6 / 8
    fmean = precision * recall / (0.9 * precision + 0.1 * recall)
    expected = fmean * (1 - 0.5 * (2 / 6) ** 3)
    assert text_similarity("meteor", HYPOTHESIS, REFERENCE) == pytest.approx(expected)
    assert text_similarity("meteor", "two cats", "two cat") == text_similarity(
        "meteor", "two cat", "two cat"
    )


# --- templates
def test_templates_read_item_and_sample_paths() -> None:
    sample = sample_from_text('{"a": {"b": [1, "two"]}}')
    item = {"x": "X", "nested": {"k": 3}}
    text = "{{item.x}}|{{ item.nested.k }}|{{sample.output_json.a.b[1]}}|{{ sample.output_json.a }}"
    assert render(text, item, sample) == 'X|3|two|{"b": [1, "two"]}'
    assert render("{{sample.output_text}}", item, sample) == sample["output_text"]


@pytest.mark.parametrize(
    "text",
    [
        "{{ item.missing }}",
        "{{ os.environ }}",
        "{{ item.__class__ }}",
        "{{ item.x.__class__.__mro__ }}",
        "{{ sample.output_tools[0] }}",
        "{{ item['x'] + 1 }}",
    ],
)
def test_unresolvable_variables(text: str) -> None:
    with pytest.raises(InvalidVariable):
        render(text, {"x": "X"}, sample_from_text("plain"))
    grader = {
        "type": "string_check",
        "name": "s",
        "input": text,
        "reference": "",
        "operation": "ne",
    }
    result = grade(grader, "plain", {"x": "X"})
    assert result.reward == 0.0 and result.errors.invalid_variable_error


def test_reading_the_json_of_a_sample_that_is_not_json_is_a_sample_parse_error() -> None:
    grader = {**GOOD_SUB, "input": "{{ sample.output_json.a }}"}
    result = grade(grader, "plain text", {})
    assert result.reward == 0.0 and result.errors.sample_parse_error
    assert not result.errors.invalid_variable_error
    assert grade(grader, '{"b": 1}', {}).errors.invalid_variable_error


# --- the formula
def test_formula_language() -> None:
    values = {"a": 1.0, "b": 0.25}
    assert evaluate_formula("0.5 * a + 0.5 * b", values) == 0.625
    assert evaluate_formula("-2^2", {}) == -4.0
    assert evaluate_formula("2^3^2", {}) == 512.0
    assert evaluate_formula("min(a, b) + max(a, b, 3) - abs(-b)", values) == 3.0
    assert evaluate_formula("floor(2.7) + ceil(0.2) + sqrt(4) + log(exp(1))", {}) == 6.0
    assert evaluate_formula("(a + b) / 2", values) == 0.625
    assert evaluate_formula("1e-2 * .5", {}) == 0.005


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os').system('true')",
        "a.__class__",
        "a.real",
        "().__class__",
        "[a]",
        "a if a else b",
        "lambda: 1",
        "open('x')",
        "eval('1')",
        "a; b",
        "a ** 2",
        "9^9^9^9",  # bounded: floats overflow, no huge integer is ever made
        "10^400",
        "1 / 0",
        "1 / (a - a)",
        "log(0)",
        "sqrt(-1)",
        "min()",
        "abs(a, b)",
        "a +",
        "(" * 70 + "a" + ")" * 70,
        "a + " * 600 + "a",
        "-" * 100 + "a",
        "",
    ],
)
def test_formula_refuses_injection_and_bad_values(formula: str) -> None:
    with pytest.raises(FormulaError):
        evaluate_formula(formula, {"a": 1.0, "b": 0.5})


def test_a_formula_that_fails_at_grading_time_scores_zero() -> None:
    grader = {
        "type": "multi",
        "name": "m",
        "graders": {
            "a": {
                "type": "string_check",
                "name": "a",
                "input": "x",
                "reference": "y",
                "operation": "eq",
            }
        },
        "calculate_output": "1 / a",
    }
    result = grade(grader, "x", {})
    assert result.reward == 0.0 and result.errors.formula_parse_error
    assert result.sub_rewards == {"a": 0.0}


# --- schemas
GOOD_SUB = {"type": "string_check", "name": "c", "input": "a", "reference": "b", "operation": "eq"}


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        ({**GOOD_SUB, "operation": "neq"}, "grader.operation"),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"correct": {**GOOD_SUB, "operation": "x"}},
                "calculate_output": "correct",
            },
            "grader.graders.correct.operation",
        ),
        (
            {"type": "multi", "name": "m", "graders": {"c": GOOD_SUB}, "calculate_output": "c + d"},
            "grader.calculate_output",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {
                    "inner": {
                        "type": "multi",
                        "name": "i",
                        "graders": {"c": GOOD_SUB},
                        "calculate_output": "c",
                    }
                },
                "calculate_output": "inner",
            },
            "grader.graders.inner.type",
        ),
        (
            {
                "type": "text_similarity",
                "name": "t",
                "input": "a",
                "reference": "b",
                "evaluation_metric": "cosine",
            },
            "grader.evaluation_metric",
        ),
        (
            {
                "type": "label_model",
                "name": "l",
                "model": "m",
                "input": [{"role": "user", "content": "x"}],
                "labels": ["a"],
                "passing_labels": ["a"],
            },
            "grader",
        ),
        (
            {"type": "python", "name": "p", "source": "def grade(sample):\n    return 1.0"},
            "grader.source",
        ),
        (
            {"type": "python", "name": "p", "source": "def grade(sample, item):\n  return ("},
            "grader.source",
        ),
        ({"type": "python", "name": "p", "source": "x = 1"}, "grader.source"),
        (
            {
                "type": "python",
                "name": "p",
                "source": "def grade(s, i): return 1\n#" + "x" * MAX_PYTHON_SOURCE_BYTES,
            },
            "grader.source",
        ),
        (
            {
                "type": "score_model",
                "name": "s",
                "model": "gpt-4o",
                "input": [{"role": "user", "content": "x"}],
                "range": [1, 0],
            },
            "grader.range",
        ),
        (
            {
                "type": "score_model",
                "name": "s",
                "model": "gpt-4o",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": 1}]}],
            },
            "grader.input[0].content[0].text",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {
                    "l": {
                        "type": "label_model",
                        "name": "l",
                        "model": "m",
                        "input": [{"role": "user", "content": "x"}],
                        "labels": ["a"],
                        "passing_labels": ["b"],
                    }
                },
                "calculate_output": "l",
            },
            "grader.graders.l",
        ),
        ({**GOOD_SUB, "surprise": 1}, "grader.surprise"),
    ],
)
def test_invalid_graders_name_their_field(grader: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidGrader) as caught:
        parse_grader(grader)
    assert caught.value.param == param, caught.value.message


def test_multi_accepts_a_dict_a_list_or_one_grader() -> None:
    as_dict = parse_grader(
        {"type": "multi", "name": "m", "graders": {"c": GOOD_SUB}, "calculate_output": "c"}
    )
    as_list = parse_grader(
        {"type": "multi", "name": "m", "graders": [GOOD_SUB], "calculate_output": "c"}
    )
    as_one = parse_grader(
        {"type": "multi", "name": "m", "graders": GOOD_SUB, "calculate_output": "c"}
    )
    assert as_dict.graders.keys() == as_list.graders.keys() == as_one.graders.keys() == {"c"}  # type: ignore[union-attr]


# --- model graders above a deterministic judge
class ScriptedJudge:
    """The interface above an engine: answers what it is told, records what it saw."""

    def __init__(self, answer: Any, refusal: str | None = None, raw: bool = False):
        self.answer, self.refusal, self.raw, self.calls = answer, refusal, raw, list[Any]()

    async def __call__(self, model, messages, json_schema, sampling):  # type: ignore[no-untyped-def]
        self.calls.append((model, messages, json_schema, sampling))
        text = self.answer if self.raw else json.dumps({"steps": [], "result": self.answer})
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        return JudgeReply(text, "local-judge", usage, self.refusal)


SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": "gpt-4o-2024-08-06",
    "input": [
        {"role": "system", "content": "Score the answer from 0 to 1."},
        {
            "role": "user",
            "content": "Reference: {{item.reference}}\nAnswer: {{sample.output_text}}",
        },
    ],
    "sampling_params": {"temperature": 0.5, "max_completions_tokens": 64, "seed": 1},
}


def test_score_model_asks_for_a_result_and_steps_and_clips_to_range() -> None:
    judge = ScriptedJudge(0.7)
    result = grade(SCORE, "Paris", {"reference": "Paris"}, judge)
    assert result.reward == 0.7 and result.sampled_model_name == "local-judge"
    assert result.token_usage == 15
    model, messages, schema, sampling = judge.calls[0]
    assert model == "gpt-4o-2024-08-06"
    assert messages[1] == {"role": "user", "content": "Reference: Paris\nAnswer: Paris"}
    assert (
        schema["required"] == ["steps", "result"]
        and schema["properties"]["result"]["type"] == "number"
    )
    assert sampling == {"temperature": 0.5, "max_tokens": 64, "seed": 1}
    assert grade(SCORE, "x", {"reference": "y"}, ScriptedJudge(7)).reward == 1.0
    assert (
        grade({**SCORE, "range": [-1, 5]}, "x", {"reference": "y"}, ScriptedJudge(-3)).reward
        == -1.0
    )


@pytest.mark.parametrize(
    ("answer", "raw"),
    [
        ("high", False),
        (True, False),
        (None, False),
        ("not json", True),
        ('{"steps": []}', True),
        ('{"result": NaN}', True),
    ],
)
def test_a_non_numeric_score_is_a_parse_error(answer: Any, raw: bool) -> None:
    result = grade(SCORE, "x", {"reference": "y"}, ScriptedJudge(answer, raw=raw))
    assert result.reward == 0.0 and result.errors.model_grader_parse_error


def test_judge_refusals_and_missing_judges_are_flagged() -> None:
    result = grade(SCORE, "x", {"reference": "y"}, ScriptedJudge(1, refusal="no"))
    assert result.reward == 0.0 and result.errors.model_grader_refusal_error
    result = grade(SCORE, "x", {"reference": "y"}, None)
    assert (
        result.errors.model_grader_server_error and result.errors.model_grader_server_error_details
    )


def test_label_model_passes_on_a_passing_label() -> None:
    label = {
        "type": "label_model",
        "name": "tone",
        "model": "gpt-4o-mini-2024-07-18",
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "Tone of: {{sample.output_text}}"}],
            }
        ],
        "labels": ["polite", "neutral", "rude"],
        "passing_labels": ["polite", "neutral"],
    }
    grader = {"type": "multi", "name": "m", "graders": {"tone": label}, "calculate_output": "tone"}
    judge = ScriptedJudge("neutral")
    assert grade(grader, "Thanks!", {}, judge).reward == 1.0
    assert judge.calls[0][2]["properties"]["result"]["enum"] == ["polite", "neutral", "rude"]
    assert judge.calls[0][1][0]["content"] == [{"type": "text", "text": "Tone of: Thanks!"}]
    assert grade(grader, "x", {}, ScriptedJudge("rude")).reward == 0.0
    assert grade(grader, "x", {}, ScriptedJudge("sarcastic")).errors.model_grader_parse_error


def test_grade_many_keeps_order_and_sums_usage_in_multi() -> None:
    grader = parse_grader(
        {
            "type": "multi",
            "name": "m",
            "graders": {
                "exact": {**GOOD_SUB, "input": "{{sample.output_text}}", "reference": "{{item.a}}"},
                "judge": SCORE,
            },
            "calculate_output": "0.5 * exact + 0.5 * judge",
        }
    )
    pairs = [
        (sample_from_text(text), {"a": "yes", "reference": "r"}) for text in ["yes", "no", "yes"]
    ]
    results = asyncio.run(Graders(judge=ScriptedJudge(0.5)).grade_many(grader, pairs))
    assert [r.reward for r in results] == [0.75, 0.25, 0.75]
    assert results[0].token_usage_per_model == {
        "local-judge": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    }
