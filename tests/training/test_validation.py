import json

from training.data.validation import validate_jsonl


def lines(*rows: object) -> list[bytes]:
    return [(r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows]


ANSWER = {"role": "assistant", "content": "a"}
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_a_valid_chat_file_is_counted():
    report = validate_jsonl(lines(*[GOOD] * 12))
    assert report.ok
    assert (report.n_examples, report.data_format) == (12, "chat")


def test_each_problem_names_its_line_and_field():
    report = validate_jsonl(
        lines(
            GOOD,
            b"{not json",
            ["a list"],
            {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "q"}, {**ANSWER, "weight": 2}]},
            b"\xff\xfe bad bytes",
            {"messages": [{"role": "user", "content": "q", "colour": "red"}, ANSWER]},
        )
    )
    assert not report.ok
    by_line = {p.line: p for p in report.problems}
    assert "not valid JSON" in by_line[2].message
    assert "JSON object" in by_line[3].message
    assert by_line[4].field == "messages[0]" and "robot" in by_line[4].message
    assert "no assistant message" in by_line[5].message
    assert by_line[6].field == "messages[1].weight"
    assert "UTF-8" in by_line[7].message
    assert by_line[8].field == "messages[0].colour" and by_line[8].message == "unrecognised key"
    assert report.n_examples == 1
    assert report.summary().startswith("Invalid file: line 2")


def test_an_empty_file_is_refused():
    report = validate_jsonl([])
    assert not report.ok
    assert "no examples" in report.summary()


def test_mixed_formats_are_refused_on_the_odd_line():
    report = validate_jsonl(lines(GOOD, {"prompt": "p", "completion": "c"}))
    assert report.problems[0].line == 2
    assert "prompt_completion" in report.problems[0].message


def test_the_format_of_most_lines_wins_and_the_stray_line_is_named():
    prompt = {"prompt": "p", "completion": "c"}
    report = validate_jsonl(lines({"text": "a stray line"}, *[GOOD] * 11, prompt))
    assert report.data_format == "chat" and report.n_examples == 11
    assert [str(p) for p in report.problems] == [
        "line 1: a text example in a file of chat examples",
        "line 13: a prompt_completion example in a file of chat examples",
    ]
    # However many stray lines, the report stays bounded and counts them all.
    many = validate_jsonl(lines(*[GOOD] * 30, *[prompt] * 29))
    assert (many.n_examples, many.n_problems, len(many.problems)) == (30, 29, 20)
    # A job's method decides, whatever most lines are.
    expected = validate_jsonl(lines(*[GOOD] * 3, prompt), expected_format="prompt_completion")
    assert (expected.n_examples, expected.n_problems) == (1, 3)


def test_preference_rows_accept_the_old_key_names():
    row = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_completion": [{"role": "assistant", "content": "good"}],
        "non_preferred_completion": [{"role": "assistant", "content": "bad"}],
    }
    report = validate_jsonl(lines(row))
    assert report.ok and report.data_format == "preference"


PAIR = {
    "input": {"messages": [{"role": "user", "content": "q"}]},
    "preferred_output": [{"role": "assistant", "content": "good"}],
    "non_preferred_output": [{"role": "assistant", "content": "bad"}],
}


def test_preference_problems_name_their_line_and_field():
    report = validate_jsonl(
        lines(
            PAIR,
            {**PAIR, "preferred_output": []},
            {**PAIR, "non_preferred_output": [{"role": "user", "content": "x"}]},
            {"input": {"messages": []}, **{k: PAIR[k] for k in ("preferred_output",)}},
            {**PAIR, "preferred_output": [ANSWER, ANSWER]},
            {**PAIR, "input": {"messages": [{"role": "user", "content": 3}]}},
        )
    )
    by_line = {p.line: p for p in report.problems}
    assert report.data_format == "preference" and report.n_examples == 1
    assert by_line[2].field == "preferred_output"
    assert by_line[3].field == "non_preferred_output[0].role"
    assert {p.field for p in report.problems if p.line == 4} >= {
        "input.messages",
        "non_preferred_output",
    }
    assert by_line[5].field == "preferred_output"  # one output per side, as OpenAI
    assert by_line[6].field == "input.messages[0].content"


def test_text_rows_for_continued_pretraining():
    report = validate_jsonl(lines({"text": "a document"}, {"text": ""}, {"text": 3}))
    assert report.data_format == "text" and report.n_examples == 1
    assert [(p.line, p.field) for p in report.problems] == [(2, "text"), (3, "text")]
