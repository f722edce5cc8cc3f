"""Throughput and MFU of each strategy: the worker program under torchrun, directly.

    # on a GPU machine: a ~1.2B Llama-3.2-shaped model from a config, seq 4096, packed, bf16
    python bench/gpu.py --strategies ddp fsdp2 zero2 zero3 --nproc 1
    # anywhere (what the tests run): a tiny model on CPU, to keep the script working
    python bench/gpu.py --cpu --tiny --steps 6 --strategies ddp zero3

For each strategy it prints tokens/s per device (the tokens of the packed rows,
as the Trainer counts them) and MFU = model FLOPs per token x tokens/s / peak
bf16 FLOP/s, with FLOPs per token = 6 x the weights of every matmul (the tied
LM head included) + 12 x layers x heads x head_dim x sequence length (the
formula torchtitan reports its MFU with; the run's own metrics use the same,
sft_cluster.train.flops). Steady state: steps after --warmup.
The machine needs torch, transformers, accelerate, peft, trl, datasets (and
deepspeed for zero2/zero3); it does not need Ray. Each run is stopped once its
steps are logged and its files are removed: a 1B run's final checkpoint
(~15 GB with the optimizer) would cost minutes and fill the disk by the third.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STRATEGIES: dict[str, dict[str, Any]] = {
    "ddp": {"kind": "ddp"},
    "fsdp2": {"kind": "fsdp", "fsdp": {"version": 2}},
    "zero2": {"kind": "deepspeed", "deepspeed": {"stage": 2}},
    "zero3": {"kind": "deepspeed", "deepspeed": {"stage": 3}},
}
# Llama-3.2-1B's shape: 1.24B parameters.
ONE_B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


def model_dir(root: Path, tiny: bool, seq_len: int) -> Path:
    """A Llama config (1B-shaped, or the shipped tiny one) beside the shipped tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    from sft_cluster.spec import resolve_builtin

    tiny_dir = Path(resolve_builtin("builtin:tiny-llama"))
    config = LlamaConfig.from_pretrained(tiny_dir)
    if not tiny:
        config.update(ONE_B)
    config.max_position_embeddings = max(seq_len, config.max_position_embeddings)
    out = root / "model"
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def synthetic_chats(path: Path, tokens_needed: int) -> None:
    """Random-word conversations, enough to fill every packed row of the run."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]
    written = 0
    with path.open("w") as out:
        while written < tokens_needed * 1.3:
            question = " ".join(rng.choices(words, k=rng.randint(20, 200)))
            answer = " ".join(rng.choices(words, k=rng.randint(50, 600)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
            written += len(question.split()) + len(answer.split())


def model_size(config_dir: Path, seq_len: int) -> tuple[float, int]:
    """(model FLOPs per token, parameter count), the parameters counted on a meta-device copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_cluster.train.flops import flops_per_token

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return flops_per_token(config, seq_len), sum(p.numel() for p in model.parameters())


def peak_flops(cpu: bool) -> float | None:
    """Dense bf16 peak of GPU 0 (None on CPU or a GPU not in sft_cluster.train.flops.PEAKS)."""
    if cpu:
        return None
    import torch

    from sft_cluster.train.flops import peak_flops as device_peak

    return device_peak(torch.cuda.get_device_name(0), "bf16")


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun's workers run in sessions of their own)."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=30)
    proc.wait()  # reaped here, not by psutil: Popen keeps the exit code


def _logged_steps(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]


def run_strategy(name: str, args: argparse.Namespace, model: Path, data: Path, root: Path) -> dict[str, Any]:
    out = root / name
    job = {
        "name": f"bench-gpu-{name}",
        "output_uri": str(out),
        "model": {"name_or_path": str(model), "from_config": True, "attn_implementation": args.attn},
        # Long synthetic answers: cut at max_seq_len rather than dropped.
        "data": {"sources": [{"uri": str(data)}], "max_seq_len": args.seq_len, "truncation": "truncate"},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "learning_rate": 1e-4,
            "lr_scheduler": "constant",
            "logging_steps": 1,
        },
        "strategy": {
            **STRATEGIES[name],
            "precision": "fp32" if args.cpu else "bf16",
            "activation_checkpointing": args.activation_checkpointing,
        },
        "checkpoint": {"resume": "never"},
        "resources": {"num_workers": args.nproc, "gpus_per_worker": 0 if args.cpu else 1},
    }
    job_file = root / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "sft_cluster.driver", str(job_file), "--executor=torchrun"]
    cmd += [f"--nproc-per-node={args.nproc}"]
    log = root / f"{name}.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if len(_logged_steps(out / "metrics.jsonl")) >= args.steps:
            break  # the figures are in; the final checkpoint and model are not measured
        time.sleep(0.5)
    ended = proc.poll()
    stop_tree(proc)
    records = _logged_steps(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    if len(records) < args.steps:
        why = f"timed out after {args.timeout:.0f} s" if ended is None else f"exit {ended}"
        return {"strategy": name, "error": f"{why}, {len(records)} steps logged\n" + log.read_text()[-2000:]}
    start, end = records[args.warmup - 1], records[-1]
    # The Trainer counts the tokens of every rank's packed rows (no padding is added).
    per_device = (end["tokens"] - start["tokens"]) / args.nproc / (end["time"] - start["time"])
    return {"strategy": name, "tokens_per_s": per_device}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2", "eager"], default="sdpa")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (fp32, gloo)")
    parser.add_argument("--tiny", action="store_true", help="the shipped tiny model instead of 1B")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per strategy")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.nproc is None:
        import torch

        args.nproc = 2 if args.cpu else max(torch.cuda.device_count(), 1)
    if args.cpu and args.seq_len == 4096:
        args.seq_len = 256
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    model = model_dir(root, args.tiny, args.seq_len)
    data = root / "chats.jsonl"
    synthetic_chats(data, args.steps * args.micro_batch * args.seq_len * args.nproc)
    per_token, params = model_size(model, args.seq_len)
    peak = peak_flops(args.cpu)
    print(
        f"model {params / 1e6:,.1f}M params, seq {args.seq_len}, micro batch {args.micro_batch}, "
        f"{args.nproc} process(es), attn {args.attn}, {'cpu fp32' if args.cpu else 'bf16'}; "
        f"{per_token / 1e9:.2f} GFLOP/token; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s"
    )
    print(f"{'strategy':<8} {'tokens/s per device':>20} {'MFU':>7}")
    for name in args.strategies:
        result = run_strategy(name, args, model, data, root)
        if "error" in result:
            print(f"{name:<8} failed:\n{result['error']}")
            continue
        mfu = per_token * result["tokens_per_s"] / peak if peak else None
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        print(f"{name:<8} {result['tokens_per_s']:>20,.0f} {mfu_text:>7}")


if __name__ == "__main__":
    main()
