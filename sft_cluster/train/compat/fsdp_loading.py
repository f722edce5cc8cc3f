"""FSDP2 loading from rank 0 (issue #17.5): the other ranks hold placeholders and receive their shards."""

from __future__ import annotations

from typing import Any


def untouched_host_parameters(model: Any) -> None:
    """Give every meta parameter of ``model`` host storage that is allocated and never written.

    accelerate 1.15 (``Accelerator._prepare_fsdp2``): the optimizer, made
    before the model is prepared, is mapped onto the sharded parameters by each
    parameter's ``data_ptr()``; every meta tensor's is 0, so a model left on the
    meta device would silently map all of them onto one. With
    ``cpu_ram_efficient_loading``, ``fsdp2_prepare_model`` moves the model to
    meta before ``fully_shard`` and fills the shards from rank 0's state dict
    (``scatter_shards_from_rank0``), so these values are never read. ``torch.empty`` storage is not
    resident until written (the kernel maps pages on first touch). Tied
    parameters stay one tensor.
    """
    import torch

    made: dict[int, Any] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if id(param) not in made:
                empty = torch.empty_like(param, device="cpu")
                made[id(param)] = torch.nn.Parameter(empty, requires_grad=param.requires_grad)
            setattr(module, name, made[id(param)])


def scatter_shards_from_rank0() -> None:
    """Make FSDP2's load from rank 0 send each rank its shard only, not every whole parameter.

    accelerate 1.15: with ``cpu_ram_efficient_loading``, ``fsdp2_prepare_model``
    calls its module's ``fsdp2_load_full_state_dict``, which broadcasts each
    whole parameter to every rank (a rank holds its shards plus the largest
    parameter, written, with the allocator keeping much of it) and then calls
    torch's ``distribute_tensor``, which scatters the shards from rank 0 by
    itself (torch 2.13: ``src_data_rank=0``; other ranks' data is never read).
    This replacement only scatters: elsewhere than rank 0 the whole tensor is
    an unwritten ``torch.empty`` (no resident pages), and rank 0 drops each
    whole parameter from ``full_sd`` once scattered (``fsdp2_prepare_model``
    reads it no more), so it never holds the model and all its shards at once.
    Casting and CPU offload as accelerate's.
    """
    import accelerate.utils.fsdp_utils as fsdp_utils

    fsdp_utils.fsdp2_load_full_state_dict = _scatter_full_state_dict


def _scatter_full_state_dict(accelerator: Any, model: Any, full_sd: dict, cpu_offload: bool = False) -> Any:
    """``fsdp2_load_full_state_dict`` without the broadcast (see ``scatter_shards_from_rank0``)."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    sharded = {}
    for name, meta in model.state_dict().items():
        mesh = meta.device_mesh
        if accelerator.is_main_process:
            whole = full_sd.pop(name).detach().to(mesh.device_type)  # freed once scattered
        else:
            whole = torch.empty(meta.size(), device=mesh.device_type, dtype=meta.dtype)
        shard = distribute_tensor(whole, mesh, meta.placements)
        if shard.is_floating_point():
            shard = shard.to(dtype=meta.dtype)
        sharded[name] = shard.to("cpu") if cpu_offload else shard
    model.load_state_dict(sharded, assign=True)
    return model


def as_if_loaded(model: Any) -> None:
    """Give a model built from a config what ``from_pretrained`` leaves on the model it loads.

    transformers 5.23: ``from_pretrained`` sets ``model._weight_conversions`` (the
    conversions its checkpoint used: none for the dense families, the fused-expert
    converters for a checkpoint in the Hub's MoE layout); ``save_pretrained`` and
    our export read it (``weight_conversions``, ``save_order``), collectively, so a
    placeholder for a loaded model must agree with rank 0's: it gets the
    conversions its class registers, without the legacy renamings and prefix
    changes that a checkpoint in the current layout does not use.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    mapping = get_model_conversion_mapping(model, add_legacy=False)
    model._weight_conversions = [c for c in mapping if not isinstance(c, PrefixChange)]
