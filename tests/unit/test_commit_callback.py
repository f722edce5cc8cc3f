"""The commit callback on one process and a real local store: re-saves and stops at the end."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from sft_cluster.checkpoint import CheckpointStore, Manifest, hash_local_dir
from sft_cluster.spec import CheckpointSpec
from sft_cluster.train import signals
from sft_cluster.train.checkpointing import CommitCallback


def _stage(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(content)
    (folder / "zz-optimizer.pt").write_bytes(content * 2)
    return folder


def test_a_resaved_step_stops_looking_committed_before_its_files_land(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
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
    callback = CommitCallback(CheckpointStore(str(tmp_path / "run")), CheckpointSpec(), rank=0, world_size=1)
    signals.STOP_REQUESTED.set()
    try:
        control = callback.on_step_end(None, TrainerState(global_step=step, max_steps=20), TrainerControl())
    finally:
        signals.STOP_REQUESTED.clear()
    assert callback.stopped_for_preemption is stops
    assert control.should_training_stop is stops and control.should_save is stops
