"""Checkpoint writes off the step (``train/snapshot.py``, ``compat.DeferredCheckpointWrites``): the
deferred files are the Trainer's own, byte for byte, written from a copy taken at the save; the
commit callback uploads them with the rest; a write that fails leaves the step uncommitted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from sft_cluster.checkpoint import CheckpointStore, Manifest, hash_local_dir
from sft_cluster.spec import CheckpointSpec, resolve_builtin
from sft_cluster.train import compat
from sft_cluster.train.checkpointing import CommitCallback
from sft_cluster.train.snapshot import DeferredWrites, host_copy
from sft_cluster.train.trainer import StreamingSFTTrainer


class _Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(index, index + 16) % 50
        return {"input_ids": ids, "labels": ids}


class _Deferring(compat.DeferredCheckpointWrites, Trainer):
    writes: DeferredWrites | None = None

    def deferred_writes(self) -> DeferredWrites | None:
        return self.writes


def _trained(tmp_path: Path) -> _Deferring:
    config = AutoConfig.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = _Deferring(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    return trainer


def _save(trainer: _Deferring, writes: DeferredWrites | None) -> Path:
    trainer.writes = writes
    trainer._save_checkpoint(trainer.model, None)
    return compat.trainer_checkpoint_dir(trainer.args.output_dir, trainer.state.global_step)


def test_deferred_files_are_the_trainers_own_written_from_the_copy_taken_at_the_save(tmp_path):
    assert StreamingSFTTrainer._save is compat.DeferredCheckpointWrites._save
    trainer = _trained(tmp_path)
    direct = _save(trainer, None).rename(tmp_path / "direct")
    writes = DeferredWrites()
    folder = _save(trainer, writes)
    assert len(writes) == 2 and not (folder / "model.safetensors").exists()
    assert not (folder / "optimizer.pt").exists()
    live = [p.detach().clone() for p in trainer.model.parameters()]
    with torch.no_grad():  # training goes on while the files are written
        for param in trainer.model.parameters():
            param.add_(1.0)
    written = writes.run(folder)
    assert "model.safetensors" in written and "optimizer.pt" in written and len(writes) == 0
    names = sorted(p.relative_to(direct).as_posix() for p in direct.rglob("*") if p.is_file())
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == names
    for name in names:
        # Byte-equal files load to the same state through Trainer._load_from_checkpoint and
        # _load_optimizer_and_scheduler: resume reads them unchanged.
        assert (folder / name).read_bytes() == (direct / name).read_bytes(), (
            f"compat.DeferredCheckpointWrites: the deferred {name} differs from the Trainer's own; an "
            "upgrade changed Trainer._save_checkpoint/_save/_save_optimizer_and_scheduler: re-check it"
        )
    # The next save refills the same host tensors, with the state as it is then.
    buffers = {name: id(tensor) for name, tensor in trainer._host_buffers.items()}
    folder.rename(tmp_path / "first")
    direct = _save(trainer, None).rename(tmp_path / "direct-2")
    writes = DeferredWrites()
    writes.run(_save(trainer, writes))
    assert {name: id(tensor) for name, tensor in trainer._host_buffers.items()} == buffers
    assert (folder / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()
    assert (folder / "optimizer.pt").read_bytes() == (direct / "optimizer.pt").read_bytes()
    trainer._load_from_checkpoint(str(tmp_path / "first"))
    assert all(torch.equal(p, saved) for p, saved in zip(trainer.model.parameters(), live, strict=True))


def test_host_copy_keeps_tied_tensors_tied_and_leaves_the_live_state_alone():
    weight = torch.ones(3, 2)
    state = {"embed": weight, "head": weight.detach(), "groups": [{"betas": (0.9, 0.99), "lr": 1e-3}]}
    copy = host_copy(state)
    assert copy["embed"] is copy["head"] and copy["embed"] is not weight
    weight.add_(1.0)
    assert torch.equal(copy["embed"], torch.ones(3, 2)) and copy["groups"] == state["groups"]


def _commit_with(tmp_path: Path, write) -> tuple[CheckpointStore, CommitCallback]:
    """Step 5 committed, then step 10 saved with ``write`` deferred to the upload thread."""
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old")
    store.upload(old, 5)
    store.commit(Manifest(step=5, files=hash_local_dir(old)))
    callback = CommitCallback(store, CheckpointSpec(async_upload=True), rank=0, world_size=1)
    local = compat.trainer_checkpoint_dir(str(tmp_path / "trainer"), 10)
    local.mkdir(parents=True)
    (local / "rng_state.pth").write_bytes(b"rng")
    writes = callback.defer_writes()
    writes.add(lambda: write(local))
    callback.on_save(
        SimpleNamespace(output_dir=str(tmp_path / "trainer")), TrainerState(global_step=10), TrainerControl()
    )
    return store, callback


def test_deferred_files_are_uploaded_and_in_the_manifest(tmp_path):
    store, callback = _commit_with(tmp_path, lambda local: (local / "optimizer.pt").write_bytes(b"adam"))
    callback.finish()
    files = store.read_manifest(10).files
    assert sorted(files) == ["optimizer.pt", "rng_state.pth"] and files["optimizer.pt"]["size"] == 4
    assert (store.local_folder(10) / "optimizer.pt").read_bytes() == b"adam"


def test_a_deferred_write_that_fails_leaves_the_step_uncommitted(tmp_path):
    def fail(local: Path) -> None:
        raise OSError("No space left on device")

    store, callback = _commit_with(tmp_path, fail)
    with pytest.raises(RuntimeError, match=r"checkpoint step 10 failed \(rank 0: OSError: No space left"):
        callback.finish()
    assert not store.is_committed(10) and store.latest(fast=True).step == 5


def _fsdp2_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: an FSDP2 model one step into training saves its shards both ways."""
    import os
    import threading

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    from sft_cluster.train import collectives
    from sft_cluster.train.snapshot import staged_sharded_save

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(resolve_builtin("builtin:tiny-llama"))
        )
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step() -> None:
            ids = torch.arange(32).reshape(2, 16) % 50
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        step()
        stager = compat.sharded_stager(pinned=False)
        for save in (1, 2):  # the second save refills the first one's host copy
            # What accelerate's save_fsdp_model and save_fsdp_optimizer write at this step.
            for key, state in (
                ("model", get_model_state_dict(model)),
                ("optimizer", get_optimizer_state_dict(model, optimizer)),
            ):
                folder = "pytorch_model_fsdp_0" if key == "model" else "optimizer_0"
                dcp.save({key: state}, checkpoint_id=f"{out}/direct-{save}/{folder}")
            write = staged_sharded_save(model, optimizer, f"{out}/staged-{save}", stager)
            step()  # training goes on before the write, and beside it, with its own collectives
            writer = threading.Thread(target=write)
            writer.start()
            for _ in range(20):
                collectives.barrier()
            writer.join()
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_are_written_from_the_copy_taken_at_the_save(tmp_path):
    """``snapshot.staged_sharded_save`` (FSDP2, issue #17.1) on two gloo ranks: accelerate's sharded
    layout, the state as it was at the save although training went on, written in a background
    thread while the training thread runs collectives of its own."""
    import socket

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_fsdp2_rank, args=(port, str(tmp_path)), nprocs=2)
    for save in (1, 2):
        for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
            staged, direct = tmp_path / f"staged-{save}" / folder, tmp_path / f"direct-{save}" / folder
            assert sorted(p.name for p in staged.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
            dcp_to_torch_save(staged, tmp_path / "staged.pt")
            dcp_to_torch_save(direct, tmp_path / "direct.pt")
            ours, theirs = torch.load(tmp_path / "staged.pt"), torch.load(tmp_path / "direct.pt")
            flat_ours, flat_theirs = _flat(ours), _flat(theirs)
            assert flat_ours.keys() == flat_theirs.keys() and len(flat_ours) > 10
            for key, value in flat_theirs.items():
                assert (
                    torch.equal(flat_ours[key], value)
                    if isinstance(value, torch.Tensor)
                    else (flat_ours[key] == value)
                ), key
    first = _flat(torch.load(tmp_path / "staged.pt"))  # the second save's optimizer...
    dcp_to_torch_save(tmp_path / "staged-1" / "optimizer_0", tmp_path / "first.pt")
    assert any(  # ...is not the first's: the refilled copy holds the state of its own save
        isinstance(v, torch.Tensor) and not torch.equal(v, first[k])
        for k, v in _flat(torch.load(tmp_path / "first.pt")).items()
    )


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, list | tuple):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}/").items()}
    return {prefix: tree}


def test_deepspeed_engine_saves_are_written_later_from_the_copy_taken_at_the_save(tmp_path):
    """DeepSpeed (issue #17.1): ``save_checkpoint`` writes through its checkpoint engine; wrapped, each
    ``save`` copies the state at once and DeepSpeed's own engine writes the file in the upload thread."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from sft_cluster.train.compat.checkpoint_writes import DeferredEngineSaves

    writes, buffers = DeferredWrites(), {}
    engine = DeferredEngineSaves(TorchCheckpointEngine(), writes, buffers)
    assert engine.is_decoupled() is False  # all but save is DeepSpeed's engine
    folder = tmp_path / "global_step2"
    folder.mkdir()
    weights = torch.arange(6.0)
    for step in (1, 2):  # the second save refills the first one's host tensors
        state = {"module": {"w": weights, "tied": weights}, "optimizer": [{"exp_avg": weights * 2}]}
        engine.save(state, str(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        at_save = weights.clone()
        weights.add_(1.0)  # training goes on
        assert not any(folder.iterdir())
        assert writes.run(tmp_path) == ["global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        loaded = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
        assert torch.equal(loaded["module"]["w"], at_save) and torch.equal(
            loaded["optimizer"][0]["exp_avg"], at_save * 2
        )
        assert loaded["module"]["w"].data_ptr() == loaded["module"]["tied"].data_ptr()
        if step == 1:
            first = {name: id(tensor) for name, tensor in buffers.items()}
            (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert {name: id(tensor) for name, tensor in buffers.items()} == first
