"""Reading records from fsspec sources and normalising them to chat messages.

Formats: JSONL, JSON arrays and Parquet, each optionally compressed (``.gz``,
``.zst``, ``.bz2``, ``.xz``); the format comes from ``format`` or the suffix.
Record shapes, detected per record after ``columns`` renames:

- OpenAI ``messages`` (with an optional top-level ``system`` and ``tools``); messages may be
  ``tool`` replies and carry ``tool_calls``, ``reasoning_content``, ``name``, ``tool_call_id``
- ShareGPT ``conversations`` of ``{from, value}``
- Alpaca ``instruction`` / ``input`` / ``output``
- ``prompt`` / ``completion``
- plain ``text`` (continued pre-training: one assistant turn, all of it trained)

The per-record pieces (``iter_raw``, ``to_conversation``, ``BadRecords``) are
shared by the in-memory loader below and the streaming readers in ``stream``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from sft_cluster import storage
from sft_cluster.data.listing import ObjectInfo, list_path
from sft_cluster.spec import DataSpec, SourceSpec, StorageSpec, resolve_builtin

log = logging.getLogger("sft_cluster.data")
_ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


class DataError(Exception):
    """A problem with the data that the user must fix (named by URI and line)."""


class _Problem(Exception):
    """What is wrong with one record, before the caller says where the record is."""


def _source_uri(source: SourceSpec) -> str:
    uri = source.uri
    return resolve_builtin(uri) if uri.startswith("builtin:") else uri


def source_options(source: SourceSpec, data: DataSpec, store: StorageSpec) -> dict[str, Any]:
    """fsspec options for one source: storage, then data, then source options win."""
    merged = {**store.options, **data.storage_options, **source.storage_options}
    return storage.storage_options_for(_source_uri(source), store.endpoint_url, merged)


def _listable(name: str, declared: str | None) -> bool:
    """Whether an object found under a prefix is data (not ``_SUCCESS``, ``.crc``, ...)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith((".", "_")):
        return False
    try:
        format_of(name, declared)
    except DataError:
        return False
    return True


def list_objects(source: SourceSpec, data: DataSpec, store: StorageSpec) -> list[ObjectInfo]:
    """The objects a source names, sorted, with sizes, from paginated listings (``listing``).

    A glob expands; a prefix (folder) lists every data object below it; a plain
    object names itself. No per-object request: 100,000 objects list in seconds.
    """
    fs, path = storage.filesystem(_source_uri(source), source_options(source, data, store))
    return list_path(fs, path, partial(_listable, declared=source.format))


def resolve_source_uris(source: SourceSpec, data: DataSpec, store: StorageSpec) -> list[str]:
    """The objects a source names (a glob expands to a sorted list)."""
    return [obj.uri for obj in list_objects(source, data, store)]


def check_sources(data: DataSpec, store: StorageSpec) -> list[str]:
    """Problems that would stop training or evaluation, found before any worker starts: each
    source of ``data.sources`` and ``data.eval`` lists, and its first object's format is known."""
    problems = []
    for section, sources in (("data.sources", data.sources), ("data.eval", data.eval)):
        for index, source in enumerate(sources):
            field = f"{section}[{index}].uri"
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


class Conversation(list):
    """Chat messages (a list, so it compares equal to one) and the record's ``tools`` schemas, if any."""

    tools: list[dict[str, Any]] | None = None


# Message keys passed on to the chat template besides role and content.
_MESSAGE_KEYS = ("tool_calls", "reasoning_content", "thinking", "name", "tool_call_id")


def _message(turn: Any) -> dict[str, Any]:
    if not isinstance(turn, dict) or turn.get("role") not in _ROLES:
        raise _Problem(f"each message needs a role in {sorted(_ROLES)}")
    message = {"role": turn["role"], "content": turn.get("content")}
    for key in _MESSAGE_KEYS:
        if turn.get(key) is not None:
            message[key] = turn[key]
    calls = message.get("tool_calls")
    if calls is not None:
        if (
            turn["role"] != "assistant"
            or not isinstance(calls, list)
            or not all(isinstance(c, dict) for c in calls)
        ):
            raise _Problem("'tool_calls' must be a list of objects on an assistant message")
        for call in calls:  # OpenAI gives arguments as a JSON string; templates expect an object
            function = call.get("function")
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    raise _Problem("a tool call's 'arguments' string is not JSON") from None
    if not isinstance(message["content"], str) and not (message["content"] is None and calls):
        raise _Problem("each message needs a string 'content' (null only beside 'tool_calls')")
    return message


def _turns(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise _Problem("'messages' must be a non-empty list")
    return [_message(turn) for turn in raw]


def _sharegpt(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _Problem("'conversations' must be a non-empty list")
    turns = []
    for turn in raw:
        role = _SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise _Problem(
                f"each conversation turn needs 'from' in {sorted(_SHAREGPT_ROLES)} and a string 'value'"
            )
        turns.append({"role": role, "content": turn["value"]})
    return turns


def _shape(record: Any, columns: dict[str, str]) -> Conversation:
    if not isinstance(record, dict):
        raise _Problem(f"expected an object, got {type(record).__name__}")
    record = {columns.get(key, key): value for key, value in record.items()}
    if "messages" in record:
        turns = _turns(record["messages"])
    elif "conversations" in record:
        turns = _sharegpt(record["conversations"])
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
        raise _Problem(
            f"no known record shape (columns found: {found}); expected messages, "
            "conversations, instruction/output, prompt/completion or text; rename columns with "
            "data.sources[].columns"
        )
    if record.get("system") and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": str(record["system"])})
    if not any(turn["role"] == "assistant" for turn in turns):
        raise _Problem("conversation has no assistant turn to train on")
    conversation = Conversation(turns)
    tools = record.get("tools")
    if tools is not None:
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError:
                raise _Problem("'tools' is a string but not JSON") from None
        if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
            raise _Problem("'tools' must be a list of function schemas (objects)")
        conversation.tools = tools
    return conversation


def to_conversation(payload: Any, columns: dict[str, str], locate: Callable[[], str]) -> Conversation:
    """A raw record from ``iter_raw`` (JSONL line, parsed record or DataError) as chat messages.

    ``locate`` is called only for a bad record: naming a line of a byte range
    costs a read of the file up to it.
    """
    if isinstance(payload, DataError):
        raise payload
    if isinstance(payload, bytes | str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise DataError(f"{locate()}: malformed JSON ({exc.msg})") from None
        except UnicodeDecodeError:
            raise DataError(f"{locate()}: not valid UTF-8") from None
    try:
        return _shape(payload, columns)
    except _Problem as exc:
        raise DataError(f"{locate()}: {exc}") from None


def record_location(uri: str, fmt: str, number: int) -> str:
    """How an error names record ``number`` (a line, a JSON array index or a Parquet row)."""
    return {"jsonl": f"{uri}:{number}", "json": f"{uri}:record {number}"}.get(fmt, f"{uri}:row {number}")


def iter_raw(
    uri: str, options: dict[str, Any], fmt: str, compression: str | None
) -> Iterator[tuple[int, Any]]:
    """(number, raw record) for every record of one object, unparsed where parsing can wait.

    A raw record is a JSONL line (bytes), a parsed JSON or Parquet record, or a
    DataError that already names its place; ``number`` is what ``record_location``
    formats. Blank JSONL lines are not records, but they count as lines.
    """
    fs, path = storage.filesystem(uri, options)
    with fs.open(path, "rb", compression=compression) as handle:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        elif fmt == "json":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                yield 0, DataError(f"{uri}:{exc.lineno}: malformed JSON ({exc.msg})")
                return
            if not isinstance(records, list):
                yield 0, DataError(f"{uri}: a .json source must hold an array of records")
                return
            yield from enumerate(records, start=1)
        else:
            # A remote fsspec file reads a whole block per readline, and zstd has no readline:
            # a buffer gives every handle cheap lines.
            for line_no, line in enumerate(io.BufferedReader(handle, 1 << 20), start=1):
                if line.strip():
                    yield line_no, line


class BadRecords:
    """``data.on_bad_record``: stop at the first bad record, or skip, count and log them.

    Skipping fails once more than ``data.max_bad_records`` were skipped; the
    count and the first message are part of a reader's resumable state.
    """

    def __init__(self, data: DataSpec, skipped: int = 0, first: str | None = None):
        self.policy, self.limit = data.on_bad_record, data.max_bad_records
        self.skipped, self.first = skipped, first

    def skip(self, exc: DataError) -> None:
        """Count ``exc`` as skipped, or raise it (or the over-the-limit error)."""
        if self.policy == "error":
            raise exc
        self.skipped += 1
        self.first = self.first or str(exc)
        log.warning("skipping bad record %s", exc)
        if self.skipped > self.limit:
            raise DataError(
                f"{self.skipped} bad records skipped, more than data.max_bad_records = "
                f"{self.limit}; the first: {self.first}"
            ) from None


def load_conversations(data: DataSpec, store: StorageSpec) -> list[Conversation]:
    """Every conversation of every source, in listing order.

    A bad record stops the run (``on_bad_record: error``) or is skipped, counted
    and named in the log (``skip``), until more than ``max_bad_records`` were skipped.
    """
    conversations, bad = [], BadRecords(data)
    for source in data.sources:
        options = source_options(source, data, store)
        for uri in resolve_source_uris(source, data, store):
            fmt, compression = format_of(uri, source.format)
            for number, raw in iter_raw(uri, options, fmt, compression):
                try:
                    where = partial(record_location, uri, fmt, number)
                    conversations.append(to_conversation(raw, source.columns, where))
                except DataError as exc:
                    bad.skip(exc)
    if bad.skipped:
        log.warning("skipped %d bad record(s) in total", bad.skipped)
    return conversations
