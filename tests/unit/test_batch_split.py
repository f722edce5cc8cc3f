"""The global batch split over any world size: accumulation adjusts, the micro batch only when allowed."""

from __future__ import annotations

import pytest

from sft_cluster.data import DataError
from sft_cluster.spec import JobSpec
from sft_cluster.train.batch import BatchSplit, batch_split, global_batch, with_split


def job(**train) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "split",
            "model": {"name_or_path": "builtin:tiny-llama"},
            "data": {"sources": [{"uri": "/d/*.jsonl"}]},
            "train": {"max_steps": 10, **train},
            "output_uri": "/tmp/split",
        }
    )


def test_accumulation_follows_the_world_size_and_keeps_the_global_batch():
    spec = job(micro_batch_size=2, grad_accum_steps=2)
    assert global_batch(spec, 2) == 8
    assert batch_split(spec, 2, 2) == BatchSplit(2, 2, 2)
    assert batch_split(spec, 1, 2) == BatchSplit(2, 4, 1)
    assert batch_split(spec, 4, 2) == BatchSplit(2, 1, 4)
    trained = with_split(spec, batch_split(spec, 1, 2)).train
    assert (trained.micro_batch_size, trained.grad_accum_steps) == (2, 4)


def test_a_split_that_does_not_fit_lists_the_world_sizes_and_the_field_that_would():
    with pytest.raises(DataError) as refused:
        batch_split(job(micro_batch_size=4), 4, 2)
    assert str(refused.value) == (
        "the run's global batch is 8 rows (train.micro_batch_size 4 x train.grad_accum_steps 1 x 2 workers), "
        "which does not split over 4 workers at micro batch 4: set resources.num_workers to one of 1, 2, or "
        "train.global_batch_size=8 to let the micro batch follow (then any of 1, 2, 4, 8)"
    )


def test_a_fixed_global_batch_lets_the_micro_batch_follow_up_to_the_jobs():
    spec = job(micro_batch_size=4, global_batch_size=12)
    assert batch_split(spec, 2, 2) == BatchSplit(3, 2, 2)  # 6 rows each: micro 3 (at most 4) x 2
    assert batch_split(spec, 4, 2) == BatchSplit(3, 1, 4)
    assert batch_split(spec, 3, 2) == BatchSplit(4, 1, 3)
    assert batch_split(spec, 12, 2) == BatchSplit(1, 1, 12)
    assert batch_split(spec, 1, 2).describe() == "12 rows = micro batch 4 x accumulation 3 x 1 workers"
    with pytest.raises(
        DataError, match=r"train.global_batch_size = 12 does not split over 5 workers; .* 1, 2, 3, 4, 6, 12$"
    ):
        batch_split(spec, 5, 2)
