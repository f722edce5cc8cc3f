"""Every control-plane collective of a run: flags, counts, file lists, barriers, broadcasts.

Control data lives on the CPU, and the default process group of a GPU run
cannot carry it: a group made with ``backend="nccl"`` (Ray Train's
``TorchConfig(backend="nccl")``, accelerate on CUDA, DeepSpeed) serves CUDA
tensors only, so a CPU all-reduce, an object collective or a barrier on it
fails ("No backend type associated with device type cpu"). Here they go over
a gloo group made beside the default one (the default group itself when it
already serves CPU tensors). Nothing else in the package calls
``torch.distributed`` collectives; a test enforces it. The few data-plane calls
(tensors on the model's own group, e.g. the streamed export's rows) are at the end.

Without a process group (one process) every helper returns its own input.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from sft_cluster.train import compat

T = TypeVar("T")

_control: list[Any] = []  # [default group, its control group], once made
_timeout: list[timedelta | None] = [None]  # the job's collective timeout (set_timeout); None: torch's


def set_timeout(seconds: float) -> None:
    """Our gloo groups' collective timeout (``watchdog.collective_timeout_s``), before they are made."""
    _timeout[0] = timedelta(seconds=seconds)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from the process group, else from the launcher's environment."""
    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def control_group() -> Any:
    """The group control data goes over; made once per default group, by every rank alike.

    Making a group is collective: the first control-plane call of a run makes it,
    and every rank reaches that call in the same order, as with any collective.
    """
    default = dist.group.WORLD
    if not _control or _control[0] is not default:  # none yet, or one of a destroyed default group
        control = (
            default
            if compat.default_group_serves_cpu()
            else dist.new_group(backend="gloo", timeout=_timeout[0])
        )
        _control[:] = [default, control]
    return _control[1]


_background: list[Any] = []  # [default group, the background group], once made


def background_group() -> Any:
    """A gloo group for collectives run off the training thread (an FSDP2 checkpoint's DCP write in
    the upload thread), made once per default group by every rank alike, on the training thread.

    Two threads must never share a group: their collectives would pair up across threads. So this
    is never the default group or the control group, even where those serve CPU tensors.
    """
    default = dist.group.WORLD
    if not _background or _background[0] is not default:
        _background[:] = [default, dist.new_group(backend="gloo", timeout=_timeout[0])]
    return _background[1]


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    if not distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=control_group())
    return bool(value.item())


def any_true(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank."""
    return not all_true(not flag)


def reduce_numbers(values: list[float], op: Literal["sum", "max"]) -> list[float]:
    """Element-wise sum or max of ``values`` over the ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if distributed():
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=reduce_op, group=control_group())
    return tensor.tolist()


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's ``value`` (picklable) on every rank; other ranks' ``value`` is ignored."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def barrier() -> None:
    """Every rank has reached this point."""
    if distributed():
        dist.barrier(group=control_group())


# --- the data plane: tensors on the model's own group (its device), not control data -----------


def send_rows(tensor: torch.Tensor, to_rank: int, group: Any) -> None:
    """Send ``tensor`` to ``to_rank`` of ``group`` (a mesh's group: NCCL tensors on GPUs); the
    streamed export sends each rank's rows of a sharded parameter to rank 0 this way."""
    dist.send(tensor, dst=dist.get_global_rank(group, to_rank), group=group)


def receive_rows(into: torch.Tensor, from_rank: int, group: Any) -> None:
    """Receive what ``send_rows`` sent from ``from_rank`` of ``group`` into ``into``."""
    dist.recv(into, src=dist.get_global_rank(group, from_rank), group=group)
