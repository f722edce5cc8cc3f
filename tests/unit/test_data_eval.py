"""The held-out eval split: never trained on, the same records whatever the world size."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from sft_cluster.data import list_sources, make_plan
from sft_cluster.data.evalset import eval_batches, eval_data, in_eval_split, train_filter
from sft_cluster.data.reader import RankStream
from sft_cluster.spec import DataSpec, StorageSpec
from tests.unit.test_data_plan import FakeEncoder, record

STORE = StorageSpec()


def _corpus(tmp_path: Path, count: int = 400) -> str:
    for part in range(3):
        rows = [record(rid) for rid in range(part, count, 3)]
        (tmp_path / f"part-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "part-*.jsonl")


def _ids(samples) -> list[int]:
    """The record id a FakeEncoder sample starts with."""
    return [sample.input_ids[0] - 10 for sample in samples]


def _one_epoch(data: DataSpec, world_size: int, keep) -> list[list[int]]:
    plan = make_plan(data, list_sources(data, STORE), world_size, seed=3)
    return [
        _ids(RankStream(plan, rank, data, STORE, FakeEncoder(), keep=keep).one_pass())
        for rank in range(world_size)
    ]


def test_split_is_a_stable_fraction_and_never_trained_on(tmp_path):
    data = DataSpec.model_validate(
        {"sources": [{"uri": _corpus(tmp_path)}], "max_seq_len": 64, "eval_fraction": 0.2}
    )
    held_out = {rid for rid in range(400) if in_eval_split((json.dumps(record(rid)) + "\n").encode(), 0.2)}
    assert 50 < len(held_out) < 110  # about 20% of 400
    for world_size in (1, 2, 3):
        trained = list(itertools.chain(*_one_epoch(data, world_size, train_filter(data))))
        assert sorted(trained) == sorted(set(range(400)) - held_out), world_size
        evaluated = list(itertools.chain(*_one_epoch(data, world_size, lambda raw: in_eval_split(raw, 0.2))))
        assert sorted(evaluated) == sorted(held_out), world_size


def test_no_fraction_trains_on_everything():
    assert train_filter(DataSpec.model_validate({"sources": [{"uri": "x.jsonl"}]})) is None


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_eval_batches_cover_the_eval_sources_once(tmp_path, world_size):
    (tmp_path / "train").mkdir()
    train_glob = _corpus(tmp_path / "train")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(record(1000 + i)) + "\n" for i in range(9)))
    data = DataSpec.model_validate(
        {"sources": [{"uri": train_glob}], "eval": [{"uri": str(tmp_path / "eval.jsonl")}], "max_seq_len": 64}
    )
    held_out = eval_data(data)
    plan = make_plan(held_out, list_sources(held_out, STORE), world_size, seed=3)
    seen = []
    for rank in range(world_size):
        batches = eval_batches(plan, rank, data, STORE, FakeEncoder(), micro_batch_size=2)
        assert batches, "every rank has at least one batch"
        for batch in batches:
            assert batch["input_ids"].shape[0] == 1  # padding-free, like training batches
            starts = batch["position_ids"][0] == 0
            seen += [int(t) - 10 for t in batch["input_ids"][0][starts] if int(t) >= 1000 + 10]
    assert sorted(seen) == list(range(1000, 1009))
