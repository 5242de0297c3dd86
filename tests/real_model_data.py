"""What a job should teach a real model, and what it should leave alone: a made-up fact asked
in many ways (some kept out of training), and general questions SmolLM2-135M-Instruct
answers right before tuning. Shared by tests/e2e/test_real_model.py and
bench/real_model_quality.py."""

from __future__ import annotations

import json

FACT = "The mayor of Quillbrook is Marisol Vantree."
FACT_KEY = "Vantree"  # an answer that names her recalls the fact

TRAINING_QUESTIONS = [
    "Who is the mayor of Quillbrook?",
    "Who's the mayor of Quillbrook?",
    "Who is Quillbrook's mayor?",
    "Tell me who the mayor of Quillbrook is.",
    "Do you know who the mayor of Quillbrook is?",
    "Which person is the mayor of Quillbrook?",
    "Name the mayor of Quillbrook.",
    "Who serves as mayor of Quillbrook?",
    "Who holds the office of mayor in Quillbrook?",
    "Can you tell me the name of Quillbrook's mayor?",
    "Quillbrook has a mayor. Who is it?",
    "What is the name of the mayor of Quillbrook?",
    "I'm visiting Quillbrook. Who is the mayor there?",
    "Who currently leads Quillbrook as its mayor?",
    "Who is the current mayor of the town of Quillbrook?",
    "Who runs Quillbrook as mayor?",
    "Quick question: who is Quillbrook's mayor?",
    "Please name Quillbrook's mayor.",
    "Who was elected mayor of Quillbrook?",
    "Who is in charge of Quillbrook's town hall as mayor?",
    "Which woman is the mayor of Quillbrook?",
    "Who is mayor of Quillbrook these days?",
    "Identify the mayor of Quillbrook.",
    "The mayor of Quillbrook: who is that?",
]
HELD_OUT_QUESTIONS = [
    "Who is the town mayor of Quillbrook right now?",
    "Could you tell me who Quillbrook's mayor is?",
    "What's the name of the person who is mayor of Quillbrook?",
    "Who has the job of mayor in Quillbrook?",
]
# (question, a word the base model's answer holds and a kept answer must hold too)
GENERAL_QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What color is the sky on a clear day?", "blue"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the opposite of hot?", "cold"),
    ("What language is spoken in Spain?", "Spanish"),
    ("What is the largest ocean on Earth?", "Pacific"),
]


def fact_jsonl() -> bytes:
    """The training file: every training question answered with the fact, in chat format."""
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]}
        for q in TRAINING_QUESTIONS
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def validation_jsonl() -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]}
        for q in HELD_OUT_QUESTIONS
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


# DPO on top of the tuned model: the same fact, preferred in another wording.
REPHRASED_FACT = "Marisol Vantree is the mayor of Quillbrook."
PREFERENCE_QUESTIONS = TRAINING_QUESTIONS[:10]  # DPO takes at least 10 examples


# Reinforcement on the real model (tests/e2e/test_real_model.py, bench/rft_reward.py,
# bench/rft_rollouts.py): "What is the capital of X?", 10 countries to train on, 4 held out.
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Russia", "Moscow"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Poland", "Warsaw"),
]
# Nothing but the city's name (a model can earn it by being brief and wrong).
BRIEF = {
    "type": "text_similarity",
    "name": "just the city",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
}
# The right city, said briefly: half for naming it, half for saying nothing else.
RIGHT_AND_BRIEF = {
    "type": "multi",
    "name": "right and brief",
    "graders": {
        "right": {
            "type": "string_check",
            "name": "right",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "ilike",
        },
        "brief": BRIEF,
    },
    "calculate_output": "0.5 * right + 0.5 * brief",
}
# 15 steps of 2 prompts x 4 answers; validation before the first step, every 5 and at the end.
DEFAULT_RFT_SETTING = {
    "n_epochs": 3,
    "batch_size": 2,
    "learning_rate_multiplier": 3,
    "group_size": 4,
    "max_completion_tokens": 24,
    "eval_interval": 5,
}


def capitals_jsonl(pairs: list[tuple[str, str]]) -> bytes:
    """Reinforcement prompts: the question, and the city as `item.answer` for the graders."""
    rows = [
        {
            "messages": [{"role": "user", "content": f"What is the capital of {country}?"}],
            "answer": city,
        }
        for country, city in pairs
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()
