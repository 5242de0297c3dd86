"""`--n-epochs`, `--batch-size`, `--beta`, …: one flag per field of the method table's
hyperparameter models (training/methods.py), with the field's own description. Values go
through the same pydantic model the API validates with, so the command never holds a
second copy of the bounds or the defaults."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any, Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from clients.errors import usage_error
from training.methods import METHODS, TrainingMethod


def _members(annotation: Any) -> Iterator[Any]:
    """The types a field accepts, unions and Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            yield from _members(arg)
    elif origin is not None and getattr(annotation, "__metadata__", None) is not None:
        yield from _members(get_args(annotation)[0])
    else:
        yield annotation


def _metavar(annotation: Any) -> str:
    names: list[str] = []
    for member in _members(annotation):
        if get_origin(member) is Literal:
            names.extend(str(arg) for arg in get_args(member))
        elif get_origin(member) is list:
            names.append("A,B,…")
        elif member is int:
            names.append("INT")
        elif member is float:
            names.append("FLOAT")
        elif member is str:
            names.append("TEXT")
    return "|".join(names) or "VALUE"


def _is_flag(annotation: Any) -> bool:
    return list(_members(annotation)) == [bool]


def _takes_list(annotation: Any) -> bool:
    return any(get_origin(member) is list for member in _members(annotation))


def _fields() -> dict[str, tuple[FieldInfo, list[TrainingMethod]]]:
    """Every hyperparameter any method takes, with the methods that take it."""
    found: dict[str, tuple[FieldInfo, list[TrainingMethod]]] = {}
    for name, method in METHODS.items():
        for field_name, field in method.hyperparameters.model_fields.items():
            found.setdefault(field_name, (field, []))[1].append(name)
    return found


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _help(field_name: str, field: FieldInfo, methods: list[TrainingMethod]) -> str:
    text = field.description or field_name.replace("_", " ")
    if field.default is not None and not _is_flag(field.annotation):
        text += f" [default: {field.default}]"
    if len(methods) < len(METHODS):
        text += f" ({', '.join(methods)} only)"
    return text


def hyperparameter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a click command with the flags; they arrive as `hp_<field>` keywords."""
    for field_name, (field, methods) in reversed(list(_fields().items())):
        name = option_name(field_name)
        help_text = _help(field_name, field, methods)
        if _is_flag(field.annotation):
            declaration = f"{name}/--no-{name[2:]}"
            option = click.option(declaration, f"hp_{field_name}", default=None, help=help_text)
        else:
            option = click.option(
                name, f"hp_{field_name}", metavar=_metavar(field.annotation), help=help_text
            )
        command = option(command)
    return command


def hyperparameters(method: TrainingMethod, given: dict[str, Any]) -> dict[str, Any]:
    """The flags that were given, checked by the method's hyperparameter model: the
    request's `method.<type>.hyperparameters`. A bad value is a usage error naming its flag."""
    values = {
        key.removeprefix("hp_"): value
        for key, value in given.items()
        if key.startswith("hp_") and value is not None
    }
    model: type[BaseModel] = METHODS[method].hyperparameters
    others = sorted(set(values) - set(model.model_fields))
    if others:
        flags = ", ".join(option_name(name) for name in others)
        raise click.UsageError(f"{flags}: not a hyperparameter of the {method} method")
    for name, value in values.items():
        field = model.model_fields[name]
        if (
            isinstance(value, str)
            and _takes_list(field.annotation)
            and value not in ("all-linear",)
        ):
            values[name] = [part.strip() for part in value.split(",") if part.strip()]
    try:
        checked = model.model_validate(values)
    except ValidationError as error:
        raise usage_error(error) from None
    return checked.model_dump(mode="json", exclude_unset=True)
