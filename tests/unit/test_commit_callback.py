"""The commit callback on one process and a real local store: re-saves, stops at the end, and the
named states it saves per rank (the data cursor as of a step)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from sft_cluster.checkpoint import CheckpointStore, Manifest, hash_local_dir
from sft_cluster.data import DataError, build_plan
from sft_cluster.data.stream import PackedDataset
from sft_cluster.spec import CheckpointSpec, StorageSpec
from sft_cluster.train import signals
from sft_cluster.train.checkpointing import CommitCallback, restore_states
from sft_cluster.train.trainer import StepCursor
from tests.unit.test_data_plan import FakeEncoder, record, spec, write_corpus


def _stage(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(content)
    (folder / "zz-optimizer.pt").write_bytes(content * 2)
    return folder


def test_a_resaved_step_stops_looking_committed_before_its_files_land(tmp_path):
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    old = _stage(tmp_path / "old", b"old" * 100)
    store.upload(old, 10)
    store.commit(Manifest(step=10, files=hash_local_dir(old)))
    assert store.is_committed(10)
    # The retrained step 10 is saved again; its upload dies half-way (the model lands, the
    # optimizer cannot: a folder stands where it goes, an error that is not transient).
    _stage(tmp_path / "trainer" / "checkpoint-10", b"new" * 100)
    (Path(store.path) / "step-00000010" / "zz-optimizer.pt").unlink()
    (Path(store.path) / "step-00000010" / "zz-optimizer.pt").mkdir()
    callback = CommitCallback(store, CheckpointSpec(async_upload=False), rank=0, world_size=1)
    with pytest.raises(
        RuntimeError, match=r"uploading checkpoint step 10 failed \(rank 0: IsADirectoryError"
    ):
        callback.on_save(
            SimpleNamespace(output_dir=str(tmp_path / "trainer")),
            TrainerState(global_step=10),
            TrainerControl(),
        )
    # The folder holds the new model and no optimizer: it must not look committed.
    assert (Path(store.path) / "step-00000010" / "model.safetensors").read_bytes() == b"new" * 100
    assert not store.is_committed(10)
    assert store.latest(fast=True) is None


@pytest.mark.parametrize(("step", "stops"), [(19, True), (20, False)])
def test_a_stop_request_during_the_last_step_lets_the_run_complete(tmp_path, step, stops):
    callback = CommitCallback(
        CheckpointStore(str(tmp_path / "run" / "checkpoints")), CheckpointSpec(), rank=0, world_size=1
    )
    signals.STOP_REQUESTED.set()
    try:
        control = callback.on_step_end(None, TrainerState(global_step=step, max_steps=20), TrainerControl())
    finally:
        signals.STOP_REQUESTED.clear()
    assert callback.stopped_for_preemption is stops
    assert control.should_training_stop is stops and control.should_save is stops


def test_a_save_request_commits_the_step_at_once_and_training_goes_on(tmp_path):
    """What an elastic group asks before Ray Train resizes it: this step saved and committed
    before the next one (even with async uploads), training not stopped, the request spent."""
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    callback = CommitCallback(store, CheckpointSpec(async_upload=True), rank=0, world_size=1)
    signals.SAVE_REQUESTED.set()
    try:
        control = callback.on_step_end(None, TrainerState(global_step=7, max_steps=20), TrainerControl())
    finally:
        requested_after = signals.SAVE_REQUESTED.is_set()
        signals.SAVE_REQUESTED.clear()
    assert control.should_save and not control.should_training_stop and not requested_after
    _stage(tmp_path / "trainer" / "checkpoint-7", b"weights" * 10)
    callback.on_save(
        SimpleNamespace(output_dir=str(tmp_path / "trainer")), TrainerState(global_step=7), control
    )
    assert callback.pending is None and store.is_committed(7) and callback.committed == [7]
    assert not callback.stopped_for_preemption


class _Counter:
    """A Stateful whose whole state is one number."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict) -> None:
        self.value = state_dict["value"]


def test_named_states_are_saved_per_rank_in_the_checkpoint_and_restored(tmp_path):
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    _stage(tmp_path / "trainer" / "checkpoint-10", b"model")
    callback = CommitCallback(
        store, CheckpointSpec(async_upload=False), rank=0, world_size=1, states={"data-cursor": _Counter(7)}
    )
    callback.on_save(
        SimpleNamespace(output_dir=str(tmp_path / "trainer")), TrainerState(global_step=10), TrainerControl()
    )
    assert store.is_committed(10) and "data-cursor/rank-00000.json" in store.read_manifest(10).files
    folder = store.local_folder(10)
    assert json.loads((folder / "data-cursor" / "rank-00000.json").read_text()) == {"value": 7}
    restored = _Counter()
    restore_states(folder, {"data-cursor": restored}, rank=0)
    assert restored.value == 7
    with pytest.raises(DataError, match="checkpoint step-00000010 has no data cursor for rank 1 "):
        restore_states(folder, {"data-cursor": _Counter()}, rank=1)


def test_the_cursor_saved_at_a_step_is_where_the_rows_of_that_step_end(tmp_path):
    data = spec((write_corpus(tmp_path, "c", [[record(i) for i in range(30)]], [False]), 1.0))
    plan = build_plan(data, StorageSpec(), 1, 0)
    dataset = PackedDataset(plan, 0, data, StorageSpec(), FakeEncoder(), window_rows=2)
    cursor = StepCursor(dataset, rows_per_step=3)
    with pytest.raises(RuntimeError, match="must be one of the Trainer's callbacks"):
        cursor.state_dict()
    rows = iter(dataset)
    for _ in range(7):  # the DataLoader reads ahead of the optimizer
        next(rows)
    cursor.on_step_end(None, TrainerState(global_step=2), TrainerControl())
    assert cursor.state_dict() == dataset.state_after(6) and cursor.state_dict()["rows"] == 6
    fresh = PackedDataset(plan, 0, data, StorageSpec(), FakeEncoder(), window_rows=2)
    StepCursor(fresh, rows_per_step=3).load_state_dict(json.loads(json.dumps(cursor.state_dict())))
    assert fresh.rows.rows_out == 6
