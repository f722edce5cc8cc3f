"""How many rows one epoch of a rank's share packs into, counted with the stream's own code.

``train.epochs`` needs a step count before training starts, and only the
packed rows tell it: packing depends on every sample's token length, so the
records must be read and tokenized exactly as training will. ``count_rows``
draws this rank's samples from a real ``RankStream`` (same units, shuffle,
source mixing, eval split, bad-record policy, truncation and drops), keeps
only their lengths, and packs those in the windows ``PackedRowStream`` uses,
with the packer's own ``best_fit``.

An epoch is every record of every source seen at least once: the samples
drawn until the last source finishes its pass (one pass with one source;
with several, sources weighted above their share of the data repeat within
it). Its last window holds the rest of the pass alone, where the stream
would already mix in the next epoch's first samples.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from typing import Any

from sft_cluster.data.packing import best_fit
from sft_cluster.data.plan import ShardPlan
from sft_cluster.data.stream import WINDOW_ROWS, RankStream
from sft_cluster.spec import DataSpec, StorageSpec

__all__ = ["WINDOW_ROWS", "count_rows", "epoch_lengths", "rows_of"]


def epoch_lengths(
    plan: ShardPlan,
    rank: int,
    data: DataSpec,
    store: StorageSpec,
    encoder: Any,
    keep: Callable[[Any], bool] | None = None,
) -> array:
    """Token lengths of this rank's samples of one epoch, in the order training draws them.

    ``encoder`` is what the trainer's ``PackedDataset`` gets (passed through
    untouched). Data errors surface here, before anything trains.
    """
    stream = RankStream(plan, rank, data, store, encoder, keep=keep)
    lengths = array("I")
    pending = set(range(len(plan.sources)))  # sources still in their first pass
    end = 0  # draws up to the last first-pass sample seen so far
    for sample in stream:
        if sample.epoch > 0:
            # This source's pass ended at its previous sample; the epoch ends with the last source's.
            pending.discard(sample.source)
            if not pending:
                break
        lengths.append(len(sample.input_ids))
        if sample.epoch == 0:
            end = len(lengths)
    del lengths[end:]
    return lengths


def rows_of(lengths: Iterable[int], data: DataSpec, window_rows: int = WINDOW_ROWS) -> int:
    """Rows ``PackedRowStream`` packs these samples into: its windows, each packed best-fit.

    A window takes samples until it holds ``window_rows * max_seq_len`` tokens
    (``window_rows`` samples without packing); the last one holds the rest.
    """
    budget, capacity = window_rows * data.max_seq_len, data.max_seq_len
    rows, window, tokens = 0, [], 0
    for length in lengths:
        window.append(length)
        tokens += length
        if (tokens >= budget) if data.packing else (len(window) >= window_rows):
            rows += len(best_fit(window, capacity)) if data.packing else len(window)
            window, tokens = [], 0
    if window:
        rows += len(best_fit(window, capacity)) if data.packing else len(window)
    return rows


def count_rows(
    plan: ShardPlan,
    rank: int,
    data: DataSpec,
    store: StorageSpec,
    encoder: Any,
    keep: Callable[[Any], bool] | None = None,
    window_rows: int = WINDOW_ROWS,
) -> int:
    """Packed rows of one epoch of ``rank``'s share (see the module docstring)."""
    return rows_of(epoch_lengths(plan, rank, data, store, encoder, keep), data, window_rows)
