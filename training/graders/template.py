"""Templates in graders' strings: `{{ item.reference }}`, `{{sample.output_text}}`,
`{{ sample.output_tools[0].function.name }}`. Only the `item` and `sample` namespaces;
a path is looked up, never evaluated."""

from __future__ import annotations

import json
import re
from typing import Any

_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[\s*[\"']([^\"']*)[\"']\s*\]")
_HEAD = re.compile(r"(item|sample)")


class InvalidVariable(ValueError):
    """A template variable that does not resolve (invalid_variable_error)."""


class UnparsedSample(InvalidVariable):
    """`sample.output_json` read from a sample that is not JSON (sample_parse_error)."""


def resolve(path: str, namespaces: dict[str, Any]) -> Any:
    """The value at `path` (`item.a.b`, `sample.output_tools[0].function.name`)."""
    head = _HEAD.match(path)
    if head is None:
        raise InvalidVariable(f"{{{{ {path} }}}}: the namespaces are `item` and `sample`")
    value, at = namespaces[head.group(1)], head.end()
    if path.startswith("sample.output_json") and namespaces["sample"].get("output_json") is None:
        raise UnparsedSample(f"{{{{ {path} }}}}: the sample is not JSON")
    while at < len(path):
        step = _STEP.match(path, at)
        if step is None:
            raise InvalidVariable(f"{{{{ {path} }}}}: cannot read {path[at:]!r}")
        key, index, quoted = step.groups()
        name = key if key is not None else quoted
        if name is not None and isinstance(value, dict) and name in value:
            value = value[name]
        elif index is not None and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            raise InvalidVariable(f"{{{{ {path} }}}}: {path[: step.end()]} does not exist")
        at = step.end()
    if value is None:  # e.g. output_json of a sample that is not JSON
        raise InvalidVariable(f"{{{{ {path} }}}} has no value")
    return value


def as_text(value: Any) -> str:
    """How a value reads inside a string: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(text: str, item: dict[str, Any], sample: dict[str, Any]) -> str:
    namespaces = {"item": item, "sample": sample}
    return _TEMPLATE.sub(lambda match: as_text(resolve(match.group(1), namespaces)), text)
