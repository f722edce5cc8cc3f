"""YAML in, typed spec out; every problem reported with its field path, value and fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sft_cluster.spec.cluster import CLUSTER_ADAPTER, CLUSTER_KINDS, ClusterSpec, LocalCluster
from sft_cluster.spec.job import JobSpec

ASSETS = Path(__file__).resolve().parents[1] / "assets"


class SpecError(Exception):
    """A job or cluster file the user must fix; ``problems`` are complete lines."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(f"error: {p}" for p in problems))
        self.problems = problems


def resolve_builtin(value: str) -> str:
    """``builtin:NAME`` is a file or folder shipped in ``sft_cluster/assets``."""
    return str(ASSETS / value.removeprefix("builtin:"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError([f"{where}: YAML syntax error: {exc.problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([f"{path}: the top level must be a mapping of keys to values"])
    return data


# --- overrides -------------------------------------------------------------

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str) and _NUMBER.match(value):
        return float(value)  # YAML 1.1 reads 1e-3 as a string
    return value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any, str]]:
    """``a.b=c`` into (path, value, original text)."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            problems.append(f"override '{item}': expected KEY=VALUE, e.g. train.max_steps=40")
            continue
        parsed.append((key.strip().split("."), _parse_value(value), item))
    if problems:
        raise SpecError(problems)
    return parsed


def _field_names(model: type[BaseModel] | None) -> list[str]:
    return list(model.model_fields) if model else []


def _submodel(model: type[BaseModel] | None, name: str) -> type[BaseModel] | None:
    if model is None or name not in model.model_fields:
        return None
    annotation = model.model_fields[name].annotation
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _suggest(name: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys: {', '.join(valid)}" if valid else "this section takes no keys"


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], model: type[BaseModel]) -> dict[str, Any]:
    """Set each dotted key in ``data``; an unknown key is an error with a suggestion."""
    problems = []
    for path, value, original in parse_overrides(overrides):
        node, current = data, model
        for depth, part in enumerate(path):
            prefix = ".".join(path[:depth])
            if current is not None and part not in current.model_fields:
                dotted = ".".join(path)
                hint = _suggest(part, _field_names(current), f"{prefix}." if prefix else "")
                problems.append(f"override '{original}': unknown key '{dotted}' ({hint})")
                break
            if depth == len(path) - 1:
                node[part] = value
                break
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node, current = child, _submodel(current, part)
    if problems:
        raise SpecError(problems)
    return data


# --- validation messages -----------------------------------------------------


def _loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        current = _submodel(current, part)
    return current


def _message(error: dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in ("greater_than", "greater_than_equal"):
        bound = ctx.get("gt", ctx.get("ge"))
        if bound in (0, 1) and isinstance(error["input"], int) and not isinstance(error["input"], bool):
            return (
                "must be a positive integer"
                if (kind == "greater_than") == (bound == 0)
                else f"must be at least {bound}"
            )
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {'greater than' if kind == 'greater_than' else 'at least'} {bound}"
    if kind in ("less_than", "less_than_equal"):
        bound = ctx.get("lt", ctx.get("le"))
        return f"must be {'less than' if kind == 'less_than' else 'at most'} {bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "expected an integer"
    if kind in ("float_parsing", "float_type"):
        return "expected a number"
    if kind in ("bool_parsing", "bool_type"):
        return "expected true or false"
    if kind == "string_type":
        return "expected a string"
    if kind in ("list_type", "tuple_type"):
        return "expected a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "expected a mapping of keys to values"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "union_tag_invalid":
        return f"kind must be one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "missing 'kind' (one of 'local', 'ray', 'slurm')"
    return str(error["msg"]).removeprefix("Value error, ")


def format_errors(
    exc: ValidationError, source: str, root: type[BaseModel], strip_tag: bool = False
) -> list[str]:
    """One line per pydantic error, in the project's words."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        if strip_tag and loc and isinstance(loc[0], str) and error["type"] != "union_tag_invalid":
            loc = loc[1:]  # the discriminator's tag, e.g. 'ray'
        path = _loc(loc)
        if error["type"] == "extra_forbidden":
            parent = _loc(loc[:-1])
            hint = _suggest(
                str(loc[-1]), _field_names(_model_at(root, loc[:-1])), f"{parent}." if parent else ""
            )
            lines.append(f"{source}: unknown key '{path}' ({hint})")
        elif error["type"] == "missing":
            lines.append(f"{source}: {path}: missing (required)")
        elif error["type"] == "credential":
            lines.append(f"{source}: {path}: {_message(error)}")  # never echo the value
        elif error["type"].startswith("union_tag") or not path:
            lines.append(f"{source}: {(path + ': ') if path else ''}{_message(error)}")
        else:
            lines.append(f"{source}: {path} = {error['input']!r}: {_message(error)}")
    return lines


# --- public loaders ----------------------------------------------------------


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate a job file; raises SpecError with every problem."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path), overrides, JobSpec)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc, str(path), JobSpec)) from None


def load_cluster(path: str | Path | None) -> ClusterSpec:
    """Read a cluster file; ``None`` is this machine (``kind: local``)."""
    if path is None:
        return LocalCluster()
    path = Path(path)
    data = _read_yaml(path)
    try:
        return CLUSTER_ADAPTER.validate_python(data)
    except ValidationError as exc:
        root = CLUSTER_KINDS.get(data.get("kind"), LocalCluster)
        raise SpecError(format_errors(exc, str(path), root, strip_tag=True)) from None


def dump_job_yaml(job: JobSpec) -> str:
    """The resolved job as YAML, in the order of the schema."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
