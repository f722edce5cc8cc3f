"""Our commit protocol on top of the Trainer's own save, and resume from the newest commit.

The Trainer writes ``checkpoint-N`` to node-local staging (model, optimizer,
scheduler, every rank's RNG), and each rank adds its own named states (its data
cursor: ``data-cursor/rank-NNNNN.json``). Each rank then uploads its share in a
background thread while training goes on; once every rank's upload is done
(checked with one tiny all-reduce per step while an upload is pending), rank 0
writes ``manifest.json`` and then ``COMMITTED``, and prunes old checkpoints.
At most one upload is in flight; the end of training waits for the last one.
With async uploads the Trainer leaves its heavy writes (DDP's weights and
optimizer state) to the upload thread, from host copies (``snapshot``): a write
that fails fails the upload, and the step is not committed.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from sft_cluster.checkpoint import CheckpointStore, Manifest
from sft_cluster.checkpoint.manifest import files_to_fetch, sha256_file, state_file
from sft_cluster.data import DataError
from sft_cluster.spec import CheckpointSpec
from sft_cluster.train import collectives, compat, signals, staging
from sft_cluster.train.snapshot import DeferredWrites

log = logging.getLogger("sft_cluster.checkpoint")


class Stateful(Protocol):
    """A rank's own state saved in every checkpoint (as ``torch.distributed.checkpoint``'s Stateful)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def stage_states(folder: Path, states: Mapping[str, Stateful], rank: int) -> None:
    """Write this rank's ``states`` into a staged checkpoint folder (JSON, one file per state)."""
    for name, state in states.items():
        path = folder / state_file(name, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state.state_dict()))


def restore_states(folder: Path, states: Mapping[str, Stateful], rank: int) -> None:
    """Load this rank's ``states`` from a checkpoint folder; DataError when one was not saved there."""
    for name, state in states.items():
        path = folder / state_file(name, rank)
        if not path.exists():
            raise DataError(
                f"checkpoint {folder.name} has no {name.replace('-', ' ')} for rank {rank} "
                "(written by another world size or an older version); resume with the world size "
                "the run started with, or start a new output_uri"
            )
        state.load_state_dict(json.loads(path.read_text()))


def files_of_rank(local: Path, rank: int, world_size: int) -> list[str]:
    """The files of a staged checkpoint that ``rank`` uploads (collective).

    Every rank stages into its own folder: DDP's rank 0 holds the model and
    optimizer, each rank its RNG state, DeepSpeed and FSDP each rank its
    shards. A file staged by several ranks is uploaded by the lowest of them.
    """
    mine = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if world_size == 1:
        return mine
    listings = collectives.gather_objects(mine)
    taken = {rel for listing in listings[:rank] for rel in listing or []}
    return [rel for rel in mine if rel not in taken]


class _Upload:
    """One rank's upload of one checkpoint, in a background thread; ``writes`` are done first
    (their files join ``files``)."""

    def __init__(
        self,
        store: CheckpointStore,
        local: Path,
        files: list[str],
        step: int,
        writes: DeferredWrites | None = None,
    ):
        self.step = step
        self.local = local
        self.hashes: dict[str, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.held = 0.0  # seconds the training thread spent on this checkpoint before its commit
        self._thread = threading.Thread(target=self._run, args=(store, files, writes), daemon=True)
        self._thread.start()

    def _run(self, store: CheckpointStore, files: list[str], writes: DeferredWrites | None) -> None:
        if writes:
            try:
                files = files + [rel for rel in writes.run(self.local) if rel not in files]
            except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
                self.error = exc
                return
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
        states: Mapping[str, Stateful] | None = None,
        before_commit: Callable[[int], None] | None = None,
        metadata: dict[str, Any] | None = None,
        verify_fast: bool = False,
    ):
        """``states`` are this rank's own, saved into every checkpoint by name (``{"data-cursor": ...}``
        is ``data-cursor/rank-NNNNN.json``) and loaded back by ``restore_states``; rank 0 calls
        ``before_commit(step)`` just before ``COMMITTED`` (make metrics durable) and writes
        ``metadata`` into every manifest."""
        self.store = store
        self.states = states or {}
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.on_commit = on_commit
        self.before_commit = before_commit
        self.metadata = metadata or {}
        self.verify_fast = verify_fast
        self.pending: _Upload | None = None
        self.writes: DeferredWrites | None = None  # the save in progress's, until on_save uploads them
        self.commit_at_once = False  # the save in progress was asked for: commit before the next step
        self.stopped_for_preemption = False
        self.committed: list[int] = []
        self._saving_since = time.monotonic()  # where the training thread's time on a save starts

    def on_step_end(self, args, state, control, **kwargs):
        # At the last step a request changes nothing: the run completes, with final/.
        stop, save = collectives.reduce_numbers(
            [float(signals.STOP_REQUESTED.is_set()), float(signals.SAVE_REQUESTED.is_set())], "max"
        )
        if stop and state.global_step < state.max_steps:
            # Every rank stops at the same step, after saving it.
            self.stopped_for_preemption = True
            control.should_save = True
            control.should_training_stop = True
        elif save and state.global_step < state.max_steps:
            signals.SAVE_REQUESTED.clear()
            self.commit_at_once = control.should_save = True
        if self.pending is not None and collectives.all_true(self.pending.done):
            self._commit(time.monotonic())
        self._saving_since = time.monotonic()  # a save of this step starts here
        return control

    def defer_writes(self) -> DeferredWrites | None:
        """Where the Trainer puts the writes of the save it starts (None: it writes them at once).

        Called before the Trainer copies its state: the upload in flight is committed
        first, so at most one host copy is held.
        """
        if not self.spec.async_upload:
            return None
        self.finish()
        self.writes = DeferredWrites()
        return self.writes

    def on_save(self, args, state, control, **kwargs):
        self.finish()  # at most one upload in flight
        local = compat.trainer_checkpoint_dir(args.output_dir, state.global_step)
        stage_states(local, self.states, self.rank)
        if self.rank == 0:
            self.store.begin(state.global_step)  # a re-saved step stops looking committed first
        collectives.barrier()  # every rank's files are staged, and the old marker is gone
        files = files_of_rank(local, self.rank, self.world_size)
        writes, self.writes = self.writes, None
        self.pending = _Upload(self.store, local, files, state.global_step, writes)
        self.pending.held = time.monotonic() - self._saving_since
        if not self.spec.async_upload or self.commit_at_once:
            self.commit_at_once = False
            self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        self.finish()

    def finish(self) -> None:
        """Wait for the upload in flight (if any) and commit it."""
        if self.pending is not None:
            since = time.monotonic()
            self.pending.wait()
            self._commit(since)

    def _commit(self, since: float) -> None:
        """Commit the pending upload; the training thread has waited for it from ``since``."""
        upload, self.pending = self.pending, None
        # Every rank learns of any rank's failure in the same collective: nobody waits for a
        # share that will never come.
        error = None if upload.error is None else f"{type(upload.error).__name__}: {upload.error}"
        shares = collectives.gather_objects({"hashes": upload.hashes, "error": error})
        failed = [(rank, share["error"]) for rank, share in enumerate(shares) if share["error"]]
        if failed:
            where = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
            raise RuntimeError(
                f"uploading checkpoint step {upload.step} failed ({where}); it is not committed"
            ) from upload.error
        if self.rank == 0:
            files: dict[str, dict[str, Any]] = {}
            for share in shares:
                files.update(share["hashes"])
            manifest = Manifest(
                step=upload.step, files=files, metadata={"world_size": self.world_size, **self.metadata}
            )
            if self.before_commit is not None:
                self.before_commit(upload.step)
            uri = self.store.commit(manifest)
            self.store.mark_verified(upload.step)
            deleted = self.store.prune(
                self.spec.keep_last, self.spec.keep_every_n_steps, fast=self.verify_fast
            )
            log.info(
                "committed %s (%.1f s after save; training held %.2f s for it); pruned %s",
                uri,
                time.monotonic() - upload.started,
                upload.held + time.monotonic() - since,
                deleted,
            )
            if self.on_commit is not None:
                self.on_commit(upload.step)
        self.committed.append(upload.step)
        collectives.barrier()  # nobody races ahead of the commit
        shutil.rmtree(upload.local, ignore_errors=True)
        # Time spent here counts to this checkpoint, not to a save in progress.
        self._saving_since += time.monotonic() - since


def find_resume_step(
    store: CheckpointStore, rank: int, fast: bool = False, on_skip: Callable[[str], None] | None = None
) -> tuple[int, str] | None:
    """Rank 0 picks the newest verified commit; every rank gets the same (step, fetch token)."""
    choice = None
    if rank == 0:
        latest = store.latest(fast=fast, on_skip=on_skip)
        choice = (latest.step, uuid.uuid4().hex[:16]) if latest else None
    return collectives.broadcast_from_rank0(choice)


def fetch_checkpoint(
    store: CheckpointStore,
    step: int,
    token: str,
    rank: int,
    every_rank: int | None = None,
    on_node: Callable[[Path], None] | None = None,
) -> tuple[Path, list[str] | None]:
    """(the folder to resume from, the files this rank fetched): each rank fetches only its
    own files, and the first rank of each node the files every rank reads, into one folder
    the node's ranks share (collective). With ``every_rank`` (the world size that wrote the
    checkpoint) the first rank of each node fetches every rank's files, also from a local run
    directory (a ZeRO reshard converts them, and must not write into the commit); that rank
    then runs ``on_node(folder)`` before the node's other ranks read the folder.

    A node is what ``staging.node_key`` names (the Ray node, Slurm's node, the host), told
    apart by gathering every rank's key rather than by ``LOCAL_RANK``: Ray Train counts
    local ranks per IP address, and nodes behind one address (one machine, a NAT) would
    share none of their files. A local run directory is used in place (nothing fetched: None).
    """
    in_place = store.local_folder(step)
    if in_place is not None and every_rank is None:
        return in_place, None
    nodes = collectives.gather_objects(staging.node_key())
    owner = nodes.index(nodes[rank]) == rank  # the first rank of this node
    manifest = store.read_manifest(step)
    folder = staging.node_folder(token, owner=owner)
    files = files_to_fetch(
        manifest, list(range(every_rank)) if every_rank and owner else [rank], shared=owner
    )
    store.download_files(step, files, folder)
    if owner and on_node is not None:
        on_node(folder)
    collectives.barrier()  # the node's shared files are in place
    return folder, files
