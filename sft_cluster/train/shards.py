"""Safetensors shards written a tensor at a time, in the layout ``save_pretrained`` writes.

The safetensors API writes a whole dict at once; the format itself is a
header (every tensor's dtype, shape and byte range) then the bytes, so with
the shapes known up front each shard's header goes first and each tensor's
bytes follow as they arrive. The shard plan is ``save_pretrained``'s own
(``split_torch_state_dict_into_shards`` over meta tensors): the same files,
names and index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

# safetensors' dtype names (the format's spec); anything else is refused by name.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_WEIGHTS = "model{suffix}.safetensors"
_INDEX = "model.safetensors.index.json"


@dataclass
class Entry:
    """One tensor of the output: its saved name, full shape and dtype, and how to gather it.

    ``fetch`` is collective: every rank enters it, for every entry, in the same order, and
    iterates what it yields: on the main process, CPU tensors in ``dtype`` whose bytes, one
    after the other, are the tensor's; nothing elsewhere.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_parameter: bool
    fetch: Callable[[], Any]  # a context manager factory


def write_safetensors(entries: list[Entry], out: Path, max_shard_size: int | str, main: bool) -> None:
    """``entries`` as ``save_pretrained`` shards them (collective: every rank gathers every entry, in
    the plan's order; the main process writes). Each shard's header is written first, from the
    shapes, then each tensor's bytes as it comes: one tensor is held at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards

    by_name = {entry.name: entry for entry in entries}
    meta = {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries}
    plan = split_torch_state_dict_into_shards(meta, filename_pattern=_WEIGHTS, max_shard_size=max_shard_size)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    for filename, names in plan.filename_to_tensors.items():
        with open(out / filename, "wb") if main else nullcontext() as file:
            if file is not None:
                _write_header(file, [by_name[name] for name in names])
            for name in names:
                with by_name[name].fetch() as pieces:
                    for piece in pieces:  # every rank: a rank's part may be in sending them
                        if file is not None:
                            _write_bytes(file, piece)
    if main and plan.is_sharded:
        total = sum(torch.Size(e.shape).numel() for e in entries if e.is_parameter)
        index = {
            "metadata": {"total_parameters": total, **plan.metadata},
            "weight_map": plan.tensor_to_filename,
        }
        (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_header(file: BinaryIO, entries: list[Entry]) -> None:
    """safetensors' header: 8-byte little-endian length, then JSON (space-padded to 8 bytes) naming each
    tensor's dtype, shape and byte range; the tensors follow in that order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        if entry.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{entry.name}: {entry.dtype} cannot be written to safetensors here")
        size = torch.Size(entry.shape).numel() * entry.dtype.itemsize
        header[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write(len(text).to_bytes(8, "little"))
    file.write(text)


def _write_bytes(file: BinaryIO, tensor: torch.Tensor) -> None:
    """The tensor's bytes as they lie in memory (no copy: a view through numpy)."""
    file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
