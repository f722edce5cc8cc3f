"""Checkpoint writes taken off the training step: a host copy of the state now, its files later.

A synchronous save keeps the step waiting while the model and optimizer state
are serialized to staging (and, without ``async_upload``, uploaded). Here the
step only copies those tensors to host memory (a device-to-host copy on a GPU, a
memory copy on the CPU); the commit callback's background thread then writes
the files from the copy, exactly as the Trainer would have, before it hashes and
uploads them. A new save waits for the previous commit, so one copy is held at
a time, and its host tensors are filled again by the next save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def host_copy(value: Any, buffers: dict[str, torch.Tensor] | None = None, path: str = "") -> Any:
    """``value`` (a state dict: nested dicts, lists, tuples, tensors, plain values) with every
    tensor copied to host memory, so the live state may change while the copy is written.

    Tensors that share memory (tied embeddings) stay shared in the copy: ``save_pretrained``
    finds tied weights by their storage. ``buffers`` (the caller's, kept between saves, keyed
    by ``path`` and the keys inside ``value``) are the host tensors of the previous copy, filled
    again in place where shape, strides and dtype match: fresh host memory is what a copy costs
    most (page faults; 923 MB took 1.5-6 s fresh vs 0.19-0.32 s into existing tensors on the
    2-core test machine). The previous copy's files must be written before it is reused.
    """
    copies: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(item: Any, where: str) -> Any:
        if isinstance(item, torch.Tensor):
            item = item.detach()
            key = (
                item.untyped_storage().data_ptr(),
                item.storage_offset(),
                item.shape,
                item.stride(),
                item.dtype,
            )
            if key not in copies:
                old = None if buffers is None else buffers.get(where)
                fits = old is not None and (old.shape, old.stride(), old.dtype) == key[2:]
                copies[key] = old.copy_(item) if fits else _host_tensor(item)
            if buffers is not None:
                buffers[where] = copies[key]
            return copies[key]
        if isinstance(item, dict):
            return type(item)((name, copy(entry, f"{where}/{name}")) for name, entry in item.items())
        if type(item) in (list, tuple):
            return type(item)(copy(entry, f"{where}/{i}") for i, entry in enumerate(item))
        return item  # numbers, strings, None: immutable

    with _one_thread():
        return copy(value, path)


def _host_tensor(item: torch.Tensor) -> torch.Tensor:
    """A host copy of ``item``, in pinned memory when it comes from a GPU: a device-to-host copy
    into pageable memory goes through a staging buffer at a fraction of the bus speed, and the
    pinned tensors are allocated once (later saves refill them). ``scripts/gpu_check.sh`` runs it."""
    if item.device.type == "cpu":
        return item.to("cpu", copy=True)
    return torch.empty_like(item, device="cpu", pin_memory=True).copy_(item)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tensor copies in the calling thread alone: torch's parallel copy spreads a memcpy over its
    thread pool, which spin-waits when the cores are busy (3-8x slower than one thread on the
    2-core test machine under load, 0.22-0.52 s vs 0.065-0.087 s for 151 MB), while one thread
    already copies at memory speed. Device-to-host copies do not use the pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def staged_sharded_save(model: Any, optimizer: Any, output_dir: str, stager: Any) -> Callable[[], None]:
    """FSDP2: this rank's shards of the model and optimizer state copied to host memory now
    (``stager``, ``compat.sharded_stager``), and the write of accelerate's sharded checkpoint from
    that copy, to run later (collective: every rank runs its write, in its upload thread).

    The write's DCP collectives (planning, metadata) go over ``collectives.background_group()``:
    the training thread's own collectives use the control group meanwhile, and two threads must
    never share a group. The layout is ``save_fsdp_model``'s and ``save_fsdp_optimizer``'s, so
    the Trainer's resume loads it unchanged.
    """
    import torch.distributed.checkpoint as dcp
    from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from sft_cluster.train import collectives

    group = collectives.background_group()  # made here, on the training thread, by every rank alike
    staged = stager.stage(
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    )

    def write() -> None:
        for key, folder in (("model", f"{FSDP_MODEL_NAME}_0"), ("optimizer", f"{OPTIMIZER_NAME}_0")):
            dcp.save(
                {key: staged[key]},
                storage_writer=dcp.FileSystemWriter(str(Path(output_dir) / folder)),
                process_group=group,
            )

    return write


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


class DeferredWrites:
    """The writes of one save still to be done from host copies, in the order they were asked for."""

    def __init__(self) -> None:
        self._writes: list[Callable[[], None]] = []

    def add(self, write: Callable[[], None]) -> None:
        self._writes.append(write)

    def __len__(self) -> int:
        return len(self._writes)

    def run(self, folder: Path) -> list[str]:
        """Do the writes into ``folder`` (a background thread); the files they added, relative to it.

        The rank that deferred a write uploads its files: under DDP only the writing
        rank (``args.should_save``) has any, so no other rank lists them.
        """
        before = _files(folder)
        for write in self._writes:
            write()
        self._writes.clear()  # the host copies go with the closures
        return sorted(_files(folder) - before)
