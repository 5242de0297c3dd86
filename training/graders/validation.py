"""A grader from JSON, or one error naming the field as the user wrote it
(`grader.graders.correct.operation`), for the API's 400s."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from training.graders.schemas import Grader

GRADER_TYPES = frozenset(
    {"string_check", "text_similarity", "python", "score_model", "label_model", "multi"}
)
_PART_TYPES = frozenset({"input_text", "output_text", "input_image", "input_audio"})
_GRADER = TypeAdapter[Any](Grader)


class InvalidGrader(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _field(location: tuple[Any, ...], root: str) -> str:
    """pydantic's location without the union tags it inserts (a grader's type after the
    root or a `graders` key, a content part's type, `str`, `list[...]`)."""
    parts: list[str] = [root]
    tag_next = True  # the root's union tag comes first
    previous: Any = None
    for step in location:
        if tag_next and step in GRADER_TYPES:
            tag_next = False
            previous = step
            continue
        tag_next = previous == "graders"
        previous = step
        if isinstance(step, str) and (
            step in _PART_TYPES or step == "str" or step.startswith(("list[", "function-"))
        ):
            continue
        parts.append(f"[{step}]" if isinstance(step, int) else str(step))
    return ".".join(parts).replace(".[", "[")


def parse_grader(raw: Any, root: str = "grader") -> Grader:
    """The grader `raw` describes, or InvalidGrader naming the first bad field."""
    _no_nested_multi(raw, root)
    try:
        return _GRADER.validate_python(raw)
    except ValidationError as error:
        # Of a union's errors, the deepest is about the branch the value meant.
        first = max(error.errors(), key=lambda e: len(e.get("loc", ())))
        param = _field(tuple(first.get("loc", ())), root)
        message = str(first.get("msg", "invalid grader")).removeprefix("Value error, ")
        raise InvalidGrader(f"{message}: '{param}'", param) from None


def _no_nested_multi(raw: Any, root: str) -> None:
    """The guide's rule, checked before pydantic so the error names the inner grader."""
    if not (isinstance(raw, dict) and raw.get("type") == "multi"):
        return
    graders = raw.get("graders")
    inner = graders.items() if isinstance(graders, dict) else []
    if isinstance(graders, list):
        inner = [(g.get("name", i) if isinstance(g, dict) else i, g) for i, g in enumerate(graders)]
    for key, grader in inner:
        if isinstance(grader, dict) and grader.get("type") == "multi":
            param = f"{root}.graders.{key}.type"
            raise InvalidGrader(f"a multi grader may not contain another multi: '{param}'", param)
