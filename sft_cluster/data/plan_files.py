"""How a shard plan is stored: a small header every rank reads, and one section per rank.

At a million objects and a thousand ranks a plan is about 100 MB; no rank
needs more than its own part of it. So a plan is stored as

- a **header** (one line of JSON, kilobytes): seed, world size, sources,
  history, the plan's id, and the byte offsets of the sections in the body;
- a **body**: one JSON line per rank (its units, the owed pieces of a re-plan,
  and the objects they name, by index), then one line of the objects no rank
  reads (empty ones), which only a comparison of listings needs.

A rank reads the header and its own byte range of the body (``decode`` with a
rank); the driver reads everything (``decode`` without one). The id is a
hash of the header and of the body as it was written once, never of a text
made again. Plans stored before this layout (version 1: one JSON document)
are still read, under the id they had.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sft_cluster.data.plan import DealtUnits, Piece, ShardPlan, SourcePlan, Unit
from sft_cluster.data.records import DataError, ObjectInfo

__all__ = ["EncodedPlan", "decode", "decode_text", "encode"]

VERSION = 2
_OLD_VERSION = 1
ReadRange = Callable[[int, int], bytes]  # (start, end) of the body -> those bytes


@dataclass(frozen=True)
class EncodedPlan:
    id: str
    header: str  # one line of JSON
    body: bytes  # a line per rank, then the objects no rank reads


def _object(index: int, obj: ObjectInfo) -> list[Any]:
    return [index, obj.uri, obj.size, obj.version]


def _rows(source: SourcePlan, rank: int) -> list[list[Any]]:
    if isinstance(source.ranks, DealtUnits):
        return source.ranks.rows(rank)
    return [[u.file, u.start, -1 if u.end is None else u.end, u.stride, u.offset] for u in source.ranks[rank]]


def _section(plan: ShardPlan, rank: int, named: list[np.ndarray]) -> bytes:
    parts = []
    for index, source in enumerate(plan.sources):
        units = _rows(source, rank)
        owed = [[p.to_json() for p in epoch] for epoch in source.owed[rank]] if source.owed else []
        files = {row[0] for row in units} | {p[0][0] for epoch in owed for p in epoch}
        named[index][list(files)] = True
        part: dict[str, Any] = {
            "objects": [_object(f, source.objects[f]) for f in sorted(files)],
            "units": units,
        }
        if source.owed:
            part["owed"] = owed
        parts.append(part)
    return json.dumps(parts, separators=(",", ":")).encode()


def encode(plan: ShardPlan) -> EncodedPlan:
    """The header and body of ``plan`` (see the module docstring), and its id."""
    named = [np.zeros(len(source.objects), dtype=bool) for source in plan.sources]
    sections = [_section(plan, rank, named) for rank in range(plan.world_size)]
    unread = [
        {"objects": [_object(f, source.objects[f]) for f in np.flatnonzero(~seen).tolist()]}
        for source, seen in zip(plan.sources, named, strict=True)
    ]
    sections.append(json.dumps(unread, separators=(",", ":")).encode())
    body = b"\n".join(sections)
    offsets = [0]
    for section in sections:
        offsets.append(offsets[-1] + len(section) + 1)
    core: dict[str, Any] = {
        "version": VERSION,
        "seed": plan.seed,
        "world_size": plan.world_size,
        "chunk_bytes": plan.chunk_bytes,
        "fingerprint": plan.fingerprint,
        "sources": [
            {"uri": s.uri, "objects": len(s.objects), "owed_from": s.owed_from, "fresh": s.fresh}
            for s in plan.sources
        ],
        **({"history": plan.history} if plan.history else {}),
    }
    digest = hashlib.sha256(json.dumps(core, sort_keys=True).encode())
    digest.update(hashlib.blake2b(body).digest())
    plan_id = plan.saved_id or digest.hexdigest()[:16]
    header = json.dumps({**core, "id": plan_id, "sections": offsets}, separators=(",", ":"))
    return EncodedPlan(plan_id, header, body)


def _unit(row: list[Any]) -> Unit:
    file, start, end, stride, offset = row
    return Unit(file, start, None if end is None or end < 0 else end, stride, offset)


def decode(header: str, read: ReadRange | None, rank: int | None = None) -> ShardPlan:
    """The plan a header names: the whole of it (``rank`` None), ``rank``'s own view (its section
    only), or, with no body to ``read``, the header alone (seed, sources, history; no units)."""
    raw = json.loads(header)
    if raw.get("version") == _OLD_VERSION:
        return _decode_old(header, raw)
    if raw.get("version") != VERSION:
        raise DataError(f"data plan version {raw.get('version')!r} is not {VERSION}; re-plan the run")
    offsets, world = raw["sections"], raw["world_size"]
    sources = raw["sources"]
    objects: list[Any] = [{} for _ in sources]
    ranks: list[dict[int, list[Unit]]] = [{} for _ in sources]
    owed: list[dict[int, list[list[Piece]]]] = [{} for _ in sources]
    if read is not None:
        wanted = range(world + 1) if rank is None else [rank]
        start, end = offsets[wanted[0]], offsets[wanted[-1] + 1] - 1
        lines = read(start, end).split(b"\n")
        for at, line in zip(wanted, lines, strict=True):
            parts = json.loads(line)
            for index, part in enumerate(parts):
                objects[index].update((o[0], ObjectInfo(*o[1:])) for o in part["objects"])
                if at < world:
                    ranks[index][at] = [_unit(row) for row in part["units"]]
                    if "owed" in part:
                        owed[index][at] = [[Piece.from_json(p) for p in epoch] for epoch in part["owed"]]
    whole = rank is None and read is not None
    plans = [
        SourcePlan(
            source["uri"],
            [objects[i][f] for f in range(source["objects"])] if whole else objects[i],
            [ranks[i][r] for r in range(world)] if whole else ranks[i],
            ([owed[i][r] for r in range(world)] if whole else owed[i]) if source["fresh"] else [],
            source["owed_from"],
            source["fresh"],
        )
        for i, source in enumerate(sources)
    ]
    history = raw.get("history", [])
    return ShardPlan(
        raw["seed"], world, raw["chunk_bytes"], plans, raw["fingerprint"], history, saved_id=raw["id"]
    )


def decode_text(text: str) -> ShardPlan:
    """A whole plan from ``ShardPlan.to_json`` (or a version-1 document)."""
    header, _, body = text.partition("\n")
    data = body.encode()
    return decode(header, lambda start, end: data[start:end])


def _decode_old(text: str, raw: dict[str, Any]) -> ShardPlan:
    """A version-1 plan: one JSON document, whose id was the hash of its text."""
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
    return ShardPlan(
        raw["seed"],
        raw["world_size"],
        raw["chunk_bytes"],
        sources,
        raw["fingerprint"],
        raw.get("history", []),
        saved_id=hashlib.sha256(text.encode()).hexdigest()[:16],
    )
