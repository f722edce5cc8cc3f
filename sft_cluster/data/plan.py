"""The shard plan: which rank reads which piece of which object, decided once by the driver.

The driver lists every source once (one paginated listing per source), cuts
the objects into units and deals the units out to the ranks. The plan is plain
JSON, so it ships to the workers and is saved with the run: a resumed run reads
the same units in the same order even if the bucket changed meanwhile
(``plan_changes`` says what changed).

A unit is a byte range of an uncompressed JSONL object (the Hadoop rule: a
range owns every line whose first byte lies in it), or a whole object where no
byte can be sought (compressed files, JSON arrays, Parquet). When a source has
fewer units than there are ranks, a unit is shared by stride: ``stride`` ranks
read it and rank-slot ``offset`` keeps the records whose index % stride ==
offset. Either way each record of an epoch belongs to exactly one rank.

A resume on another world size re-plans (``sft_cluster.data.replan``): what
was left of the epochs in progress becomes ``owed`` pieces, dealt to the new
ranks, and the epochs after them are dealt fresh. Each re-plan is one entry
of ``history``, so any later plan still knows what was consumed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from sft_cluster.data.records import DataError, ObjectInfo, format_of, list_objects
from sft_cluster.spec import DataSpec, StorageSpec

DEFAULT_CHUNK_BYTES = 32 << 20

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DealtUnits",
    "ShardPlan",
    "Piece",
    "SourcePlan",
    "Unit",
    "build_plan",
    "derive_seed",
    "list_sources",
    "make_plan",
    "plan_changes",
    "same_listing",
]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, the same in every process and Python version."""
    text = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


class Unit(NamedTuple):
    """A piece of one object that a rank reads whole (see the module docstring).

    ``end`` is None for a whole-object unit, else [start, end) is a byte range.
    """

    file: int  # index into the source's objects
    start: int = 0
    end: int | None = None
    stride: int = 1
    offset: int = 0

    @property
    def key(self) -> str:
        """Names the unit in seeds: records are shuffled per (seed, epoch, key)."""
        return f"{self.file}:{self.start}-{self.end}:{self.offset}/{self.stride}"

    def nbytes(self, objects: Sequence[ObjectInfo] | Mapping[int, ObjectInfo]) -> float:
        """This rank's share of the bytes, for balancing."""
        end = objects[self.file].size if self.end is None else self.end
        return (end - self.start) / self.stride


class DealtUnits(Sequence[list[Unit]]):
    """Each rank's units, held as one table of (file, start, end, stride, offset) rows, rank after rank.

    A million ``Unit`` objects would cost seconds and a hundred MB in the driver;
    a rank's list is built when asked for. ``end`` is -1 in the table for a whole object.
    """

    def __init__(self, table: np.ndarray, bounds: np.ndarray):
        self.table, self.bounds = table, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, rank: int) -> list[Unit]:  # type: ignore[override]
        if not 0 <= rank < len(self):
            raise IndexError(rank)
        return [Unit(f, s, None if e < 0 else e, k, o) for f, s, e, k, o in self.rows(rank)]

    def __iter__(self) -> Iterator[list[Unit]]:
        return (self[rank] for rank in range(len(self)))

    def rows(self, rank: int) -> list[list[int]]:
        """``rank``'s rows as plain lists (end -1: a whole object)."""
        return self.table[self.bounds[rank] : self.bounds[rank + 1]].tolist()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Piece:
    """What an epoch still owes of one unit: its records in that epoch's order, cut by each re-plan.

    A cut ``(skip, taken)`` drops the first ``skip`` records of what is left,
    then the records numbered in ``taken`` (trained from a packing window that
    was partly consumed).
    """

    unit: Unit
    cuts: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def apply(self, records: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        for skip, taken in self.cuts:
            dropped = set(taken)
            records = [record for record in records[skip:] if record[0] not in dropped]
        return records

    def to_json(self) -> list[Any]:
        return [list(self.unit), [[skip, list(taken)] for skip, taken in self.cuts]]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Piece:
        return cls(Unit(*raw[0]), tuple((skip, tuple(taken)) for skip, taken in raw[1]))


@dataclass(frozen=True)
class SourcePlan:
    """One source's listing and each rank's units, in epoch-0 order.

    After a re-plan, epochs ``owed_from`` to ``fresh - 1`` are what the old
    ranks left of them: ``owed[rank][epoch - owed_from]``; epochs from
    ``fresh`` on are dealt from ``ranks``. A rank's own view of a plan
    (``plan_files.decode`` with a rank) holds only that rank's entries, keyed by
    rank, and the objects they name, keyed by index.
    """

    uri: str
    objects: Sequence[ObjectInfo] | Mapping[int, ObjectInfo]
    ranks: Sequence[list[Unit]] | Mapping[int, list[Unit]]
    owed: Sequence[list[list[Piece]]] | Mapping[int, list[list[Piece]]] = field(default_factory=list)
    owed_from: int = 0
    fresh: int = 0


@dataclass(frozen=True)
class ShardPlan:
    """Everything a worker needs to find its data, and nothing it has to list again."""

    seed: int
    world_size: int
    chunk_bytes: int
    sources: list[SourcePlan]
    fingerprint: str  # of the listing only: the same objects give the same fingerprint
    # One entry per re-plan that led here: {"plan": the old id, "from": N, "to": M, "step": S}.
    history: list[dict[str, Any]] = field(default_factory=list)
    saved_id: str | None = field(default=None, compare=False, repr=False)  # the id it was saved under

    @cached_property
    def encoded(self) -> Any:
        """The stored form (``plan_files.EncodedPlan``), made once."""
        from sft_cluster.data.plan_files import encode  # the stored form builds on this module

        return encode(self)

    @property
    def id(self) -> str:
        """Names this exact plan (listing, seed, world size, units): a cursor is only valid for it."""
        return self.saved_id or self.encoded.id

    @property
    def origin(self) -> str:
        """The id of the run's first plan (what ``train.epochs`` was counted for)."""
        return self.history[0]["plan"] if self.history else self.id

    @property
    def first_world_size(self) -> int:
        """The world size the run started on (before any re-plan)."""
        return self.history[0]["from"] if self.history else self.world_size

    @property
    def base_step(self) -> int:
        """The optimizer step this plan starts at: a cursor counts its rows from there."""
        return self.history[-1]["step"] if self.history else 0

    def units(self, source: int, rank: int, epoch: int) -> list[Piece]:
        """The order in which ``rank`` reads its pieces of ``source`` in ``epoch``."""
        plan = self.sources[source]
        if epoch < plan.fresh:
            owed = plan.owed[rank] if plan.owed else []
            index = epoch - plan.owed_from
            return list(owed[index]) if 0 <= index < len(owed) else []
        return [Piece(unit) for unit in self.dealt_units(source, rank, epoch)]

    def dealt_units(self, source: int, rank: int, epoch: int) -> list[Unit]:
        """``rank``'s units of ``source`` as this plan deals them, in ``epoch``'s order (owed or not)."""
        units = list(self.sources[source].ranks[rank])
        random.Random(derive_seed(self.seed, "epoch-order", source, rank, epoch)).shuffle(units)
        return units

    def to_json(self) -> str:
        """The whole plan as one text (a header line, then every rank's section)."""
        return f"{self.encoded.header}\n{self.encoded.body.decode()}"

    @classmethod
    def from_json(cls, text: str) -> ShardPlan:
        from sft_cluster.data.plan_files import decode_text

        return decode_text(text)


def list_sources(data: DataSpec, store: StorageSpec) -> list[list[ObjectInfo]]:
    """Every source's objects: one listing each, nothing per object."""
    return [list_objects(source, data, store) for source in data.sources]


def _fingerprint(listing: list[list[ObjectInfo]]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for index, objects in enumerate(listing):
        digest.update(f"source {index}\n".encode())
        for at in range(0, len(objects), 10_000):  # joined in slices: no second copy of the listing
            rows = (f"{o.uri}\x1f{o.size}\x1f{o.version}\n" for o in objects[at : at + 10_000])
            digest.update("".join(rows).encode())
    return digest.hexdigest()


def _ranged(uri: str, declared: str | None, known: dict[str, bool]) -> bool:
    """Whether an object is cut into byte ranges (uncompressed JSONL, Parquet: its row groups by
    first byte), by its suffixes."""
    suffix = ".".join(uri.rsplit("/", 1)[-1].lower().rsplit(".", 2)[1:])
    if suffix not in known:
        fmt, compression = format_of(uri, declared)
        known[suffix] = fmt in ("jsonl", "parquet") and compression is None
    return known[suffix]


def _units(objects: Sequence[ObjectInfo], declared: str | None, chunk_bytes: int) -> np.ndarray:
    """Every unit of a source, in listing order, as table rows (see ``DealtUnits``)."""
    count, known = len(objects), {}
    sizes = np.fromiter((o.size for o in objects), np.int64, count)
    ranged = np.fromiter((_ranged(o.uri, declared, known) for o in objects), bool, count)
    pieces = np.where(ranged, -(-sizes // chunk_bytes), 1) * (sizes > 0)
    file = np.repeat(np.arange(count, dtype=np.int64), pieces)
    k = np.arange(len(file), dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    size, parts, cut = sizes[file], pieces[file], ranged[file]
    start = np.where(cut, size * k // np.maximum(parts, 1), 0)
    end = np.where(cut, size * (k + 1) // np.maximum(parts, 1), -1)
    return np.stack([file, start, end, np.ones_like(file), np.zeros_like(file)], axis=1)


def _deal(table: np.ndarray, sizes: np.ndarray, world_size: int) -> DealtUnits:
    """Units per rank, balanced by bytes; each rank's rows keep the (shuffled) order of ``table``."""
    nbytes = (np.where(table[:, 2] < 0, sizes[table[:, 0]], table[:, 2]) - table[:, 1]).astype(float)
    if len(table) < world_size:
        # Give the spare ranks to the units with the most bytes per reader, then split by stride.
        readers = [1] * len(table)
        for _ in range(world_size - len(table)):
            biggest = max(range(len(table)), key=lambda i: nbytes[i] / readers[i])
            readers[biggest] += 1
        rows = [[*row[:3], k, j] for row, k in zip(table.tolist(), readers, strict=True) for j in range(k)]
        return DealtUnits(np.array(rows, dtype=np.int64), np.arange(world_size + 1))
    owner = _owners(nbytes, world_size)
    order = np.argsort(owner, kind="stable")
    return DealtUnits(table[order], np.searchsorted(owner[order], np.arange(world_size + 1)))


def _owners(sizes: np.ndarray, world_size: int) -> np.ndarray:
    """The rank of each size: largest first, a round of ``world_size`` at a time, the largest of a
    round to the least-loaded rank (LPT by rounds: within one size of the optimum, vectorised)."""
    owner = np.empty(len(sizes), dtype=np.int64)
    loads, ranks = np.zeros(world_size), np.arange(world_size)
    order = np.argsort(-sizes, kind="stable")
    for at in range(0, len(order), world_size):
        chunk = order[at : at + world_size]
        chosen = np.lexsort((ranks, loads))[: len(chunk)]
        owner[chunk] = chosen
        loads[chosen] += sizes[chunk]
    return owner


def balance(sizes: list[float], world_size: int) -> list[list[int]]:
    """Indexes of ``sizes`` per rank, balanced (``_owners``), each rank's indexes ascending (so its
    list keeps the order given)."""
    owner = _owners(np.asarray(sizes, dtype=float), world_size)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(world_size + 1))
    return [order[bounds[r] : bounds[r + 1]].tolist() for r in range(world_size)]


def make_plan(
    data: DataSpec,
    listing: list[list[ObjectInfo]],
    world_size: int,
    seed: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ShardPlan:
    """The plan for a given listing: the same (listing, seed, world size) give the same plan."""
    if world_size < 1 or chunk_bytes < 1:
        raise ValueError(f"world_size ({world_size}) and chunk_bytes ({chunk_bytes}) must be positive")
    if len(listing) != len(data.sources):
        raise ValueError(f"{len(listing)} listings for {len(data.sources)} sources")
    sources = []
    for index, (source, objects) in enumerate(zip(data.sources, listing, strict=True)):
        table = _units(objects, source.format, chunk_bytes)
        if not len(table):
            raise DataError(f"data.sources[{index}].uri = {source.uri!r}: matches no non-empty file")
        table = table[np.random.default_rng(derive_seed(seed, "units", index)).permutation(len(table))]
        sizes = np.fromiter((o.size for o in objects), np.int64, len(objects))
        sources.append(SourcePlan(source.uri, list(objects), _deal(table, sizes, world_size)))
    return ShardPlan(seed, world_size, chunk_bytes, sources, _fingerprint(listing))


def build_plan(
    data: DataSpec, store: StorageSpec, world_size: int, seed: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> ShardPlan:
    """List every source once and plan it (the driver's job, before any worker starts)."""
    return make_plan(data, list_sources(data, store), world_size, seed, chunk_bytes)


def _names(uris: list[str]) -> str:
    shown = ", ".join(uris[:3])
    return shown + (f" and {len(uris) - 3} more" if len(uris) > 3 else "")


def same_listing(plan: ShardPlan, listing: list[list[ObjectInfo]]) -> bool:
    """Whether ``listing`` is the one ``plan`` was made from (its header's fingerprint suffices)."""
    return _fingerprint(listing) == plan.fingerprint


def plan_changes(plan: ShardPlan, listing: list[list[ObjectInfo]]) -> list[str]:
    """What differs between the plan's listing and ``listing`` (empty: nothing), one line per kind.

    A resumed run keeps reading its saved plan; these lines tell the user that
    objects added since are not read and changed ones may be read inconsistently.
    """
    if len(listing) != len(plan.sources):
        return [f"the job has {len(listing)} data sources, the saved data plan {len(plan.sources)}"]
    changes: list[str] = []
    for index, (source, objects) in enumerate(zip(plan.sources, listing, strict=True)):
        old = {o.uri: o for o in source.objects}
        new = {o.uri: o for o in objects}
        where = f"data.sources[{index}] ({source.uri})"
        for what, uris in (
            ("added since the data plan was made, not read by this run", sorted(new.keys() - old.keys())),
            ("removed since the data plan was made", sorted(old.keys() - new.keys())),
            (
                "changed (size or version) since the data plan was made",
                sorted(u for u in old.keys() & new.keys() if old[u] != new[u]),
            ),
        ):
            if uris:
                changes.append(f"{where}: {len(uris)} object(s) {what}: {_names(uris)}")
    return changes
