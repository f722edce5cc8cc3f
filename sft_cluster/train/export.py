"""``final/``: the trained model as Hugging Face weights, streamed a tensor at a time (issue #17.5).

Gathering the whole state dict in one process costs the exporting rank the
model's size again (the CPU-OOM-or-timeout failure FSDP and ZeRO-3 users
report). Here every rank walks the same tensors in the same order; each is
gathered on its own (an FSDP2 DTensor one rank's rows at a time, a ZeRO-3
parameter one rank's partition at a time, a whole parameter read where it lies),
cast to the export dtype, and the main process appends its bytes to a
safetensors shard whose header it wrote first, from shapes alone. The shard
plan is ``save_pretrained``'s own (``split_torch_state_dict_into_shards`` over
meta tensors), so files, names and index are those it would write. With
``lora.merge`` each adapted weight is merged as it is gathered, as peft merges.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers

from sft_cluster.data.chat import ChatEncoder
from sft_cluster.spec import JobSpec
from sft_cluster.train import collectives, compat
from sft_cluster.train.shards import Entry, write_safetensors

log = logging.getLogger("sft_cluster.train")


def export_dtype(choice: str, trainer_args: Any) -> torch.dtype:
    """``export.dtype``: ``auto`` is bf16 when training ran in bf16 on a GPU, else fp32 (the masters)."""
    if choice == "auto":
        choice = "bf16" if trainer_args.bf16 and trainer_args.device.type == "cuda" else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


def save_final_model(trainer: Any, job: JobSpec, encoder: ChatEncoder, out: Path) -> None:
    """Hugging Face weights in ``out``, whatever the strategy (collective: every rank calls it), with the
    tokenizer (the model's own inference template, never a training variant) and a generation config
    that stops at the end of an assistant turn. With LoRA: the adapter, or the merged model with
    ``lora.merge``; the training model is never modified."""
    accelerator = trainer.accelerator
    main = accelerator.is_main_process
    model = accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    dtype = export_dtype(job.export.dtype, trainer.args)
    lora = job.strategy.lora
    base = model.get_base_model() if lora is not None else model
    # Every rank takes the same path (the export is collective): rank 0's model, the one loaded from
    # the weights, decides; a rank that built its model from the config may lack what it is read from.
    if collectives.broadcast_from_rank0(compat.weight_conversions(base)):
        # Many-to-one key conversions (fused MoE experts) need every tensor at once.
        log.warning("%s saves through weight conversions: final/ is gathered whole on rank 0", type(base))
        _save_gathered(trainer, job, len(encoder.tokenizer), dtype, out)
    elif lora is not None and not lora.merge:
        grown = bool(encoder.tokenizer.added_by_template)
        _save_adapter(model, _Gatherer(dtype, main, trainer.is_deepspeed_enabled), grown, out)
    else:
        export_model(
            model,
            out,
            dtype=dtype,
            max_shard_size=job.export.max_shard_size,
            main=main,
            fp32_masters=trainer.is_deepspeed_enabled,
        )
    if main:
        generation_config_for(base, encoder).save_pretrained(str(out))
        encoder.tokenizer.save_pretrained(str(out))


def export_model(
    model: Any,
    out: Path,
    *,
    dtype: torch.dtype,
    max_shard_size: int | str,
    main: bool,
    fp32_masters: bool = False,
) -> None:
    """The model's weights (merged first when it is a PEFT model) and config in ``out`` (collective).

    ``fp32_masters``: DeepSpeed keeps bf16/fp16 module weights and the fp32 masters in its optimizer;
    an fp32 export reads the masters.
    """
    gather = _Gatherer(dtype, main, fp32_masters)
    if hasattr(model, "get_base_model"):
        base, entries = model.get_base_model(), _merged_entries(model, gather)
    else:
        base, entries = model, _entries(model, gather)
    by_name = {entry.name: entry for entry in entries}
    order = collectives.broadcast_from_rank0(compat.save_order(base, list(by_name)))  # as above
    ordered = [by_name[name] for name in order]
    write_safetensors(ordered, out, max_shard_size, main)
    if main:
        _write_config(base, dtype, out)


# --- what to write ------------------------------------------------------------------------------


class _Gatherer:
    """The whole of one tensor, on every rank that must take part, for the main process."""

    def __init__(self, dtype: torch.dtype, main: bool, fp32_masters: bool) -> None:
        self.dtype, self.main, self.fp32_masters = dtype, main, fp32_masters

    def out_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if tensor.is_floating_point() else tensor.dtype

    def shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        partition = getattr(tensor, "ds_shape", None)  # ZeRO-3: the local tensor is a partition
        return tuple(partition if partition is not None else tensor.shape)

    @contextmanager
    def pieces(self, tensor: torch.Tensor) -> Iterator[Iterable[torch.Tensor]]:
        """Collective: the tensor's bytes in order, for the main process (see ``Entry``). A DTensor
        sharded by rows (FSDP2) comes one rank's rows at a time and a ZeRO-3 parameter one rank's
        partition at a time, sent to the main process: no rank ever holds it whole."""
        if _row_sharded(tensor):
            yield self._rows(tensor)
            return
        if _zero3_streamable(tensor):
            yield self._partitions(tensor)
            return
        with self.whole(tensor) as full:
            yield () if full is None else (full,)

    def _rows(self, tensor: Any) -> Iterator[torch.Tensor]:
        """A ``Shard(0)`` DTensor's rows, rank by rank (torch.chunk's split, as FSDP2 and DTensor cut)."""
        import torch.distributed as dist

        local = tensor.to_local()
        local = local.to(self.out_dtype(tensor))
        if local.device.type == "cpu" and not compat.default_group_serves_cpu():
            local = local.to("cuda")  # FSDP2 CPU offload on NCCL ranks
        group = tensor.device_mesh.get_group()
        me, size = dist.get_rank(group), dist.get_world_size(group)
        rows = [len(chunk) for chunk in torch.empty(tensor.shape[0], device="meta").chunk(size)]
        rows += [0] * (size - len(rows))
        if me != 0:
            if rows[me]:
                collectives.send_rows(local.contiguous(), 0, group)
            return
        if rows[0]:
            yield local.to("cpu").contiguous()
        for source in range(1, size):
            if rows[source]:
                received = torch.empty(
                    (rows[source], *tensor.shape[1:]), dtype=local.dtype, device=local.device
                )
                collectives.receive_rows(received, source, group)
                yield received.to("cpu")

    def _partitions(self, tensor: Any) -> Iterator[torch.Tensor]:
        """A ZeRO-3 parameter's partitions, rank by rank: each is a run of the flattened tensor (the
        last padded), so their bytes in rank order are the tensor's. An fp32 export of bf16/fp16
        weights reads the optimizer's fp32 partition, laid out alike."""
        import torch.distributed as dist

        local = _fp32_partition(tensor) if self._reads_master(tensor) else None
        local = (tensor.ds_tensor if local is None else local).detach().reshape(-1)
        local = local.to(self.out_dtype(tensor))
        if local.device.type == "cpu" and not compat.default_group_serves_cpu():
            local = local.to("cuda")  # ZeRO-3 offload on NCCL ranks
        group = tensor.ds_process_group
        me, size = dist.get_rank(group), dist.get_world_size(group)
        per, total = local.numel(), tensor.ds_numel
        counts = [max(0, min(per, total - rank * per)) for rank in range(size)]
        if me != 0:
            if counts[me]:
                collectives.send_rows(local[: counts[me]].contiguous(), 0, group)
            return
        if counts[0]:
            yield local[: counts[0]].to("cpu")
        for source in range(1, size):
            if counts[source]:
                received = torch.empty(counts[source], dtype=local.dtype, device=local.device)
                collectives.receive_rows(received, source, group)
                yield received.to("cpu")

    def _reads_master(self, tensor: torch.Tensor) -> bool:
        """An fp32 export of a bf16/fp16 trained weight reads DeepSpeed's fp32 master of it."""
        return (
            self.fp32_masters
            and self.out_dtype(tensor) == torch.float32
            and tensor.dtype != torch.float32
            and tensor.requires_grad
        )

    @contextmanager
    def whole(self, tensor: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """Collective: the whole tensor, in the output dtype (float only), on the main process's CPU."""
        dtype = self.out_dtype(tensor)
        with self._gathered(tensor, dtype) as full:
            yield full.detach().to("cpu", dtype).contiguous() if self.main else None

    @contextmanager
    def _gathered(self, tensor: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        if self._reads_master(tensor):
            master = _fp32_master(tensor)  # collective under ZeRO
            if master is not None:
                yield master
                return
        if compat.zero3_partition(tensor) is not None:
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):  # read-only
                yield tensor.data
        elif hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor: cast the shard first (less to send)
            local = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if local.device.type == "cpu" and not compat.default_group_serves_cpu():
                local = local.to("cuda")  # FSDP2 CPU offload on NCCL ranks
            yield local.full_tensor()
        else:
            yield tensor


def _row_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor cut by rows over a 1-D mesh whose first rank is the main process (FSDP2's layout)."""
    from torch.distributed.tensor import DTensor, Shard

    if (
        not isinstance(tensor, DTensor)
        or tensor.device_mesh.ndim != 1
        or tuple(tensor.placements) != (Shard(0),)
    ):
        return False
    import torch.distributed as dist

    return dist.get_global_rank(tensor.device_mesh.get_group(), 0) == 0


def _zero3_streamable(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose group's first rank is the main process (so partitions go to it)."""
    if compat.zero3_partition(tensor) is None:
        return False
    import torch.distributed as dist

    return dist.get_global_rank(tensor.ds_process_group, 0) == 0


def _fp32_partition(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's partition of DeepSpeed's fp32 master of a ZeRO-3 parameter (local), None if none."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(param)


def _fp32_master(param: torch.Tensor) -> torch.Tensor | None:
    """The whole fp32 master DeepSpeed keeps of a bf16/fp16 parameter (collective), None if it has none."""
    if not (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def _state_refs(model: Any) -> dict[str, torch.Tensor]:
    """The model's state dict as references to its parameters and buffers (nothing copied or gathered),
    without the keys the model never saves or a tied output copy."""
    refs = model.state_dict(keep_vars=True)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        refs.pop(key, None)
    return compat.drop_tied_copy(model, refs)


def _entries(model: Any, gather: _Gatherer) -> list[Entry]:
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [
        Entry(
            name,
            gather.shape(tensor),
            gather.out_dtype(tensor),
            name in parameters,
            lambda tensor=tensor: gather.pieces(tensor),
        )
        for name, tensor in _state_refs(model).items()
    ]


def _merged_entries(model: Any, gather: _Gatherer) -> list[Entry]:
    """The merged model's tensors, from a PEFT model: each adapted weight merged as it is gathered."""
    base = model.get_base_model()
    layers = compat.lora_layers(base)
    parameters = {name for name, _ in base.named_parameters(remove_duplicate=False)}
    entries = []
    for name, tensor in _state_refs(base).items():
        if ".lora_" in name:
            continue  # consumed with the weight it adapts
        prefix, cut, leaf = name.rpartition(".base_layer.")
        adapted = bool(cut) and prefix in layers
        if adapted and leaf == "weight":
            fetch = lambda tensor=tensor, lora=layers[prefix]: _merged(gather, tensor, *lora)  # noqa: E731
        else:
            fetch = lambda tensor=tensor: gather.pieces(tensor)  # noqa: E731
        saved, shape = f"{prefix}.{leaf}" if adapted else name, gather.shape(tensor)
        entries.append(Entry(saved, shape, gather.out_dtype(tensor), name in parameters, fetch))
    return entries


@contextmanager
def _merged(
    gather: _Gatherer, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, delta: Callable[..., Any]
) -> Iterator[Iterable[torch.Tensor]]:
    """Collective: W + scale * B @ A, computed in fp32 (as peft merges the fp32 base), then cast."""
    fp32 = _Gatherer(torch.float32, gather.main, gather.fp32_masters)
    with fp32.whole(weight) as w, fp32.whole(a) as a_full, fp32.whole(b) as b_full:
        if not gather.main:
            yield ()
            return
        yield ((w + delta(a_full, b_full)).to(gather.out_dtype(weight)),)


def _write_config(model: Any, dtype: torch.dtype, out: Path) -> None:
    """config.json as ``save_pretrained`` writes it: the saved dtype and the class (without FSDP's prefix)."""
    config = copy.deepcopy(model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, str(out), config=config)
    config.save_pretrained(str(out))


def _save_adapter(model: Any, gather: _Gatherer, grown_vocabulary: bool, out: Path) -> None:
    """The LoRA adapter (peft's files): only the adapter's tensors are gathered, plus the embeddings
    when a template grew them (peft then saves them beside the adapter)."""
    base = model.get_base_model()
    embeddings = {base.get_input_embeddings(), base.get_output_embeddings()} if grown_vocabulary else set()
    owners = {f"{name}.weight" for name, module in model.named_modules() if module in embeddings}
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in name or name in owners:
            with gather.whole(tensor) as full:
                state[name] = full if full is None else full.clone()
    if gather.main:
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)


def _save_gathered(trainer: Any, job: JobSpec, vocab_size: int, dtype: torch.dtype, out: Path) -> None:
    """The whole state dict on the main process, then ``save_pretrained`` (for models whose saved
    layout needs every tensor at once); with LoRA a fresh whole base gets the adapter and is merged."""
    from sft_cluster.train.model import build_model

    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled and accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
        state_dict = compat.zero3_full_state_dict(trainer.model_wrapped)
    else:
        state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if not accelerator.is_main_process:
        return
    # accelerate keeps a torch.compile wrapper's prefix in the keys (strategy.compile).
    state_dict = {key.removeprefix("_orig_mod."): value.to(dtype) for key, value in state_dict.items()}
    model = accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    if job.strategy.lora is not None and job.strategy.lora.merge:
        with compat.without_zero3_init():  # the copy is built whole, on this rank only
            base = build_model(job.model, job.train.seed, vocab_size)
        model, state_dict = compat.lora_copy(base.to(dtype), model, state_dict).merge_and_unload(), None
    model.save_pretrained(
        str(out),
        state_dict=compat.drop_tied_copy(model, state_dict),
        safe_serialization=True,
        max_shard_size=job.export.max_shard_size,
    )


def generation_config_for(model: transformers.PreTrainedModel, encoder: ChatEncoder) -> Any:
    """The model's generation config with EOS ending an assistant turn, so ``generate`` stops there."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    tokenizer = encoder.tokenizer
    wanted = [
        *eos,
        *encoder.end_of_turn_ids,
        *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
    ]
    config.eos_token_id = list(dict.fromkeys(wanted))
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config
