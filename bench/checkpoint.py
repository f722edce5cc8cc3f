"""Checkpoint costs, side by side in one run, on a real S3 server (SeaweedFS on loopback).

    .venv/bin/python bench/checkpoint.py [--state-mb 300] [--model 25m|300m] [--stall-only]
        [--steps 40 --every 10] [--targets s3,local]

1. Commit time of our protocol (upload + sha256 manifest + COMMITTED) vs a plain
   ``fsspec put`` of the same bytes to the same bucket.
2. Training-step stall per checkpoint with async upload (a host copy on the step;
   files written, hashed and uploaded in the background) vs synchronous (the
   Trainer's own save, then the upload), with the run on S3 and on local storage
   (output_uri a local folder: no server process competing for the cores), for
   a ~25M-parameter Llama (~320 MB of model + Adam state) or a ~300M one
   (~3.7 GB). The stall is the training thread's time per checkpoint (save,
   waits, commit), logged by the worker; the step after a save minus the median
   step, and the same over the whole interval, show what background work costs
   the steps it overlaps on a host without spare cores.
3. Recovery from a SIGKILLed Ray Train worker to the next completed step, and
   steps recomputed after the kill and after a preemption signal (smoke job).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sft_cluster import storage  # noqa: E402
from sft_cluster.checkpoint import CheckpointStore, Manifest  # noqa: E402
from sft_cluster.train.checkpointing import _Upload  # noqa: E402
from tests.fixtures.s3 import seaweedfs  # noqa: E402

CLI = [sys.executable, "-m", "sft_cluster"]


def commit_vs_put(server, tmp: Path, state_mb: int) -> tuple[float, float]:
    local = tmp / "ckpt"
    local.mkdir()
    rng = os.urandom
    (local / "model.safetensors").write_bytes(rng(state_mb // 3 << 20))
    (local / "optimizer.pt").write_bytes(rng((state_mb - state_mb // 3) << 20))
    (local / "trainer_state.json").write_text("{}")
    bucket = server.make_bucket()
    options = {"client_kwargs": {"endpoint_url": server.endpoint}}
    fs, _ = storage.filesystem(f"s3://{bucket}", options)
    start = time.perf_counter()
    fs.put(str(local) + "/", f"{bucket}/plain/", recursive=True)
    put_seconds = time.perf_counter() - start

    store = CheckpointStore(f"s3://{bucket}/run/checkpoints", options)
    start = time.perf_counter()
    upload = _Upload(store, local, sorted(p.name for p in local.iterdir()), step=1)
    upload.wait()
    store.commit(Manifest(step=1, files=upload.hashes))
    commit_seconds = time.perf_counter() - start
    assert store.latest(fast=True).step == 1
    return commit_seconds, put_seconds


# Llama shapes on the shipped tokenizer (~27M and ~308M parameters), and the job settings each
# runs with: the 300M one on shorter rows, so that a step takes seconds, not a minute, on 2 cores.
MODELS = {
    "25m": (
        {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "heads": 8},
        ["data.max_seq_len=128"],
    ),
    "300m": (
        {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "heads": 16},
        ["data.max_seq_len=64", "train.micro_batch_size=1"],
    ),
}
HELD = re.compile(r"committed \S*step-(\d+) \(.*training held ([\d.]+) s for it\)")


def bigger_model(tmp: Path, size: str) -> Path:
    from transformers import LlamaConfig

    model = tmp / f"model-{size}"
    shutil.copytree(REPO / "sft_cluster" / "assets" / "tiny-llama", model)
    base = json.loads((model / "config.json").read_text())
    shape = dict(MODELS[size][0])
    heads = shape.pop("heads")
    LlamaConfig(
        **{
            **base,
            **shape,
            "head_dim": shape["hidden_size"] // heads,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
        }
    ).save_pretrained(model)
    return model


def step_path(tmp: Path, model: Path, rounds: int) -> tuple[float, float]:
    """(async, sync) median seconds the training thread spends on one checkpoint to a local store,
    saves of the same Trainer's state alternating in one process (so both see the same load): the
    Trainer's save, our on_save, and the commit."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from sft_cluster.spec import CheckpointSpec
    from sft_cluster.train import compat
    from sft_cluster.train.checkpointing import CommitCallback
    from sft_cluster.train.trainer import StreamingSFTTrainer

    class Saver(compat.DeferredCheckpointWrites, Trainer):
        deferred_writes = StreamingSFTTrainer.deferred_writes

    rows = [{"input_ids": torch.arange(32) % 500, "labels": torch.arange(32) % 500}] * 4
    args = TrainingArguments(
        output_dir=str(tmp / "paired"), use_cpu=True, max_steps=2, per_device_train_batch_size=1, report_to=[]
    )
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    trainer = Saver(model=built, args=args, train_dataset=rows)
    trainer.train()  # the optimizer holds its state
    store = CheckpointStore(str(tmp / "paired" / "run" / "checkpoints"))
    held: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for asynchronous in (True, False):
            callback = CommitCallback(store, CheckpointSpec(async_upload=asynchronous), rank=0, world_size=1)
            trainer.callback_handler.callbacks = [callback]
            trainer.state.global_step += 1
            start = time.perf_counter()
            trainer._save_checkpoint(trainer.model, None)
            callback.on_save(trainer.args, trainer.state, trainer.control)
            seconds = time.perf_counter() - start
            if callback.pending is not None:  # async: the background part is off the step ...
                callback.pending.wait()
                start = time.perf_counter()
                callback.finish()  # ... the commit is on it
                seconds += time.perf_counter() - start
            held[asynchronous].append(seconds)
    return statistics.median(held[True]), statistics.median(held[False])


@dataclass
class Stall:
    held_s: float  # the training thread's time per checkpoint (save, waits, commit), from the worker's log
    after_save_s: float  # the step after a save minus the median step
    interval_s: float  # the same summed over the steps up to the next save
    step_s: float  # the median step


# Overrides per ``--strategy``: FSDP2 and ZeRO shard over 2 workers, and each saves its own shards.
STRATEGIES = {
    "ddp": ["resources.num_workers=1"],
    "fsdp2": ["resources.num_workers=2", "strategy.kind=fsdp", "strategy.fsdp.version=2"],
    "zero2": ["resources.num_workers=2", "strategy.kind=deepspeed", "strategy.deepspeed.stage=2"],
    "zero3": ["resources.num_workers=2", "strategy.kind=deepspeed", "strategy.deepspeed.stage=3"],
}


def stall(
    server,
    size: str,
    model: Path,
    output_uri: str,
    asynchronous: bool,
    steps: int,
    every: int,
    strategy: str = "ddp",
) -> Stall:
    env = {**os.environ, **server.env(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft_cluster.driver",
            "--executor=torchrun",
            "jobs/smoke.yaml",
            f"model.name_or_path={model}",
            f"output_uri={output_uri}",
            f"storage.endpoint_url={server.endpoint}",
            "tracking=none",
            f"train.max_steps={steps}",
            f"checkpoint.every_n_steps={every}",
            *STRATEGIES[strategy],
            f"checkpoint.async_upload={str(asynchronous).lower()}",
            *MODELS[size][1],
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    held = [float(s) for step, s in HELD.findall(result.stderr) if int(step) < steps]  # not the final one
    options = {"client_kwargs": {"endpoint_url": server.endpoint}} if output_uri.startswith("s3://") else {}
    fs, path = storage.filesystem(output_uri, options)
    records = [json.loads(line) for line in fs.cat_file(f"{path}/metrics.jsonl").decode().splitlines()]
    times = {r["step"]: r["time"] for r in records}
    durations = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    # The save at the end of step N shows in the duration of step N+1.
    saved = range(every, steps, every)
    normal = [d for s, d in durations.items() if (s - 1) % every != 0 and s > 2]
    median = statistics.median(normal)
    return Stall(
        held_s=statistics.mean(held),
        after_save_s=statistics.mean(durations[s + 1] - median for s in saved if s + 1 in durations),
        interval_s=statistics.mean(
            sum(durations[s + k] - median for k in range(1, every + 1) if s + k in durations) for s in saved
        ),
        step_s=median,
    )


def faults(tmp: Path) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp / "home")}
    (tmp / "home").mkdir(exist_ok=True)
    job = ["jobs/smoke.yaml", "train.max_steps=60", "checkpoint.every_n_steps=10", "tracking=none"]
    out = {}
    for kind in ("kill", "preempt"):
        run = tmp / kind
        proc = subprocess.Popen(
            [*CLI, "run", *job, f"output_uri={run}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not (run / "checkpoints" / "step-00000010" / "COMMITTED").exists():
            time.sleep(0.1)
        while len((run / "metrics.jsonl").read_text().splitlines()) < 15:
            time.sleep(0.05)
        at = time.time()
        last_step = len((run / "metrics.jsonl").read_text().splitlines())
        if kind == "kill":
            worker = next(
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if "RayTrainWorker" in " ".join(p.cmdline())
            )
            worker.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            proc.send_signal(signal.SIGUSR1)
            proc.wait()
            stopped_at = json.loads((run / "summary.json").read_text())["steps"]
            subprocess.run([*CLI, "resume", str(run)], cwd=REPO, env=env, capture_output=True, check=True)
        summary = json.loads((run / "summary.json").read_text())
        resumed = summary["resumed_from"][0]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if kind == "kill":
            first_after = min(r["time"] for r in records if r["step"] == resumed + 1)
            out["recovery_seconds"] = first_after - at
            out["recomputed_after_kill"] = max(0, last_step - resumed)
        else:
            out["recomputed_after_preempt"] = stopped_at - resumed
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-mb", type=int, default=300)
    parser.add_argument("--model", choices=sorted(MODELS), default="25m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--stall-only", action="store_true", help="only part 2")
    parser.add_argument("--targets", default="s3,local", help="where part 2's runs write: s3, local or both")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="ddp", help="part 2's runs")
    args = parser.parse_args()
    targets = args.targets.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    (tmp / "s3").mkdir()
    stalls: dict[tuple[str, bool], Stall] = {}
    with seaweedfs(tmp / "s3") as server:
        os.environ.update(server.env())  # credentials from the environment, as for users
        if not args.stall_only:
            commit_s, put_s = commit_vs_put(server, tmp, args.state_mb)
        model = bigger_model(tmp, args.model)
        paired = step_path(tmp, model, rounds=3)
        print(f"{args.model} step path (async, sync): {paired}", flush=True)
        for target in targets:
            for asynchronous in (True, False):
                where = (
                    f"s3://{server.make_bucket()}/run" if target == "s3" else str(tmp / f"run-{asynchronous}")
                )
                found = stall(
                    server, args.model, model, where, asynchronous, args.steps, args.every, args.strategy
                )
                stalls[target, asynchronous] = found
                print(f"{args.model} {args.strategy} to {target}, async {asynchronous}: {found}", flush=True)
    if not args.stall_only:
        fault = faults(tmp)
        print(
            f"commit of {args.state_mb} MB to S3: {commit_s:.2f} s; plain fsspec put: {put_s:.2f} s; "
            f"ratio {commit_s / put_s:.3f}"
        )
    print(
        f"{args.model} training thread per checkpoint to local storage, saves alternating in one "
        f"process: async {paired[0]:.3f} s, sync {paired[1]:.3f} s; ratio {paired[0] / paired[1]:.3f}"
    )
    for target in targets:
        ours, sync = stalls[target, True], stalls[target, False]
        print(
            f"{args.model} {args.strategy} to {target}: training held per checkpoint: async "
            f"{ours.held_s:.2f} s, sync {sync.held_s:.2f} s; ratio {ours.held_s / sync.held_s:.3f}. "
            "Step after a save minus "
            f"the median step ({ours.step_s:.2f} s): async {ours.after_save_s:.2f} s, sync "
            f"{sync.after_save_s:.2f} s; over the interval: async {ours.interval_s:.2f} s, sync "
            f"{sync.interval_s:.2f} s"
        )
    if not args.stall_only:
        print(
            f"worker SIGKILL -> next completed step: {fault['recovery_seconds']:.1f} s; "
            f"steps recomputed: {fault['recomputed_after_kill']}"
        )
        print(f"preemption signal: steps recomputed {fault['recomputed_after_preempt']}")


if __name__ == "__main__":
    main()
