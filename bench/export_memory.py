"""Host memory of each rank while ``final/`` is written: the old gather-then-save against the stream.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/export_memory.py                 # ddp and fsdp2, old and new
    HF_HUB_OFFLINE=1 .venv/bin/python bench/export_memory.py --strategies fsdp2 --paths new

A Llama-shaped model of ~320M parameters (hidden 1024, 20 layers, MLP 2816,
vocabulary 32,000, untied: 1.29 GB in fp32) on 2 CPU ranks over gloo, each
strategy and path in a fresh pair of processes:

- ddp: the whole model on each rank (DDP's module);
- fsdp2: ``fully_shard`` per decoder layer and at the root (DTensor parameters);
- zero3: a DeepSpeed ZeRO-3 engine (CPU accelerator, torch AdamW, every parameter partitioned).

- old: what ``save_final_model`` did before #17.5: accelerate's
  ``get_state_dict`` (FSDP2: ``get_model_state_dict`` with ``full_state_dict,
  broadcast_from_rank0, cpu_offload``; DDP: the module's ``state_dict()``;
  ZeRO-3: the engine's ``_zero3_consolidated_16bit_state_dict``, fp32 kept),
  then ``save_pretrained`` on rank 0;
- new: ``sft_cluster.train.export.export_model`` (a tensor at a time).

Each rank resets its peak RSS (``/proc/self/clear_refs``) right before the
export, after a barrier, and reads ``VmHWM`` after it: "above steady" is that
peak less the RSS just before. Figures are MB and ratios to the model's fp32
size. The outputs of old and new are compared tensor by tensor at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
MB = 1e6


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _old_export(model, engine, strategy: str, out: Path, rank: int) -> None:
    """Before #17.5: the whole state dict gathered (accelerate's way), then save_pretrained on rank 0."""
    if strategy == "zero3":
        from sft_cluster.train import compat

        state_dict = compat.zero3_full_state_dict(engine)  # accelerate's get_state_dict for ZeRO-3
    elif strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        state_dict = get_model_state_dict(model, options=options)
    else:
        state_dict = model.state_dict()
    if rank == 0:
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)


def _zero3(model, rank: int):
    """``model`` partitioned by a ZeRO-3 engine over the gloo group, as the product sets DeepSpeed up on
    CPU (``compat.deepspeed_env``; the Trainer's own AdamW); returns the engine."""
    import deepspeed
    import torch

    from sft_cluster.train import compat

    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )

    held = [compat.zero3_partition(p) for p in engine.module.parameters()]
    assert all(h is not None for h in held), "a parameter is not ZeRO-3 partitioned"
    mine, total = sum(h[0] for h in held), sum(h[1] for h in held)
    assert mine <= total // 2 + len(held), (mine, total)
    print(f"zero3 rank {rank}: holds {mine:,} of {total:,} parameter elements ({mine / total:.3f})")
    return engine


def _rank(rank: int, port: int, strategy: str, path: str, out: str, results: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sft_cluster.train.export import export_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if strategy == "zero3":  # before deepspeed is imported: its accelerator is DS_ACCELERATOR's
        from sft_cluster.train import compat

        os.environ.update(compat.deepspeed_env(on_gpu=False), RANK=str(rank), WORLD_SIZE="2")
        os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32)
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    engine = None
    if strategy == "zero3":
        engine = _zero3(model, rank)
        model = engine.module  # what accelerate's unwrap_model gives
    elif strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model).module  # what accelerate's unwrap_model gives
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now
    steady = _status("VmRSS")
    started = time.perf_counter()
    if path == "old":
        _old_export(model, engine, strategy, Path(out), rank)
    else:
        export_model(
            model,
            Path(out),
            dtype=torch.float32,
            max_shard_size="5GB",
            main=rank == 0,
            fp32_masters=strategy == "zero3",
        )
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    dist.barrier()
    record = {"rank": rank, "steady": steady, "peak": peak, "fp32": fp32_bytes, "seconds": seconds}
    Path(results, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _same(a: Path, b: Path) -> bool:
    """The two folders' weights are equal, read one tensor at a time."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                found.update({key: file for key in handle.keys()})  # noqa: SIM118 - not a dict
        return found

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        return False
    for key, file in left.items():
        with safe_open(str(file), "pt") as x, safe_open(str(right[key]), "pt") as y:
            if not x.get_tensor(key).equal(y.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    strategies = ["ddp", "fsdp2", "zero3"]
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2"], choices=strategies)
    parser.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    args = parser.parse_args()
    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    root = Path(tempfile.mkdtemp(prefix="export-bench-"))
    print(f"load average before: {os.getloadavg()}")
    print("| strategy | path | rank | steady MB | peak MB | above steady MB | / fp32 size | export s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for strategy in args.strategies:
        for path in args.paths:
            out, results = root / f"{strategy}-{path}", root / f"{strategy}-{path}-results"
            results.mkdir()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            mp.spawn(_rank, args=(port, strategy, path, str(out), str(results)), nprocs=2)
            for rank in (0, 1):
                r = json.loads((results / f"rank{rank}.json").read_text())
                above = r["peak"] - r["steady"]
                print(
                    f"| {strategy} | {path} | {rank} | {r['steady'] / MB:,.0f} | {r['peak'] / MB:,.0f} | "
                    f"{above / MB:,.0f} | {above / r['fp32']:.3f} | {r['seconds']:.1f} |",
                    flush=True,
                )
        if {"old", "new"} <= set(args.paths):
            equal = _same(root / f"{strategy}-old", root / f"{strategy}-new")
            print(f"{strategy}: old and new final/ equal: {equal}")
    print(f"fp32 size of the model: {r['fp32'] / MB:,.0f} MB; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
