"""Reading records from fsspec sources and normalising them to chat messages.

Formats: JSONL, JSON arrays and Parquet, each optionally compressed (``.gz``,
``.zst``, ``.bz2``, ``.xz``); the format comes from ``format`` or the suffix.
Record shapes, detected per record after ``columns`` renames:

- OpenAI ``messages`` (with an optional top-level ``system``)
- ShareGPT ``conversations`` of ``{from, value}``
- Alpaca ``instruction`` / ``input`` / ``output``
- ``prompt`` / ``completion``
- plain ``text`` (continued pre-training: one assistant turn, all of it trained)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from sft_cluster import storage
from sft_cluster.spec import DataSpec, SourceSpec, StorageSpec, resolve_builtin

log = logging.getLogger("sft_cluster.data")
_ROLES = {"system", "user", "assistant"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


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
            problems.append(f"{field} = {source.uri!r}: cannot list it: {type(exc).__name__}: {exc}")
            continue
        if not uris:
            problems.append(f"{field} = {source.uri!r}: matches no file; check the path")
            continue
        try:
            format_of(uris[0], source.format)
        except DataError as exc:
            problems.append(f"{field}: {exc}")
    return problems


def format_of(uri: str, declared: str | None) -> tuple[str, str | None]:
    """(format, fsspec compression) of an object, from ``format`` or its suffix."""
    name = uri.rsplit("/", 1)[-1].lower()
    compression = next((c for suffix, c in _COMPRESSIONS.items() if name.endswith(suffix)), None)
    if compression:
        name = name.rsplit(".", 1)[0]
    if declared:
        return declared, compression
    for suffix, fmt in _FORMATS.items():
        if name.endswith(suffix):
            return fmt, compression
    raise DataError(f"{uri}: cannot tell the format from the name; set format: jsonl | json | parquet")


def _turns(raw: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    turns = []
    for turn in raw:
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES:
            raise DataError(f"{where}: each message needs a role in {sorted(_ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: each message needs a string 'content'")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _sharegpt(raw: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for turn in raw:
        role = _SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(
                f"{where}: each conversation turn needs 'from' in {sorted(_SHAREGPT_ROLES)} "
                "and a string 'value'"
            )
        turns.append({"role": role, "content": turn["value"]})
    return turns


def normalise(record: Any, columns: dict[str, str], where: str) -> list[dict[str, str]]:
    """Any supported record shape as a list of chat messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    record = {columns.get(key, key): value for key, value in record.items()}
    if "messages" in record:
        turns = _turns(record["messages"], where)
    elif "conversations" in record:
        turns = _sharegpt(record["conversations"], where)
    elif "instruction" in record and "output" in record:
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    elif "prompt" in record and "completion" in record:
        turns = [
            {"role": "user", "content": str(record["prompt"])},
            {"role": "assistant", "content": str(record["completion"])},
        ]
    elif isinstance(record.get("text"), str):
        turns = [{"role": "assistant", "content": record["text"]}]
    else:
        found = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: no known record shape (columns found: {found}); expected messages, "
            "conversations, instruction/output, prompt/completion or text; rename columns with "
            "data.sources[].columns"
        )
    if record.get("system") and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": str(record["system"])})
    if not any(turn["role"] == "assistant" for turn in turns):
        raise DataError(f"{where}: conversation has no assistant turn to train on")
    return turns


def _iter_raw(
    uri: str, options: dict[str, Any], fmt: str, compression: str | None
) -> Iterator[tuple[str, Any]]:
    """(location, parsed record or DataError) for every record of one object."""
    fs, path = storage.filesystem(uri, options)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb", compression=compression) as handle:
            row = 0
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{uri}:row {row}", record
        return
    with fs.open(path, "rt", encoding="utf-8", compression=compression) as handle:
        if fmt == "json":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                yield f"{uri}:{exc.lineno}", DataError(f"{uri}:{exc.lineno}: malformed JSON ({exc.msg})")
                return
            if not isinstance(records, list):
                yield uri, DataError(f"{uri}: a .json source must hold an array of records")
                return
            for index, record in enumerate(records, start=1):
                yield f"{uri}:record {index}", record
            return
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{uri}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, DataError(f"{where}: malformed JSON ({exc.msg})")


def load_conversations(data: DataSpec, store: StorageSpec) -> list[list[dict[str, str]]]:
    """Every conversation of every source, in listing order.

    A bad record stops the run (``on_bad_record: error``) or is skipped, counted
    and named in the log (``skip``), until more than ``max_bad_records`` were skipped.
    """
    conversations, skipped = [], []
    for source in data.sources:
        options = _options(source, data, store)
        for uri in resolve_source_uris(source, data, store):
            fmt, compression = format_of(uri, source.format)
            for where, record in _iter_raw(uri, options, fmt, compression):
                try:
                    if isinstance(record, DataError):
                        raise record
                    conversations.append(normalise(record, source.columns, where))
                except DataError as exc:
                    if data.on_bad_record == "error":
                        raise
                    skipped.append(str(exc))
                    log.warning("skipping bad record %s", exc)
                    if len(skipped) > data.max_bad_records:
                        raise DataError(
                            f"{len(skipped)} bad records skipped, more than data.max_bad_records = "
                            f"{data.max_bad_records}; the first: {skipped[0]}"
                        ) from None
    if skipped:
        log.warning("skipped %d bad record(s) in total", len(skipped))
    return conversations
