"""Best-fit packing of tokenized samples into fixed-length rows.

Rows are padding-free in the attention sense: each packed sequence's
``position_ids`` restart at 0, which is how transformers tells the sequences
of a row apart when no attention mask is given, so no token attends across a
boundary. Padding at the end of a row is one more run of positions, with no
loss on it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "Row", "best_fit", "make_row", "pack"]


@dataclass(slots=True)
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    tokens: int  # real (non-padding) tokens, for packing efficiency
    members: tuple[int, ...] = ()  # which of the packed window's samples it holds (by index)
    records: list[list[Any]] = field(default_factory=list)  # and which records they are (the stream's names)


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: indexes of ``lengths`` per row, rows in the order they were opened.

    Longest first, each into the fullest row it fits in (ties: the older row);
    lengths over ``capacity`` count as ``capacity``. Deterministic.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = min(lengths[index], capacity)
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            rows.append([index])
            bisect.insort(free, (capacity - length, len(rows) - 1))
            continue
        room, row = free.pop(at)
        rows[row].append(index)
        bisect.insort(free, (room - length, row))
    return rows


def make_row(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], length: int, pad_id: int) -> Row:
    """One row of ``length`` tokens from (input_ids, trained mask) pairs that fit in it.

    The first token of each sequence gets no label: the model's shifted loss
    would otherwise train the previous sequence's last token to predict it.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for seq_ids, mask in sequences:
        ids.extend(seq_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(t if m else IGNORE_INDEX for t, m in zip(seq_ids[1:], mask[1:], strict=True))
        positions.extend(range(len(seq_ids)))
    tokens = len(ids)
    if tokens > length:
        raise ValueError(f"{tokens} tokens do not fit in a row of {length}")
    pad = length - tokens
    ids.extend([pad_id] * pad)
    labels.extend([IGNORE_INDEX] * pad)
    positions.extend(range(pad))
    return Row(ids, labels, positions, tokens)


def pack(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]], length: int, pad_id: int, packing: bool = True
) -> list[Row]:
    """Rows for a window of samples (each at most ``length`` tokens): best-fit, or one per row."""
    groups = (
        best_fit([len(ids) for ids, _ in samples], length) if packing else [[i] for i in range(len(samples))]
    )
    rows = []
    for group in groups:
        row = make_row([samples[i] for i in group], length, pad_id)
        row.members = tuple(group)
        rows.append(row)
    return rows
