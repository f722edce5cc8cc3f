"""Reading one unit of a plan lazily, so a rank's memory is bounded by a unit, not by an object.

- Uncompressed JSONL byte range: the lines it owns (the Hadoop rule), read as one ``bytes``
  with the lines' offsets, and shuffled whole by position, in the order plans have always
  been read in (a resumed run replays the same order).
- Parquet byte range: the row groups whose first byte lies in it (the Spark rule), read
  one row group at a time; the row groups' order is shuffled, then the rows of each
  (a compressed Parquet object is one unit and keeps its row groups in file order).
- Whole-object JSONL (compressed): decompressed as a stream, shuffled in a bounded buffer.
- JSON array: read whole, so refused over ``MAX_JSON_BYTES``.

Sharing by stride keeps the records whose index in file order % stride == offset,
before any shuffle. ``read_unit`` without a seed gives file order.
"""

from __future__ import annotations

import itertools
import random
from array import array
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from fsspec import AbstractFileSystem

from sft_cluster import storage
from sft_cluster.data.plan import Unit
from sft_cluster.data.records import DataError, ObjectInfo, format_of, iter_raw, record_location

__all__ = [
    "MAX_JSON_BYTES",
    "SHUFFLE_BUFFER_BYTES",
    "SHUFFLE_BUFFER_RECORDS",
    "apply_cuts",
    "RangeLines",
    "range_lines",
    "read_lines",
    "read_unit",
    "shuffle_buffer",
]

# A JSON array is parsed whole (about 5-10x its size in Python objects): larger ones must be JSONL.
MAX_JSON_BYTES = 256 << 20
# The window a streamed object is shuffled in: enough to break up runs of similar records,
# small enough that a rank's memory does not grow with the object.
SHUFFLE_BUFFER_RECORDS = 8192
SHUFFLE_BUFFER_BYTES = 16 << 20
# Parquet rows become dicts this many at a time, so a row group stays Arrow until handed out.
_ROWS_PER_CONVERSION = 256
_READ_BLOCK = 1 << 20
_RANGE_PIECE = 4 << 20  # a byte range is read in ranged GETs of this size

Records = Iterator[tuple[int, Any]]


class RangeLines:
    """The non-blank lines a byte range owns, held as the one ``bytes`` read and their offsets.

    A 32 MiB range is 32 MiB here, not a list of a hundred thousand ``bytes`` objects
    (plus the copies a join and a split make, and a whole-range read's own copy), so a
    rank's memory is one range's bytes.
    ``first`` is the offset in the object of the first owned line; ``numbers[k]`` is
    line k's index from it, blank lines counted (what names a bad line).
    """

    def __init__(self, blob: bytes | bytearray, first: int, numbers: array, starts: array, ends: array):
        self.blob, self.first, self.numbers, self.starts, self.ends = blob, first, numbers, starts, ends

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, k: int) -> tuple[int, bytes]:
        return self.numbers[k], bytes(self.blob[self.starts[k] : self.ends[k]])

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return (self[k] for k in range(len(self)))


def _range_bytes(fs: AbstractFileSystem, path: str, start: int, end: int, size: int) -> tuple[int, bytearray]:
    """(begin, the bytes from ``begin`` to the end of the line holding byte ``end - 1``): the byte
    before ``start`` tells whether a line starts at ``start``, and the tail past ``end`` is found
    first (small reads), so the range is read once, in pieces, into one buffer."""
    begin = max(start - 1, 0)
    stop = end
    while stop < size:  # the line holding byte stop - 1 goes on past ``end``?
        probe = fs.cat_file(path, start=stop - 1, end=min(stop - 1 + _READ_BLOCK, size))
        cut = probe.find(b"\n")
        if cut >= 0:
            stop += cut
            break
        stop = min(stop - 1 + _READ_BLOCK, size)
    # In pieces into one buffer: a whole-range read holds the response and its copy at once.
    blob = bytearray(stop - begin)
    for at in range(begin, stop, _RANGE_PIECE):
        piece = fs.cat_file(path, start=at, end=min(at + _RANGE_PIECE, stop))
        blob[at - begin : at - begin + len(piece)] = piece
    return begin, blob


def range_lines(fs: AbstractFileSystem, path: str, start: int, end: int, size: int) -> RangeLines:
    """The lines a byte range [start, end) owns: those whose first byte lies in it (the partial line
    at ``start`` belongs to the previous range unless start == 0; the last line is read past
    ``end``). Ranged reads (``cat_file``), so no read-ahead cache holds a second copy."""
    begin, blob = _range_bytes(fs, path, start, end, size)
    numbers, starts, ends = array("q"), array("q"), array("q")
    position = 0
    if start > 0:
        cut = blob.find(b"\n")
        if cut < 0 or begin + cut + 1 >= end:
            return RangeLines(b"", begin + cut + 1 if cut >= 0 else begin, numbers, starts, ends)
        position = cut + 1
    first, index = begin + position, 0
    while position < len(blob):
        cut = blob.find(b"\n", position)
        stop = len(blob) if cut < 0 else cut
        if blob[position:stop].strip():
            numbers.append(index)
            starts.append(position)
            ends.append(stop)
        index += 1
        position = stop + 1
    return RangeLines(blob, first, numbers, starts, ends)


def read_lines(
    fs: AbstractFileSystem, path: str, start: int, end: int, size: int
) -> tuple[int, list[tuple[int, bytes]]]:
    """``range_lines`` as (offset of the first owned line, [(line index from it, line), ...])."""
    lines = range_lines(fs, path, start, end, size)
    return lines.first, list(lines)


class _LineNamer:
    """Absolute line numbers for a byte range, counted only when a bad line must be named."""

    def __init__(self, fs: AbstractFileSystem, path: str, uri: str, first: int):
        self.fs, self.path, self.uri, self.first = fs, path, uri, first
        self.base: int | None = None

    def __call__(self, index: int) -> str:
        if self.base is None:
            self.base = 0
            with self.fs.open(self.path, "rb") as handle:
                for _ in range(0, self.first, _READ_BLOCK * 8):
                    self.base += handle.read(min(_READ_BLOCK * 8, self.first - handle.tell())).count(b"\n")
        return f"{self.uri}:{self.base + index + 1}"


def shuffle_buffer(
    records: Iterable[tuple[int, bytes]],
    seed: int,
    max_records: int,
    max_bytes: int,
) -> Records:
    """``records`` in a seeded order, holding at most ``max_records`` or about ``max_bytes``.

    Once the buffer is full, each new record joins it and a randomly chosen one
    leaves; at the end the rest leave shuffled. The same input and seed give the
    same order, so a resume can replay it.
    """
    rng = random.Random(seed)
    buffer: list[tuple[int, bytes]] = []
    held = 0
    for record in records:
        buffer.append(record)
        held += len(record[1])
        while len(buffer) >= max_records or held >= max_bytes:
            pick = rng.randrange(len(buffer))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            out = buffer.pop()
            held -= len(out[1])
            yield out
    rng.shuffle(buffer)
    yield from buffer


def apply_cuts(records: Iterable[tuple[int, Any]], cuts: tuple[tuple[int, tuple[int, ...]], ...]) -> Records:
    """``Piece.apply`` as a stream: per cut, drop the first ``skip`` of what is left, then ``taken``."""
    stream = iter(records)
    for skip, taken in cuts:
        stream = _cut(stream, skip, frozenset(taken))
    return stream


def _cut(records: Iterator[tuple[int, Any]], skip: int, dropped: frozenset[int]) -> Records:
    """One cut (a function, so each cut keeps its own ``dropped``)."""
    return (record for record in itertools.islice(records, skip, None) if record[0] not in dropped)


def read_unit(
    obj: ObjectInfo,
    unit: Unit,
    declared_format: str | None,
    options: dict[str, Any],
    seed: int | None = None,
) -> tuple[Records, Callable[[int], str]]:
    """(number, raw record) for each record of ``unit`` this rank-slot owns, lazily, in file
    order or (with ``seed``) in that seed's order, and how to name a record by its number."""
    fmt, compression = format_of(obj.uri, declared_format)
    locate: Callable[[int], str] = partial(record_location, obj.uri, fmt)
    if fmt == "parquet":
        return _parquet(obj, unit, options, compression, seed), locate
    if fmt == "json":
        if obj.size > MAX_JSON_BYTES:
            raise DataError(
                f"{obj.uri}: a JSON array of {obj.size} bytes is over the {MAX_JSON_BYTES}-byte limit "
                "for .json sources (it is parsed whole on every rank that reads it); convert it to "
                "JSONL, e.g. jq -c '.[]' in.json > out.jsonl"
            )
        return _shuffled(_strided(iter_raw(obj.uri, options, fmt, compression), unit), seed), locate
    if unit.end is None:  # a whole JSONL object (compressed): a stream, shuffled in a buffer
        records = _strided(iter_raw(obj.uri, options, fmt, compression), unit)
        if seed is not None:
            records = shuffle_buffer(records, seed, SHUFFLE_BUFFER_RECORDS, SHUFFLE_BUFFER_BYTES)
        return records, locate
    fs, path = storage.filesystem(obj.uri, options)
    lines = range_lines(fs, path, unit.start, unit.end, obj.size)
    return _range_records(lines, unit, seed), _LineNamer(fs, path, obj.uri, lines.first)


def _range_records(lines: RangeLines, unit: Unit, seed: int | None) -> Records:
    """The rank-slot's lines of a range, shuffled whole by their positions: the order a list of the
    lines themselves shuffled with the same seed has (``random.shuffle`` moves by length alone)."""
    picks = array("q", range(unit.offset, len(lines), unit.stride))
    if seed is not None:
        random.Random(seed).shuffle(picks)
    return (lines[k] for k in picks)


def _strided(records: Iterable[tuple[int, Any]], unit: Unit) -> Iterator[tuple[int, Any]]:
    """The records of rank-slot ``unit.offset`` of ``unit.stride``, by index in file order."""
    return itertools.islice(records, unit.offset, None, unit.stride)


def _shuffled(records: Iterable[tuple[int, Any]], seed: int | None) -> Records:
    """A list read whole, shuffled whole (the order plans have always had)."""
    records = list(records)
    if seed is not None:
        random.Random(seed).shuffle(records)
    return iter(records)


def _parquet(
    obj: ObjectInfo, unit: Unit, options: dict[str, Any], compression: str | None, seed: int | None
) -> Records:
    """The rows of the row groups ``unit`` owns, one row group in memory at a time."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(obj.uri, options)
    # No read-ahead cache: pyarrow asks for the footer and each column chunk by range.
    with fs.open(path, "rb", cache_type="none", compression=compression) as handle:
        parquet = pq.ParquetFile(handle)
        groups = []
        index = 0  # of each owned row group's first row among the unit's rows, in file order
        for group, first_row, count in _owned_groups(parquet.metadata, unit):
            groups.append((group, first_row, range((unit.offset - index) % unit.stride, count, unit.stride)))
            index += count
        rng = None if seed is None else random.Random(seed)
        if rng is not None and compression is None:  # a decompressor seeks back by starting over
            rng.shuffle(groups)
        for group, first_row, rows in groups:
            yield from _group_rows(parquet, group, first_row, rows, rng)


def _owned_groups(metadata: Any, unit: Unit) -> list[tuple[int, int, int]]:
    """(row group, its first row's index in the file, its rows) for each row group whose first byte is in
    the unit's range (every row group for a whole-object unit: a compressed one has no byte range)."""
    owned, first_row = [], 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        column = row_group.column(0)
        begin = column.dictionary_page_offset if column.has_dictionary_page else None
        begin = column.data_page_offset if begin is None else begin
        if unit.end is None or unit.start <= begin < unit.end:
            owned.append((group, first_row, row_group.num_rows))
        first_row += row_group.num_rows
    return owned


def _group_rows(parquet: Any, group: int, first_row: int, rows: range, rng: random.Random | None) -> Records:
    """The rows ``rows`` of one row group (shuffled with ``rng``), as dicts a few at a time."""
    if not rows:
        return
    table = parquet.read_row_group(group)
    order = list(rows)
    if rng is not None:
        rng.shuffle(order)
    for at in range(0, len(order), _ROWS_PER_CONVERSION):
        chunk = order[at : at + _ROWS_PER_CONVERSION]
        for row, record in zip(chunk, table.take(chunk).to_pylist(), strict=True):
            yield first_row + row + 1, record
