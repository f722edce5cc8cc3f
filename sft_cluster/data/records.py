"""Reading records from fsspec sources and normalising them to chat messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sft_cluster import storage
from sft_cluster.spec import DataSpec, SourceSpec, StorageSpec, resolve_builtin

_ROLES = {"system", "user", "assistant"}


class DataError(Exception):
    """A problem with the data that the user must fix (named by URI and line)."""


def _source_uri(source: SourceSpec) -> str:
    uri = source.uri
    return resolve_builtin(uri) if uri.startswith("builtin:") else uri


def _options(source: SourceSpec, data: DataSpec, store: StorageSpec) -> dict[str, Any]:
    merged = {**store.options, **data.storage_options, **source.storage_options}
    return storage.storage_options_for(_source_uri(source), store.endpoint_url, merged)


def resolve_source_uris(source: SourceSpec, data: DataSpec, store: StorageSpec) -> list[str]:
    """The objects a source names (a glob expands to a sorted list)."""
    uri = _source_uri(source)
    fs, path = storage.filesystem(uri, _options(source, data, store))
    if any(ch in path for ch in "*?["):
        matches = sorted(fs.glob(path))
    else:
        matches = [path] if fs.exists(path) else []
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return matches
    return [f"{protocol}://{m}" for m in matches]


def check_sources(data: DataSpec, store: StorageSpec) -> list[str]:
    """Problems that would stop training, found before any worker starts."""
    problems = []
    for index, source in enumerate(data.sources):
        field = f"data.sources[{index}].uri"
        try:
            uris = resolve_source_uris(source, data, store)
        except Exception as exc:  # noqa: BLE001 - storage errors vary by backend
            problems.append(f"{field} = {source.uri!r}: cannot list it: {exc}")
            continue
        if not uris:
            problems.append(f"{field} = {source.uri!r}: matches no file; check the path")
    return problems


def _normalise(record: Any, columns: dict[str, str], where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record = {columns.get(key, key): value for key, value in record.items()}
    messages = record.get("messages")
    if messages is None:
        found = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: no 'messages' column (columns found: {found})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES:
            raise DataError(f"{where}: each message needs a role in {sorted(_ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: each message needs a string 'content'")
        out.append({"role": turn["role"], "content": turn["content"]})
    if record.get("system") and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": str(record["system"])})
    if not any(turn["role"] == "assistant" for turn in out):
        raise DataError(f"{where}: conversation has no assistant turn to train on")
    return out


def _iter_jsonl(uri: str, options: dict[str, Any], columns: dict[str, str]) -> Iterator[list[dict]]:
    fs, path = storage.filesystem(uri, options)
    with fs.open(path, "rt", encoding="utf-8", compression="infer") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{uri}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg})") from None
            yield _normalise(record, columns, where)


def load_conversations(data: DataSpec, store: StorageSpec) -> list[list[dict[str, str]]]:
    """Every conversation of every source, in listing order."""
    conversations = []
    for source in data.sources:
        options = _options(source, data, store)
        for uri in resolve_source_uris(source, data, store):
            conversations.extend(_iter_jsonl(uri, options, source.columns))
    return conversations
