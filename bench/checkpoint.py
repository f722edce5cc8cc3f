"""Checkpoint costs, side by side in one run, on a real S3 server (SeaweedFS on loopback).

    .venv/bin/python bench/checkpoint.py [--state-mb 300]

1. Commit time of our protocol (upload + sha256 manifest + COMMITTED) vs a plain
   ``fsspec put`` of the same bytes to the same bucket.
2. Training-step stall per checkpoint with async upload vs synchronous upload
   (the real worker, a ~25M-parameter Llama: ~300 MB of model + optimizer state).
3. Recovery from a SIGKILLed Ray Train worker to the next completed step, and
   steps recomputed after the kill and after a preemption signal (smoke job).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
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


def bigger_model(tmp: Path) -> Path:
    from transformers import LlamaConfig

    model = tmp / "model-25m"
    shutil.copytree(REPO / "sft_cluster" / "assets" / "tiny-llama", model)
    base = json.loads((model / "config.json").read_text())
    LlamaConfig(
        **{
            **base,
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
        }
    ).save_pretrained(model)
    return model


def stall(server, tmp: Path, model: Path, asynchronous: bool) -> tuple[float, float]:
    """(mean extra seconds of a step that saved, median step seconds)."""
    bucket = server.make_bucket()
    env = {**os.environ, **server.env(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    steps, every = 40, 10
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft_cluster.driver",
            "--executor=torchrun",
            "jobs/smoke.yaml",
            f"model.name_or_path={model}",
            f"output_uri=s3://{bucket}/run",
            f"storage.endpoint_url={server.endpoint}",
            "tracking=none",
            f"train.max_steps={steps}",
            f"checkpoint.every_n_steps={every}",
            "resources.num_workers=1",
            f"checkpoint.async_upload={str(asynchronous).lower()}",
            "data.max_seq_len=128",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    fs, _ = storage.filesystem(f"s3://{bucket}", {"client_kwargs": {"endpoint_url": server.endpoint}})
    records = [json.loads(line) for line in fs.cat_file(f"{bucket}/run/metrics.jsonl").decode().splitlines()]
    times = {r["step"]: r["time"] for r in records}
    durations = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    # The save at the end of step N shows in the duration of step N+1.
    saving = [durations[s + 1] for s in range(every, steps, every) if s + 1 in durations]
    normal = [d for s, d in durations.items() if (s - 1) % every != 0 and s > 2]
    median = statistics.median(normal)
    return statistics.mean(saving) - median, median


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
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    (tmp / "s3").mkdir()
    with seaweedfs(tmp / "s3") as server:
        os.environ.update(server.env())  # credentials from the environment, as for users
        commit_s, put_s = commit_vs_put(server, tmp, args.state_mb)
        model = bigger_model(tmp)
        async_stall, step_s = stall(server, tmp, model, asynchronous=True)
        sync_stall, _ = stall(server, tmp, model, asynchronous=False)
    fault = faults(tmp)
    print(
        f"commit of {args.state_mb} MB to S3: {commit_s:.2f} s; plain fsspec put: {put_s:.2f} s; "
        f"ratio {commit_s / put_s:.3f}"
    )
    print(
        f"step stall per checkpoint (median step {step_s:.2f} s): async {async_stall:.2f} s, "
        f"sync {sync_stall:.2f} s; ratio {async_stall / sync_stall:.3f}"
    )
    print(
        f"worker SIGKILL -> next completed step: {fault['recovery_seconds']:.1f} s; "
        f"steps recomputed: {fault['recomputed_after_kill']}"
    )
    print(f"preemption signal: steps recomputed {fault['recomputed_after_preempt']}")


if __name__ == "__main__":
    main()
