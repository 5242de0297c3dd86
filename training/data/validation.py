"""Streaming validation of a JSONL training file: every problem names its line and field.

The file is read line by line, so memory stays bounded whatever its size. It runs when a
file is uploaded; a job then checks the format found against its method's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from training.data.schema import EXAMPLE_MODELS, DataFormat, detect_format

MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class LineProblem:
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field `{self.field}`" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class ValidationReport:
    n_examples: int = 0
    data_format: DataFormat | None = None
    problems: list[LineProblem] = field(default_factory=list)
    n_problems: int = 0

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and self.n_examples > 0

    def summary(self) -> str:
        """One human sentence, used as a file's `status_details` and in job errors."""
        if self.n_problems:
            first = "; ".join(str(p) for p in self.problems[:3])
            more = f" (and {self.n_problems - 3} more)" if self.n_problems > 3 else ""
            return f"Invalid file: {first}{more}"
        if self.n_examples == 0:
            return "Invalid file: it holds no examples"
        return f"{self.n_examples} {self.data_format} examples"

    def add(self, problem: LineProblem) -> None:
        self.n_problems += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)


ROLE_TAGS = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# pydantic names the branch of a union it tried (`str`, `list[TextPart]`, `literal['auto']`,
# `constrained-int`, a model's class name): not a field. (The API's errors use it too.)
UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\]|constrained-\w+|[A-Z]\w*)$")
CONTENT_SHAPE = 'must be a string or a list of text parts ({"type": "text", "text": "..."})'


def _field_path(location: Iterable[Any]) -> tuple[str | None, bool]:
    """The field as the user wrote it, and whether pydantic was inside a content union."""
    parts = list(location)
    path, in_content_union = "", False
    for index, part in enumerate(parts):
        previous = parts[index - 1] if index else None
        if isinstance(part, int):
            path += f"[{part}]"
        elif not path:
            path = str(part)
        elif (
            part in ROLE_TAGS
            and isinstance(previous, int)
            and index >= 2
            and parts[index - 2] == "messages"
        ):
            continue  # the role tag pydantic adds after messages[i]
        elif isinstance(part, str) and UNION_BRANCH.match(part):
            if previous == "content":
                in_content_union = True
                break
            continue
        else:
            path += f".{part}"
    return path or None, in_content_union


def _pydantic_problems(line: int, error: ValidationError) -> Iterator[LineProblem]:
    reported: set[str | None] = set()
    for item in error.errors():
        field, in_content_union = _field_path(item["loc"])
        message = item["msg"]
        if in_content_union:
            message = CONTENT_SHAPE
        elif item["type"] == "extra_forbidden":
            message = "unrecognised key"
        elif item["type"] == "missing":
            message = "required, but missing"
        elif item["type"] == "union_tag_invalid":
            message = (
                f"unknown role {item['input'].get('role')!r}"
                if isinstance(item["input"], dict)
                else "unknown role"
            )
        elif item["type"] == "union_tag_not_found":
            message = "message has no `role`"
        if in_content_union and field in reported:
            continue  # one problem per content, not one per union branch
        reported.add(field)
        yield LineProblem(line, field, message.removeprefix("Value error, "))


def iter_rows(lines: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any] | LineProblem]]:
    """(line number, row or problem) for every non-blank line."""
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield number, LineProblem(number, None, f"not valid UTF-8 ({error.reason})")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            yield number, LineProblem(number, None, f"not valid JSON ({error.msg})")
            continue
        if not isinstance(row, dict):
            yield number, LineProblem(number, None, "each line must be a JSON object")
            continue
        yield number, row


def parse_example(row: dict[str, Any], data_format: DataFormat) -> BaseModel:
    return EXAMPLE_MODELS[data_format].model_validate(row)


# Bounds the memory of the line reader: one JSONL line may not exceed this.
MAX_LINE_BYTES = 64 * 1024 * 1024


def bounded_lines(stream: BinaryIO) -> Iterator[bytes]:
    """Lines of a binary stream, each bounded so one huge line cannot exhaust memory (a
    longer line arrives in pieces, each reported as not JSON)."""
    while line := stream.readline(MAX_LINE_BYTES):
        yield line


@dataclass
class _Lines:
    """One format's lines in a file: how many, the first few line numbers, and what
    checking them as that format found."""

    count: int = 0
    first_numbers: list[int] = field(default_factory=list)
    report: ValidationReport = field(default_factory=ValidationReport)

    def add(self, number: int) -> None:
        self.count += 1
        if len(self.first_numbers) < MAX_REPORTED_PROBLEMS:
            self.first_numbers.append(number)


def validate_jsonl(
    stream: BinaryIO | Iterable[bytes], expected_format: DataFormat | None = None
) -> ValidationReport:
    """Check every line. The file's format is the expected one, or else that of most of
    its lines, so that one stray line is the line reported (not every other line)."""
    unreadable = ValidationReport()
    by_format: dict[DataFormat, _Lines] = {}
    for number, row in iter_rows(stream):
        if isinstance(row, LineProblem):
            unreadable.add(row)
            continue
        row_format = detect_format(row)
        lines = by_format.setdefault(row_format, _Lines())
        lines.add(number)
        try:
            parse_example(row, row_format)
        except ValidationError as error:
            for problem in _pydantic_problems(number, error):
                lines.report.add(problem)
            continue
        lines.report.n_examples += 1
    counts = [(lines.count, line_format) for line_format, lines in by_format.items()]
    most = max(counts, key=lambda pair: pair[0], default=(0, None))[1]  # ties: seen first
    data_format = expected_format or most
    report = ValidationReport(data_format=data_format)
    found = [unreadable]
    for line_format, lines in by_format.items():
        if line_format == data_format:
            found.append(lines.report)
            report.n_examples = lines.report.n_examples
            continue
        stray = ValidationReport(n_problems=lines.count)
        message = f"a {line_format} example in a file of {data_format} examples"
        if (line_format, data_format) == ("reinforcement", "chat"):  # an answer forgotten
            message = (
                "the example has no assistant message to learn from (a conversation "
                "ending with the user's turn is a reinforcement prompt)"
            )
        stray.problems = [LineProblem(n, None, message) for n in lines.first_numbers]
        found.append(stray)
    report.n_problems = sum(part.n_problems for part in found)
    first = sorted((p for part in found for p in part.problems), key=lambda p: p.line)
    report.problems = first[:MAX_REPORTED_PROBLEMS]
    return report


def read_examples(path: str, data_format: DataFormat) -> list[BaseModel]:
    """All examples of an already validated file (the trainer's view of it)."""
    with open(path, "rb") as stream:
        return [
            parse_example(row, data_format)
            for _, row in iter_rows(stream)
            if not isinstance(row, LineProblem)
        ]
