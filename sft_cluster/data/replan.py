"""A run's data re-planned onto another world size, from the cursors of its last commit.

Each old rank's cursor says, per source, where its stream stood at the start
of the packing window of its last consumed row (epoch, piece, record), and
which records of that window the consumed rows held (``taken``). Everything
after the window start except ``taken`` is what the rank still owed of each
epoch it had reached. ``replan`` gathers those remainders, for every epoch from
the earliest any old rank was in to the latest any rank took a record from
(and every epoch an earlier re-plan still owed), deals them to the new ranks
as pieces (units with cuts), and deals the epochs after them fresh for the
new world size. It reads no record: it costs what
making a plan costs, and the same inputs give the same plan (a restart that
re-plans again from the same commit gets the same one).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sft_cluster.data.plan import Piece, ShardPlan, SourcePlan, balance, make_plan
from sft_cluster.data.records import DataError
from sft_cluster.spec import DataSpec

__all__ = ["replan"]


def _check(plan: ShardPlan, cursors: list[dict[str, Any]]) -> None:
    if len(cursors) != plan.world_size:
        raise DataError(f"{len(cursors)} data cursors for a plan of {plan.world_size} ranks")
    for rank, cursor in enumerate(cursors):
        if (cursor["plan"], cursor["rank"]) != (plan.id, rank):
            raise DataError(
                f"the data cursor of rank {rank} is for plan {cursor['plan']} rank {cursor['rank']}, "
                f"not plan {plan.id}: the checkpoint does not belong to this data plan"
            )
        if "taken" not in cursor and cursor["skip"]:
            raise DataError(
                f"the data cursor of rank {rank} was written by an older version, which did not record "
                f"the records of its last packing window: resume on {plan.world_size} workers"
            )


def _owed(plan: ShardPlan, source: int, cursors: list[dict[str, Any]]) -> tuple[int, list[list[Piece]]]:
    """(first epoch, the pieces each epoch from it still owes): what the old ranks left of ``source``."""
    taken: dict[tuple[int, str], set[int]] = defaultdict(set)
    for cursor in cursors:
        for index, epoch, unit, number in cursor.get("taken", []):
            if index == source:
                taken[(epoch, unit)].add(number)
    positions = [cursor["window"]["positions"][source] for cursor in cursors]
    first = min(p["epoch"] for p in positions)
    # Up to the last epoch any rank took a record from, and every epoch the old plan still owed.
    last = max(
        [p["epoch"] for p in positions] + [epoch for epoch, _ in taken] + [plan.sources[source].fresh - 1]
    )
    epochs = []
    for epoch in range(first, last + 1):
        pieces = []
        for rank, position in enumerate(positions):
            if epoch < position["epoch"]:
                continue  # this rank had finished the epoch
            current = epoch == position["epoch"]
            order = plan.units(source, rank, epoch)
            for at in range(position["unit"] if current else 0, len(order)):
                piece = order[at]
                skip = position["record"] if current and at == position["unit"] else 0
                numbers = tuple(sorted(taken.get((epoch, piece.unit.key), ())))
                pieces.append(Piece(piece.unit, (*piece.cuts, (skip, numbers))) if skip or numbers else piece)
        epochs.append(pieces)
    return first, epochs


def replan(
    plan: ShardPlan, cursors: list[dict[str, Any]], data: DataSpec, world_size: int, step: int
) -> ShardPlan:
    """The plan that trains, on ``world_size`` ranks from optimizer step ``step``, every record
    ``plan``'s ranks had not consumed at ``cursors`` (their saved stream states, by rank)."""
    _check(plan, cursors)
    listing = [source.objects for source in plan.sources]
    dealt = make_plan(data, listing, world_size, plan.seed, plan.chunk_bytes)
    sources = []
    for index, (old, new) in enumerate(zip(plan.sources, dealt.sources, strict=True)):
        first, epochs = _owed(plan, index, cursors)
        owed: list[list[list[Piece]]] = [[] for _ in range(world_size)]
        for pieces in epochs:
            shares = balance([piece.unit.nbytes(old.objects) for piece in pieces], world_size)
            for rank, indexes in enumerate(shares):
                owed[rank].append([pieces[i] for i in indexes])
        sources.append(SourcePlan(new.uri, new.objects, new.ranks, owed, first, first + len(epochs)))
    entry = {"plan": plan.id, "from": plan.world_size, "to": world_size, "step": step}
    return ShardPlan(
        plan.seed, world_size, plan.chunk_bytes, sources, plan.fingerprint, [*plan.history, entry]
    )
