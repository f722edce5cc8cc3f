"""Turning pydantic's errors into one plain line per problem: field path, value, fix."""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

_SCALARS = (str, int, float, bool, type(None))


class SpecError(Exception):
    """A job or cluster file the user must fix; ``problems`` are complete lines."""

    def __init__(self, problems: Sequence[str], source: str = ""):
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(f"error: {problem}" for problem in self.problems)


def dotted(loc: Sequence[str | int]) -> str:
    """``('data', 'sources', 0, 'uri')`` -> ``data.sources[0].uri``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def walk(root: type[BaseModel], loc: Sequence[str | int]) -> tuple[Any, FieldInfo | None]:
    """The annotation at ``loc`` in the schema and the last model field on the way.

    Returns ``(None, None)`` where ``loc`` leaves the schema (an unknown key).
    """
    annotation: Any = root
    field: FieldInfo | None = None
    for part in loc:
        annotation = _strip_optional(annotation)
        origin = get_origin(annotation)
        if _is_model(annotation) and isinstance(part, str):
            field = annotation.model_fields.get(part)
            if field is None:
                return None, None
            annotation = field.annotation
        elif origin is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif origin is dict and isinstance(part, str):
            annotation = get_args(annotation)[1]
        else:
            return None, None
    return _strip_optional(annotation), field


def section(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model whose keys live at ``loc``, or None where any key is allowed (a dict)."""
    annotation, _ = walk(root, loc)
    return annotation if _is_model(annotation) else None


def closest_key(key: str, model: type[BaseModel]) -> str | None:
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key(key: str, model: type[BaseModel], parent: Sequence[str | int]) -> str:
    """``unknown key 'train.lr' (valid keys: ...)``, with the closest key when there is one."""
    prefix = f"{dotted(parent)}." if parent else ""
    close = closest_key(key, model)
    hint = f"did you mean '{prefix}{close}'?" if close else f"valid keys: {', '.join(model.model_fields)}"
    return f"unknown key '{prefix}{key}' ({hint})"


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: null and true rather than None and True."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _number(bound: Any) -> Any:
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def _bound(kind: str, ctx: dict[str, Any], field: FieldInfo | None) -> str:
    bound = _number(next(iter(ctx.values())))
    is_int = field is not None and _strip_optional(field.annotation) is int
    if is_int and (kind, bound) in (("greater_than", 0), ("greater_than_equal", 1)):
        message = "must be a positive integer"
    else:
        words = {
            "greater_than": "greater than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
        }
        message = f"must be {words[kind]} {bound}"
    extra = field.json_schema_extra if field is not None else None
    if isinstance(extra, dict) and "hint" in extra:
        message += f" ({extra['hint']})"
    return message


_TYPE_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "int_parsing_size": "expected an integer of a sensible size",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "must be a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping of keys to values",
    "model_type": "expected a mapping of keys to values",
    "model_attributes_type": "expected a mapping of keys to values",
}


def _message(error: dict[str, Any], field: FieldInfo | None) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _bound(kind, ctx, field)
    if kind == "literal_error":
        head, sep, tail = ctx["expected"].rpartition(" or ")
        return f"must be one of {head}, {tail}" if sep else f"must be {ctx['expected']}"
    if kind == "string_type":
        quote = isinstance(error["input"], int | float)
        return "expected a string" + (" (put the value in quotes)" if quote else "")
    if kind == "too_short":
        count = ctx["min_length"]
        return f"must have at least {count} item{'s' if count != 1 else ''}"
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind]
    return str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _typo_targets(errors: list[Any], root: type[BaseModel]) -> set[tuple[str | int, ...]]:
    """Required keys that an unknown key is a typo of: 'missing' for them says nothing new."""
    targets = set()
    for error in errors:
        loc = tuple(error["loc"])
        model = section(root, loc[:-1]) if error["type"] == "extra_forbidden" else None
        close = closest_key(str(loc[-1]), model) if model else None
        if close:
            targets.add((*loc[:-1], close))
    return targets


def format_errors(exc: ValidationError, source: str, root: type[BaseModel]) -> list[str]:
    """One ``source: ...`` line per problem pydantic found, in the project's words."""
    errors = exc.errors(include_url=False)
    typo_targets = _typo_targets(errors, root)
    lines = []
    for error in errors:
        loc = list(error["loc"])
        path = dotted(loc)
        kind = error["type"]
        if kind == "extra_forbidden":
            model = section(root, loc[:-1])
            found = unknown_key(str(loc[-1]), model, loc[:-1]) if model else f"unknown key '{path}'"
            lines.append(f"{source}: {found}")
        elif kind == "missing":
            if tuple(loc) not in typo_targets:
                lines.append(f"{source}: {path}: missing (required)")
        elif kind == "spec_rule":
            lines.extend(f"{source}: {line}" for line in error["msg"].splitlines())
        else:
            message = _message(error, walk(root, loc)[1])
            value = error["input"]
            if not path:
                lines.append(f"{source}: {message}")
            elif isinstance(value, _SCALARS):
                lines.append(f"{source}: {path} = {_show(value)}: {message}")
            else:
                lines.append(f"{source}: {path}: {message}")
    return lines
