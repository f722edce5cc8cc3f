"""YAML in, typed spec out: job and cluster files, ``a.b=c`` overrides, the resolved job."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sft_cluster.spec.cluster import CLUSTER_KINDS, ClusterSpec, LocalCluster
from sft_cluster.spec.errors import SpecError, dotted, format_errors, section, unknown_key
from sft_cluster.spec.job import JobSpec


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects repeated keys and reads ``1e-3`` as a number (YAML 1.2 does)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None or key == "<<":
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{source}: file not found"], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{source}: cannot read the file: {exc}"], source) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise SpecError([f"{where}: YAML syntax error: {exc.problem}"], source) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{source}: YAML syntax error: {exc}"], source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(
            [
                f"{source}: the file must be a mapping of keys to values (key: value), "
                f"not a {type(data).__name__}"
            ],
            source,
        )
    return data


# --- overrides ----------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=40`` -> (['train', 'max_steps'], 40); raises ValueError."""
    key, sep, raw = text.partition("=")
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())  # data.sources[0].uri == data.sources.0.uri
    path = key.split(".")
    if not sep or not all(path):
        raise ValueError("expected KEY=VALUE")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ValueError(f"the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return path, value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Each ``KEY=VALUE`` as (dotted key split, value parsed as YAML); SpecError if malformed."""
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed.append(_parse_override(text))
        except ValueError as exc:
            problems.append(f"override '{text}': {exc}")
    if problems:
        raise SpecError(problems, "command line")
    return parsed


def _key(node: Any, part: str, loc: list[str | int], root: type[BaseModel]) -> str | int:
    """``part`` as a key of ``node``: a list index, or a field the schema knows at ``loc``."""
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return int(part)
        raise ValueError(f"no item '{part}' in '{dotted(loc)}', which has {len(node)}")
    model = section(root, loc)
    if model is not None and part not in model.model_fields:
        raise ValueError(unknown_key(part, model, loc))
    return part


def _set(data: dict[str, Any], path: list[str], value: Any, root: type[BaseModel]) -> None:
    """Set ``path`` in ``data``, creating sections on the way; ValueError for an unknown key."""
    node: Any = data
    loc: list[str | int] = []
    for part in path[:-1]:
        key = _key(node, part, loc, root)
        loc.append(key)
        child = node[key] if isinstance(node, list) else node.get(key)
        if not isinstance(child, dict | list):
            child = node[key] = {}
        node = child
    node[_key(node, path[-1], loc, root)] = value


def _override(data: dict[str, Any], overrides: Sequence[str], root: type[BaseModel]) -> list[str]:
    problems = []
    for text in overrides:
        try:
            path, value = _parse_override(text)
            _set(data, path, value, root)
        except ValueError as exc:
            problems.append(f"override '{text}': {exc}")
    return problems


def apply_overrides(
    data: dict[str, Any],
    overrides: Sequence[str],
    source: str,
    root: type[BaseModel] = JobSpec,
) -> dict[str, Any]:
    """A copy of ``data`` with each override set; SpecError lists every bad one."""
    data = copy.deepcopy(data)
    problems = _override(data, overrides, root)
    if problems:
        raise SpecError(problems, source)
    return data


# --- loaders --------------------------------------------------------------------


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate a job file; SpecError carries every problem at once."""
    source = str(path)
    data = _read_yaml(Path(path), source)
    problems = _override(data, overrides, JobSpec)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems += format_errors(exc, source, JobSpec)
    if problems:
        raise SpecError(problems, source)
    return job


def load_cluster(path: str | Path | None) -> ClusterSpec:
    """Read a cluster file; ``None`` means this machine (``kind: local``)."""
    if path is None:
        return LocalCluster()
    source = str(path)
    data = _read_yaml(Path(path), source)
    kinds = ", ".join(f"'{kind}'" for kind in CLUSTER_KINDS)
    kind = data.get("kind")
    if "kind" not in data:
        raise SpecError([f"{source}: kind: missing (required: one of {kinds})"], source)
    model = CLUSTER_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise SpecError([f"{source}: kind = {kind!r}: must be one of {kinds}"], source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc, source, model), source) from None


def dump_job_yaml(job: JobSpec) -> str:
    """The resolved job as YAML, in schema order; ``load_job`` reads it back unchanged."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
