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
