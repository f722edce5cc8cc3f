"""Our commit protocol on top of the Trainer's own save, and resume from the newest commit.

The Trainer writes ``checkpoint-N`` to node-local staging (model, optimizer,
scheduler, every rank's RNG). Each rank then uploads its share in a
background thread while training goes on; once every rank's upload is done
(checked with one tiny all-reduce per step while an upload is pending), rank 0
writes ``manifest.json`` and then ``COMMITTED``, and prunes old checkpoints.
At most one upload is in flight; the end of training waits for the last one.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from sft_cluster.checkpoint import CheckpointStore, Manifest
from sft_cluster.checkpoint.manifest import sha256_file
from sft_cluster.spec import CheckpointSpec
from sft_cluster.train import signals

log = logging.getLogger("sft_cluster.checkpoint")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_true(flag: bool) -> bool:
    if not _distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _any_true(flag: bool) -> bool:
    return not _all_true(not flag)


def files_of_rank(local: Path, rank: int, world_size: int) -> list[str]:
    """The files of a staged checkpoint that ``rank`` uploads (collective).

    Every rank stages into its own folder: DDP's rank 0 holds the model and
    optimizer, each rank its RNG state, DeepSpeed and FSDP each rank its
    shards. A file staged by several ranks is uploaded by the lowest of them.
    """
    mine = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if world_size == 1 or not _distributed():
        return mine
    listings: list[list[str] | None] = [None] * world_size
    dist.all_gather_object(listings, mine)
    taken = {rel for listing in listings[:rank] for rel in listing or []}
    return [rel for rel in mine if rel not in taken]


class _Upload:
    """One rank's upload of one checkpoint, in a background thread."""

    def __init__(self, store: CheckpointStore, local: Path, files: list[str], step: int):
        self.step = step
        self.local = local
        self.hashes: dict[str, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(store, files), daemon=True)
        self._thread.start()

    def _run(self, store: CheckpointStore, files: list[str]) -> None:
        # Hashing and uploading read the same files: run them side by side.
        hasher = threading.Thread(target=self._hash, args=(files,), daemon=True)
        hasher.start()
        try:
            store.upload_files(self.local, files, self.step)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
            self.error = exc
        hasher.join()

    def _hash(self, files: list[str]) -> None:
        try:
            for rel in files:
                path = self.local / rel
                self.hashes[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
            self.error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()


class CommitCallback(TrainerCallback):
    """Uploads and commits every checkpoint the Trainer saves; handles stop requests."""

    def __init__(
        self,
        store: CheckpointStore,
        spec: CheckpointSpec,
        rank: int,
        world_size: int,
        on_commit: Callable[[int], None] | None = None,
        stage_extra: Callable[[Path, int], None] | None = None,
    ):
        """``stage_extra(folder, step)`` adds this rank's own files (its data cursor) to a checkpoint."""
        self.store = store
        self.stage_extra = stage_extra
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.on_commit = on_commit
        self.pending: _Upload | None = None
        self.stopped_for_preemption = False
        self.committed: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        if _any_true(signals.STOP_REQUESTED.is_set()):
            # Every rank stops at the same step, after saving it.
            self.stopped_for_preemption = True
            control.should_save = True
            control.should_training_stop = True
        if self.pending is not None and _all_true(self.pending.done):
            self._commit()
        return control

    def on_save(self, args, state, control, **kwargs):
        self.finish()  # at most one upload in flight
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.stage_extra is not None:
            self.stage_extra(local, state.global_step)
        if _distributed():
            dist.barrier()  # every rank's files are staged
        files = files_of_rank(local, self.rank, self.world_size)
        self.pending = _Upload(self.store, local, files, state.global_step)
        if not self.spec.async_upload:
            self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        self.finish()

    def finish(self) -> None:
        """Wait for the upload in flight (if any) and commit it."""
        if self.pending is not None:
            self.pending.wait()
            self._commit()

    def _commit(self) -> None:
        upload, self.pending = self.pending, None
        if upload.error is not None:
            raise RuntimeError(
                f"uploading checkpoint step {upload.step} failed: {upload.error}"
            ) from upload.error
        shares = [upload.hashes]
        if _distributed():
            shares = [None] * self.world_size
            dist.all_gather_object(shares, upload.hashes)
        if self.rank == 0:
            files: dict[str, dict[str, Any]] = {}
            for share in shares:
                files.update(share)
            manifest = Manifest(step=upload.step, files=files, metadata={"world_size": self.world_size})
            uri = self.store.commit(manifest)
            deleted = self.store.prune(self.spec.keep_last, self.spec.keep_every_n_steps)
            log.info(
                "committed %s (%.1f s after save); pruned %s", uri, time.monotonic() - upload.started, deleted
            )
            if self.on_commit is not None:
                self.on_commit(upload.step)
        self.committed.append(upload.step)
        if _distributed():
            dist.barrier()  # nobody races ahead of the commit
        shutil.rmtree(upload.local, ignore_errors=True)


def find_resume_step(
    store: CheckpointStore, rank: int, fast: bool = False, on_skip: Callable[[str], None] | None = None
) -> int | None:
    """Rank 0 picks the newest verified commit; every rank gets the same answer."""
    choice = [None]
    if rank == 0:
        latest = store.latest(fast=fast, on_skip=on_skip)
        choice = [latest.step if latest else None]
    if _distributed():
        dist.broadcast_object_list(choice, src=0)
    return choice[0]
