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
import heapq
import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

from sft_cluster.data.records import DataError, ObjectInfo, format_of, list_objects
from sft_cluster.spec import DataSpec, StorageSpec

DEFAULT_CHUNK_BYTES = 32 << 20
_PLAN_VERSION = 1

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ShardPlan",
    "Piece",
    "SourcePlan",
    "Unit",
    "build_plan",
    "derive_seed",
    "list_sources",
    "make_plan",
    "plan_changes",
]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, the same in every process and Python version."""
    text = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Unit:
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

    def nbytes(self, objects: list[ObjectInfo]) -> float:
        """This rank's share of the bytes, for balancing."""
        end = objects[self.file].size if self.end is None else self.end
        return (end - self.start) / self.stride


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
        return [list(asdict(self.unit).values()), [[skip, list(taken)] for skip, taken in self.cuts]]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Piece:
        return cls(Unit(*raw[0]), tuple((skip, tuple(taken)) for skip, taken in raw[1]))


@dataclass(frozen=True)
class SourcePlan:
    """One source's listing and each rank's units, in epoch-0 order.

    After a re-plan, epochs ``owed_from`` to ``fresh - 1`` are what the old
    ranks left of them: ``owed[rank][epoch - owed_from]``; epochs from
    ``fresh`` on are dealt from ``ranks``.
    """

    uri: str
    objects: list[ObjectInfo]
    ranks: list[list[Unit]]
    owed: list[list[list[Piece]]] = field(default_factory=list)
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

    @cached_property
    def id(self) -> str:
        """Names this exact plan (listing, seed, world size, units): a cursor is only valid for it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

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
        return json.dumps(
            {
                "version": _PLAN_VERSION,
                "seed": self.seed,
                "world_size": self.world_size,
                "chunk_bytes": self.chunk_bytes,
                "fingerprint": self.fingerprint,
                "sources": [_source_json(source) for source in self.sources],
                # Only when re-planned, so the ids of plans that never were stay what they were.
                **({"history": self.history} if self.history else {}),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ShardPlan:
        raw = json.loads(text)
        if raw.get("version") != _PLAN_VERSION:
            raise DataError(
                f"data plan version {raw.get('version')!r} is not {_PLAN_VERSION}; re-plan the run"
            )
        sources = [
            SourcePlan(
                source["uri"],
                [ObjectInfo(*o) for o in source["objects"]],
                [[Unit(*u) for u in units] for units in source["ranks"]],
                [[[Piece.from_json(p) for p in epoch] for epoch in owed] for owed in source.get("owed", [])],
                source.get("owed_from", 0),
                source.get("fresh", 0),
            )
            for source in raw["sources"]
        ]
        return cls(
            raw["seed"],
            raw["world_size"],
            raw["chunk_bytes"],
            sources,
            raw["fingerprint"],
            raw.get("history", []),
        )


def _source_json(source: SourcePlan) -> dict[str, Any]:
    text: dict[str, Any] = {
        "uri": source.uri,
        "objects": [[o.uri, o.size, o.version] for o in source.objects],
        "ranks": [[list(asdict(u).values()) for u in units] for units in source.ranks],
    }
    if source.owed or source.fresh:
        text["owed"] = [[[p.to_json() for p in epoch] for epoch in owed] for owed in source.owed]
        text.update(owed_from=source.owed_from, fresh=source.fresh)
    return text


def list_sources(data: DataSpec, store: StorageSpec) -> list[list[ObjectInfo]]:
    """Every source's objects: one listing each, nothing per object."""
    return [list_objects(source, data, store) for source in data.sources]


def _fingerprint(listing: list[list[ObjectInfo]]) -> str:
    text = json.dumps([[[o.uri, o.size, o.version] for o in objects] for objects in listing])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _units(objects: list[ObjectInfo], declared: str | None, chunk_bytes: int) -> list[Unit]:
    units = []
    for index, obj in enumerate(objects):
        if obj.size == 0:
            continue
        fmt, compression = format_of(obj.uri, declared)
        if fmt != "jsonl" or compression:
            units.append(Unit(index))
            continue
        pieces = math.ceil(obj.size / chunk_bytes)
        bounds = [obj.size * k // pieces for k in range(pieces + 1)]
        units.extend(Unit(index, bounds[k], bounds[k + 1]) for k in range(pieces))
    return units


def _deal(units: list[Unit], objects: list[ObjectInfo], world_size: int) -> list[list[Unit]]:
    """Units per rank, balanced by bytes; each rank's list keeps the (shuffled) order of ``units``."""
    sizes = [u.nbytes(objects) for u in units]
    if len(units) < world_size:
        # Give the spare ranks to the units with the most bytes per reader, then split by stride.
        readers = [1] * len(units)
        for _ in range(world_size - len(units)):
            biggest = max(range(len(units)), key=lambda i: sizes[i] / readers[i])
            readers[biggest] += 1
        return [
            [replace(unit, stride=k, offset=j)]
            for unit, k in zip(units, readers, strict=True)
            for j in range(k)
        ]
    return [[units[i] for i in indexes] for indexes in balance(sizes, world_size)]


def balance(sizes: list[float], world_size: int) -> list[list[int]]:
    """Indexes of ``sizes`` per rank: largest first to the least-loaded rank (LPT), each rank's
    indexes ascending (so its list keeps the order given); ties keep that order too."""
    loads = [(0.0, rank) for rank in range(world_size)]
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, rank = heapq.heappop(loads)
        owned[rank].append(index)
        heapq.heappush(loads, (load + sizes[index], rank))
    return [sorted(indexes) for indexes in owned]


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
        units = _units(objects, source.format, chunk_bytes)
        if not units:
            raise DataError(f"data.sources[{index}].uri = {source.uri!r}: matches no non-empty file")
        random.Random(derive_seed(seed, "units", index)).shuffle(units)
        sources.append(SourcePlan(source.uri, list(objects), _deal(units, objects, world_size)))
    return ShardPlan(seed, world_size, chunk_bytes, sources, _fingerprint(listing))


def build_plan(
    data: DataSpec, store: StorageSpec, world_size: int, seed: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> ShardPlan:
    """List every source once and plan it (the driver's job, before any worker starts)."""
    return make_plan(data, list_sources(data, store), world_size, seed, chunk_bytes)


def _names(uris: list[str]) -> str:
    shown = ", ".join(uris[:3])
    return shown + (f" and {len(uris) - 3} more" if len(uris) > 3 else "")


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
