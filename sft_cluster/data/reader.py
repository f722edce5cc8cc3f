"""This rank's samples: the units the plan gave it, read, shuffled, mixed by weight and tokenized.

``RankStream`` reads the units the plan gave this rank, one at a time and lazily
(``sft_cluster.data.units``: memory is a JSONL range, a Parquet row group or a
shuffle buffer per source), in an order seeded by (seed, epoch, unit), and
tokenizes them with the chat template, forever. Sources are mixed by
weight with a counter-based draw, so its whole state is a few integers.
``sft_cluster.data.stream`` packs these samples into rows.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from jinja2 import TemplateError

from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.plan import Piece, ShardPlan, derive_seed
from sft_cluster.data.records import BadRecords, DataError, source_options, to_conversation
from sft_cluster.data.units import apply_cuts, read_lines, read_unit
from sft_cluster.spec import DataSpec, StorageSpec

__all__ = ["Counters", "RankStream", "Sample", "read_lines", "read_unit"]


@dataclass(slots=True)
class Sample:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 = trained
    source: int
    epoch: int
    unit: str = ""  # the key of the unit it was read from, and its number there: which record it was
    number: int = 0

    @property
    def record(self) -> tuple[int, int, str, int]:
        """(source, epoch, unit key, number): names this record of this epoch in a re-plan."""
        return (self.source, self.epoch, self.unit, self.number)


@dataclass
class Counters:
    """What one source gave this rank so far (part of the cursor, so resume keeps counting)."""

    samples: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # over max_seq_len with truncation: drop
    untrained: int = 0  # no trained token left (after truncation): dropped, never trained silently
    bad: int = 0


@dataclass
class _Position:
    epoch: int = 0
    unit: int = 0  # index into this epoch's unit order
    record: int = 0  # records handed out of the current piece (a resume re-reads it and skips them)
    epoch_samples: int = 0  # a whole epoch without one sample is an error, not an endless loop


class RankStream:
    """This rank's samples, epoch after epoch, from ``state`` (a previous ``state()``) or the start."""

    def __init__(
        self,
        plan: ShardPlan,
        rank: int,
        data: DataSpec,
        store: StorageSpec,
        encoder: ChatEncoder,
        max_seq_len: int | None = None,
        state: dict[str, Any] | None = None,
        keep: Callable[[Any], bool] | None = None,
    ):
        """``keep(raw record)`` filters records before anything else (the train/eval split)."""
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is not in 0..{plan.world_size - 1}")
        planned, named = [source.uri for source in plan.sources], [source.uri for source in data.sources]
        if planned != named:
            raise DataError(f"the data plan is for sources {planned}, the job names {named}")
        self.plan, self.rank, self.data, self.encoder = plan, rank, data, encoder
        self.keep = keep
        self.max_seq_len = max_seq_len or data.max_seq_len
        state = state or {}
        count = len(plan.sources)
        self.draws: int = state.get("draws", 0)
        starts = [{"epoch": source.owed_from} for source in plan.sources]
        self.positions = [_Position(**p) for p in state.get("positions", starts)]
        self.counters = [Counters(**c) for c in state.get("counters", [{}] * count)]
        self.bad = BadRecords(data, sum(c.bad for c in self.counters), state.get("first_bad"))
        self._options = [source_options(source, data, store) for source in data.sources]
        self._cumulative = list(itertools.accumulate(source.weight for source in data.sources))
        self._orders: list[tuple[int, list[Piece]] | None] = [None] * count
        self._loaded: list[tuple[tuple[int, int], Iterator[tuple[int, Any]], Callable[[int], str]] | None]
        self._loaded = [None] * count

    def state(self) -> dict[str, Any]:
        """Small JSON: per source (epoch, unit, record, counters), the mixing counter, the first bad one."""
        return {
            "draws": self.draws,
            "positions": [asdict(p) for p in self.positions],
            "counters": [asdict(c) for c in self.counters],
            "first_bad": self.bad.first,
        }

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        while True:
            source = self._pick()
            unit, number, raw, locate = self._next_raw(source)
            sample = self._sample(source, raw, locate, self.positions[source].epoch)
            if sample is not None:
                sample.unit, sample.number = unit, number
                self.positions[source].epoch_samples += 1
                return sample

    def one_pass(self) -> Iterator[Sample]:
        """Every sample of this rank's share, once, source after source (an evaluation pass)."""
        for source in range(len(self.plan.sources)):
            for unit in self.plan.dealt_units(source, self.rank, 0):
                records, locate = self._load(source, Piece(unit), 0)
                for number, raw in records:
                    sample = self._sample(source, raw, partial(locate, number), 0)
                    if sample is not None:
                        yield sample

    def _sample(self, source: int, raw: Any, locate: Callable[[], str], epoch: int) -> Sample | None:
        """One raw record as a tokenized sample, or None (bad and skipped, dropped, or not in the split)."""
        if self.keep is not None and not self.keep(raw):
            return None
        counters = self.counters[source]
        try:
            conversation = to_conversation(raw, self.data.sources[source].columns, locate)
        except DataError as exc:
            counters.bad += 1
            self.bad.skip(exc)
            return None
        try:
            ids, mask = self.encoder.encode(conversation, conversation.tools)
        except (TemplateError, DataError, TypeError, ValueError) as exc:
            counters.bad += 1
            self.bad.skip(DataError(f"{locate()}: the chat template cannot render this record: {exc}"))
            return None
        if len(ids) > self.max_seq_len:
            if self.data.truncation == "drop":
                counters.dropped += 1
                return None
            ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
            counters.truncated += 1
        if not any(mask[1:]):  # the first token of a packed sequence is never a label
            counters.untrained += 1
            return None
        counters.samples += 1
        counters.tokens += len(ids)
        return Sample(ids, mask, source, epoch)

    def _pick(self) -> int:
        """The source of draw number ``draws``: a pure function of (seed, rank, draw), by weight."""
        draw, self.draws = self.draws, self.draws + 1
        if len(self._cumulative) == 1:
            return 0
        # A re-planned run mixes anew (its ranks are new); a plan never re-planned keeps its old draws.
        replans = (len(self.plan.history),) if self.plan.history else ()
        point = derive_seed(self.plan.seed, "mix", *replans, self.rank, draw) / 2**64 * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, point), len(self._cumulative) - 1)

    def _order(self, source: int, epoch: int) -> list[Piece]:
        cached = self._orders[source]
        if cached is None or cached[0] != epoch:
            cached = (epoch, self.plan.units(source, self.rank, epoch))
            self._orders[source] = cached
        return cached[1]

    def _next_raw(self, source: int) -> tuple[str, int, Any, Callable[[], str]]:
        """(unit key, number, raw record, namer) of the next record of ``source`` on this rank,
        moving on to the next unit or epoch."""
        position = self.positions[source]
        while True:
            order = self._order(source, position.epoch)
            if position.unit == len(order):
                # An epoch owed after a re-plan may leave this rank nothing; a fresh one may not.
                if position.epoch_samples == 0 and position.epoch >= self.plan.sources[source].fresh:
                    raise DataError(
                        f"data.sources[{source}] ({self.plan.sources[source].uri}) gave rank {self.rank} "
                        f"no sample in a whole pass over its {len(order)} unit(s) "
                        f"(so far {self.counters[source]}): "
                        "every record was bad, over max_seq_len or without a trained token, or there are "
                        "fewer records than ranks"
                    )
                position.epoch, position.unit, position.record, position.epoch_samples = (
                    position.epoch + 1,
                    0,
                    0,
                    0,
                )
                continue
            key = (position.epoch, position.unit)
            loaded = self._loaded[source]
            if loaded is None or loaded[0] != key:
                records, locate = self._load(source, order[position.unit], position.epoch)
                # A resume re-reads the piece from its start: skip what was handed out before.
                collections.deque(itertools.islice(records, position.record), maxlen=0)
                loaded = (key, records, locate)
                self._loaded[source] = loaded
            _, records, locate = loaded
            record = next(records, None)
            if record is not None:
                number, raw = record
                position.record += 1
                return order[position.unit].unit.key, number, raw, partial(locate, number)
            position.unit, position.record = position.unit + 1, 0
            self._loaded[source] = None

    def _load(
        self, source: int, piece: Piece, epoch: int
    ) -> tuple[Iterator[tuple[int, Any]], Callable[[int], str]]:
        """This rank's records of one piece, lazily, in ``epoch``'s order, and how to name one of them."""
        unit = piece.unit
        obj = self.plan.sources[source].objects[unit.file]
        seed = derive_seed(self.plan.seed, "records", source, epoch, unit.key)
        records, locate = read_unit(obj, unit, self.data.sources[source].format, self._options[source], seed)
        return apply_cuts(records, piece.cuts), locate
