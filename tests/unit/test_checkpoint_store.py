"""The commit protocol, verification, fallback and retention on real filesystems."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sft_cluster.checkpoint import CheckpointStore, Manifest, hash_local_dir


def _save(store: CheckpointStore, tmp: Path, step: int, commit: bool = True) -> None:
    local = tmp / f"local-{step}"
    (local / "sub").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(bytes([step % 256]) * (1000 + step))
    (local / "sub" / "cursor-rank0.json").write_text(f'{{"step": {step}}}')
    store.upload(local, step)
    if commit:
        store.commit(Manifest(step=step, files=hash_local_dir(local)))


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    import fsspec

    fsspec.filesystem("memory").store.clear()
    return CheckpointStore(f"memory://run-{tmp_path.name}/checkpoints")


def test_only_committed_checkpoints_count(store, tmp_path):
    _save(store, tmp_path, 10)
    _save(store, tmp_path, 20, commit=False)
    assert store.steps() == [10, 20]
    assert store.committed_steps() == [10]
    latest = store.latest()
    assert latest is not None and latest.step == 10
    assert set(latest.manifest.files) == {"model.safetensors", "sub/cursor-rank0.json"}


def test_corrupt_newest_falls_back_and_says_which(store, tmp_path, caplog):
    for step in (10, 20, 30):
        _save(store, tmp_path, step)
    # Truncate a file of the newest; drop the marker of the middle one.
    with store.fs.open(f"{store.path}/step-00000030/model.safetensors", "wb") as handle:
        handle.write(b"x")
    store.fs.rm(f"{store.path}/step-00000020/COMMITTED")
    with caplog.at_level(logging.WARNING, logger="sft_cluster.checkpoint"):
        latest = store.latest()
    assert latest is not None and latest.step == 10
    text = caplog.text
    assert "step-00000030" in text and "model.safetensors has 1 bytes" in text
    assert "step-00000020" in text and "no COMMITTED marker" in text


def test_same_size_corruption_needs_the_hash(store, tmp_path):
    _save(store, tmp_path, 10)
    _save(store, tmp_path, 20)
    path = f"{store.path}/step-00000020/model.safetensors"
    size = store.fs.size(path)
    with store.fs.open(path, "wb") as handle:
        handle.write(b"\xff" * size)
    assert store.latest(fast=True).step == 20  # sizes only: cannot see it
    assert store.latest().step == 10


def test_retention_keeps_last_and_every_n_and_never_the_newest(store, tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(store, tmp_path, step)
    _save(store, tmp_path, 60, commit=False)  # a save in progress
    deleted = store.prune(keep_last=2, keep_every=20)
    assert deleted == [10, 30]
    assert store.steps() == [20, 40, 50, 60]
    assert store.committed_steps() == [20, 40, 50]


def test_prune_without_any_commit_deletes_nothing(store, tmp_path):
    _save(store, tmp_path, 10, commit=False)
    assert store.prune(keep_last=1) == []
    assert store.steps() == [10]


def _corrupt_same_size(store: CheckpointStore, step: int) -> None:
    path = f"{store.path}/step-{step:08d}/model.safetensors"
    size = store.fs.size(path)
    with store.fs.open(path, "wb") as handle:
        handle.write(b"\xff" * size)


def test_retention_counts_only_commits_that_verify(store, tmp_path):
    """keep_last=1 with a corrupt newest commit must not delete the last good checkpoint."""
    _save(store, tmp_path, 10)
    _save(store, tmp_path, 20)
    _corrupt_same_size(store, 20)
    assert store.prune(keep_last=1) == []  # 20 does not count; 10 is the newest that verifies
    assert store.committed_steps() == [10, 20]
    _save(store, tmp_path, 30)  # a good commit after the corrupt one: both older ones go
    assert store.prune(keep_last=1) == [10, 20]
    assert store.latest().step == 30


def test_retention_without_any_verified_commit_deletes_nothing(store, tmp_path):
    _save(store, tmp_path, 10)
    _save(store, tmp_path, 20)
    _corrupt_same_size(store, 10)
    _corrupt_same_size(store, 20)
    assert store.prune(keep_last=1) == []
    assert store.steps() == [10, 20]


def test_begin_removes_the_old_marker_before_a_resave(store, tmp_path):
    """Re-saving a committed step: it stops looking committed before any new file lands."""
    _save(store, tmp_path, 10)
    assert store.is_committed(10)
    store.begin(10)
    assert not store.is_committed(10)
    assert not store.fs.exists(f"{store.path}/step-00000010/manifest.json")
    assert store.latest() is None
    store.begin(20)  # a step with no folder yet: nothing to do


def test_each_rank_fetches_its_own_files_and_one_rank_per_node_the_shared_ones():
    from sft_cluster.checkpoint.manifest import files_to_fetch, owning_rank

    names = [
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "data-cursor/rank-00000.json",
        "data-cursor/rank-00001.json",
        "global_step10/mp_rank_00_model_states.pt",
        "global_step10/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "global_step10/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "pytorch_model_fsdp_0/__1_0.distcp",
    ]
    manifest = Manifest(step=10, files={n: {"size": 1, "sha256": "x"} for n in names})
    assert owning_rank("rng_state_12.pth") == 12 and owning_rank("pytorch_model_fsdp_0/__1_0.distcp") is None
    assert files_to_fetch(manifest, [1], shared=False) == [
        "data-cursor/rank-00001.json",
        "global_step10/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_state_1.pth",
    ]
    shared = set(files_to_fetch(manifest, [0], shared=True))
    assert "rng_state_1.pth" not in shared and "data-cursor/rank-00001.json" not in shared
    assert {"model.safetensors", "optimizer.pt", "pytorch_model_fsdp_0/__1_0.distcp"} <= shared
