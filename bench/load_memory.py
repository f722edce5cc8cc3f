"""Host memory while the model loads on 2 CPU ranks: FSDP2 with and without loading from rank 0, and DDP.

A Llama-shaped model (301.5M parameters, stored in bf16 as on the Hub) is built from a
config and saved as a real Hugging Face folder in a temp dir; each case runs 2
spawned gloo ranks that set the process up as the worker does (strategy plan,
SFTConfig, FSDP's CPU route), build the model with ``build_model`` and prepare
it as the Trainer does (optimizer first, then ``accelerator.prepare``). Each
rank resets its peak RSS (``/proc/self/clear_refs``) just before building, so
the peak is the load's alone, and prints it against the model's fp32 size and
this rank's share of it (half under FSDP2), with the peak of anonymous memory
alone (sampled)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/load_memory.py

``--check`` also gathers the prepared weights and compares them with a plain
load on every rank (tests/integration/test_fsdp_loading.py runs it on a small model).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Llama-shaped, 20 layers of 1024 with a 32k vocabulary: 301.5M parameters (untied).
SHAPE_300M = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
CASES = {
    "fsdp2-rank0": {"kind": "fsdp", "fsdp": {"version": 2}},
    "fsdp2-every-rank": {"kind": "fsdp", "fsdp": {"version": 2}},
    "ddp": {"kind": "ddp"},
}


def save_model(folder: Path, shape: dict[str, Any], dtype: str = "float32") -> int:
    """A seeded random Llama model of ``shape`` as a Hugging Face folder with the tiny tokenizer,
    its weights stored in ``dtype``; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_cluster.spec import resolve_builtin

    tiny = resolve_builtin("builtin:tiny-llama")
    config = LlamaConfig.from_pretrained(tiny)
    config.update(shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _AnonPeak(threading.Thread):
    """The highest ``RssAnon`` seen, every 5 ms: the kernel keeps a peak of the total only (VmHWM),
    which also counts the pages of a weight file mapped by ``from_pretrained`` (clean page cache
    that the kernel can drop, shared by the node's processes)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.start_kib = self.peak_kib = _rss_kib("RssAnon")
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak_kib = max(self.peak_kib, _rss_kib("RssAnon"))

    def stop(self) -> float:
        """MiB above the start."""
        self.done.set()
        self.join()
        return (max(self.peak_kib, _rss_kib("RssAnon")) - self.start_kib) / 1024


def _job(case: str, folder: Path, from_config: bool) -> Any:
    from sft_cluster.spec import JobSpec

    return JobSpec.model_validate(
        {
            "name": f"load-{case}",
            "output_uri": str(folder.parent / "out"),
            "model": {"name_or_path": str(folder), "from_config": from_config},
            "data": {"sources": [{"uri": str(folder / "unused.jsonl")}]},
            "train": {"max_steps": 1, "seed": 7},
            "strategy": {**CASES[case], "precision": "fp32"},
            "resources": {"num_workers": 2, "gpus_per_worker": 0},
        }
    )


def load_rank(rank: int, port: int, case: str, folder: Path, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Join the 2-rank gloo group, then load once per ``opts["from_config"]`` value."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        return [_load(rank, case, folder, from_config, opts) for from_config in opts["from_config"]]
    finally:
        dist.destroy_process_group()


def _load(rank: int, case: str, folder: Path, from_config: bool, opts: dict[str, Any]) -> dict[str, Any]:
    """Set up, build and prepare the model on this rank; its peak RSS above the start of the load."""
    import torch.distributed as dist
    from transformers import Trainer

    from sft_cluster.train import compat
    from sft_cluster.train.model import build_model
    from sft_cluster.train.strategy import builds_weights, plan_strategy, prepare_trainer
    from sft_cluster.train.trainer import sft_config

    job = _job(case, folder, from_config)
    plan = plan_strategy(job, 2, "fp32", False)
    if case == "fsdp2-every-rank":
        plan.trainer_args["fsdp_config"]["cpu_ram_efficient_loading"] = False
    args = sft_config(job, str(folder.parent / f"trainer-{rank}"), "fp32", False, plan)
    compat.set_up_devices(args)
    prepare_trainer(plan, False)
    vocab = opts.get("vocab_size")
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _rss_kib("VmRSS")
    anon = _AnonPeak()
    anon.start()
    model = build_model(job.model, job.train.seed, vocab, builds_weights(plan, rank))
    built = _rss_kib("VmRSS") - start
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer()
    prepared, _ = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    dist.barrier()
    anon_peak = anon.stop()
    result = {
        "rank": rank,
        "case": case,
        "from_config": from_config,
        "builds_weights": builds_weights(plan, rank),
        "built_mib": built / 1024,  # resident after build_model, before preparing
        "peak_mib": (_rss_kib("VmHWM") - start) / 1024,
        "anon_peak_mib": anon_peak,
        "after_mib": (_rss_kib("VmRSS") - start) / 1024,
        "wrapper": type(prepared).__name__,
    }
    if opts.get("check"):
        result["equal_to_plain_load"] = _equal_to_plain_load(prepared, job, vocab)
    compat.reset_accelerate_state()
    return result


def _equal_to_plain_load(prepared: Any, job: Any, vocab: int | None) -> bool:
    """Whether the prepared (gathered) weights are those ``build_model`` gives this rank by itself."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from sft_cluster.train.model import build_model

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    gathered = get_model_state_dict(getattr(prepared, "module", prepared), options=options)
    plain = build_model(job.model, job.train.seed, vocab).state_dict()
    return gathered.keys() == plain.keys() and all(torch.equal(gathered[k], plain[k]) for k in plain)


def _entry(rank: int, port: int, case: str, folder: Path, opts: dict[str, Any], out: Path) -> None:
    try:
        results = load_rank(rank, port, case, folder, opts)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails naming it
        results = [{"rank": rank, "error": traceback.format_exc()}]
    (out / f"{case}-{rank}.json").write_text(json.dumps(results))


def run_case(case: str, folder: Path, opts: dict[str, Any], timeout: float = 600) -> list[dict[str, Any]]:
    """Both ranks' results for one case, rank by rank and load by load (spawned processes, one gloo
    group); an ``error`` entry where a rank failed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    out = folder.parent
    procs = [context.Process(target=_entry, args=(r, port, case, folder, opts, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
    results = []
    for rank in range(2):
        path = out / f"{case}-{rank}.json"
        results += json.loads(path.read_text()) if path.exists() else [{"rank": rank, "error": "no result"}]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--from-config", action="store_true", help="model.from_config: true (seeded)")
    parser.add_argument(
        "--stored",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype of the saved weights (bfloat16, as on the Hub: loading casts them to fp32)",
    )
    parser.add_argument("--check", action="store_true", help="compare with a plain load on every rank")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        folder = Path(tmp) / "model"
        params = save_model(folder, SHAPE_300M, args.stored)
        fp32_mib = params * 4 / 2**20
        print(
            f"model: {params / 1e6:.1f}M parameters, fp32 {fp32_mib:.0f} MiB, stored in {args.stored}; "
            f"from_config={args.from_config}"
        )
        print(
            f"{'case':18} {'rank':>4} {'peak MiB':>9} {'peak/fp32':>9} {'peak/shard':>10} "
            f"{'anon peak':>9} {'anon/shard':>10} {'after MiB':>9}"
        )
        opts = {"from_config": [args.from_config], "check": args.check}
        for case in args.cases:
            for r in run_case(case, folder, opts):
                if "error" in r:
                    print(f"{case:18} {r['rank']:>4} failed:\n{r['error']}")
                    continue
                shard = fp32_mib / 2 if case.startswith("fsdp") else fp32_mib
                print(
                    f"{case:18} {r['rank']:>4} {r['peak_mib']:>9.0f} {r['peak_mib'] / fp32_mib:>9.2f} "
                    f"{r['peak_mib'] / shard:>10.2f} {r['anon_peak_mib']:>9.0f} "
                    f"{r['anon_peak_mib'] / shard:>10.2f} {r['after_mib']:>9.0f}"
                    + (f"  equal={r['equal_to_plain_load']}" if args.check else "")
                )


if __name__ == "__main__":
    main()
