"""Held-out evaluation data: a deterministic slice of the training records, or separate sources.

``data.eval_fraction`` puts a record in the eval split by a hash of its own
content, so the split does not depend on the world size, the seed, the file
layout or a resume, and two copies of a record never land on both sides.
Training skips exactly those records (``train_filter``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch

from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.packing import make_row, pack
from sft_cluster.data.plan import ShardPlan
from sft_cluster.data.stream import RankStream, collate_rows, pad_id_of, row_tensors
from sft_cluster.spec import DataSpec, StorageSpec


def in_eval_split(raw: Any, fraction: float) -> bool:
    """Whether a raw record (JSONL bytes or a parsed record) is held out; bad records never are."""
    if isinstance(raw, Exception):
        return False
    key = raw if isinstance(raw, bytes) else json.dumps(raw, sort_keys=True, default=str).encode()
    point = int.from_bytes(hashlib.blake2b(key.strip(), digest_size=8).digest(), "big")
    return point / 2**64 < fraction


def train_filter(data: DataSpec) -> Callable[[Any], bool] | None:
    """The records training keeps: all but the eval split (None: keep everything)."""
    if data.eval_fraction <= 0:
        return None
    fraction = data.eval_fraction
    return lambda raw: not in_eval_split(raw, fraction)


def eval_data(data: DataSpec) -> DataSpec:
    """The DataSpec an eval plan is made from: ``data.eval``'s sources with the training settings."""
    return data.model_copy(update={"sources": data.eval, "eval": []})


def eval_batches(
    plan: ShardPlan,
    rank: int,
    data: DataSpec,
    store: StorageSpec,
    encoder: ChatEncoder,
    micro_batch_size: int,
) -> list[dict[str, torch.Tensor]]:
    """This rank's eval batches, packed like training rows; at least one (padding, when it has none).

    ``plan`` is the eval plan for ``data.eval`` sources, or the training plan
    with ``data.eval_fraction`` (this rank's share, read once, eval records kept).
    """
    if data.eval:
        stream = RankStream(plan, rank, eval_data(data), store, encoder)
    else:
        fraction = data.eval_fraction
        stream = RankStream(plan, rank, data, store, encoder, keep=lambda raw: in_eval_split(raw, fraction))
    samples = [(s.input_ids, s.assistant_mask) for s in stream.one_pass()]
    pad = pad_id_of(encoder.tokenizer)
    rows = pack(samples, data.max_seq_len, pad, data.packing) or [make_row([], data.max_seq_len, pad)]
    tensors = [row_tensors(row) for row in rows]
    return [collate_rows(tensors[i : i + micro_batch_size]) for i in range(0, len(tensors), micro_batch_size)]
