"""Checkpoints, metrics and the final model on a real S3 server (SeaweedFS on loopback).

The data is read from s3:// too. Credentials reach the job only through the
environment; the object listing proves the layout, and resume works from S3.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil

from tests.conftest import REPO, TORCHRUN_DRIVER, isolated_environment, run_cli, run_torchrun
from tests.fixtures.s3 import s3_server  # noqa: F401 - fixture


def test_run_reads_its_data_from_s3_and_writes_the_run_there(s3_server, tmp_path):  # noqa: F811
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    client.upload_file("sft_cluster/assets/smoke-chat.jsonl", bucket, "data/chat.jsonl")
    env = {**isolated_environment(tmp_path / "home"), **s3_server.env()}
    uri = f"s3://{bucket}/runs/s3smoke"
    common = [
        "jobs/smoke.yaml",
        f"output_uri={uri}",
        f"storage.endpoint_url={s3_server.endpoint}",
        f"data.sources=[{{uri: 's3://{bucket}/data/chat.jsonl'}}]",
        "checkpoint.every_n_steps=10",
        "checkpoint.keep_last=2",
        "tracking=none",
    ]
    first = run_cli(["run", *common, "train.max_steps=20"], env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    keys = s3_server.keys(bucket, "runs/s3smoke/")
    names = {k.removeprefix("runs/s3smoke/") for k in keys}
    for expected in (
        "job.yaml",
        "metrics.jsonl",
        "summary.json",
        "loss.png",
        "final/model.safetensors",
        "final/tokenizer.json",
        "checkpoints/step-00000020/COMMITTED",
        "checkpoints/step-00000020/manifest.json",
        "checkpoints/step-00000020/optimizer.pt",
        "checkpoints/step-00000020/rng_state_1.pth",
        "workers/rank-00001.json",
    ):
        assert expected in names, (expected, sorted(names))
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key="runs/s3smoke/checkpoints/step-00000020/manifest.json")[
            "Body"
        ].read()
    )
    size = client.head_object(Bucket=bucket, Key="runs/s3smoke/checkpoints/step-00000020/model.safetensors")[
        "ContentLength"
    ]
    assert manifest["files"]["model.safetensors"]["size"] == size
    assert (
        json.loads(client.get_object(Bucket=bucket, Key="runs/s3smoke/summary.json")["Body"].read())["status"]
        == "completed"
    )

    steps = [
        json.loads(line)["step"]
        for line in client.get_object(Bucket=bucket, Key="runs/s3smoke/metrics.jsonl")["Body"]
        .read()
        .decode()
        .splitlines()
    ]
    assert steps == list(range(1, 21))
    # Resuming from the bucket: test_ray_jobs (a resubmit, longer) and test_multinode (a node lost).
    assert (
        "AWS_SECRET_ACCESS_KEY" not in first.stdout
        and s3_server.secret_key not in first.stdout + first.stderr
    )
    assert (
        s3_server.secret_key
        not in client.get_object(Bucket=bucket, Key="runs/s3smoke/job.yaml")["Body"].read().decode()
    )


def test_metrics_are_durable_to_the_last_commit_and_each_rank_fetches_only_its_share(
    s3_server,  # noqa: F811
    tmp_path,
):
    """A run on S3 killed right after a commit keeps its metrics up to that commit; the resume
    fetches rank 1's two files (RNG state, data cursor) for it and the rest once, then cleans up."""
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    (tmp_path / "tmpdir").mkdir()
    env = {**isolated_environment(tmp_path / "home"), **s3_server.env(), "TMPDIR": str(tmp_path / "tmpdir")}
    prefix = "runs/durable"
    job = [
        f"output_uri=s3://{bucket}/{prefix}",
        f"storage.endpoint_url={s3_server.endpoint}",
        "checkpoint.every_n_steps=10",
        "train.max_steps=40",
        "tracking=none",
    ]
    proc = subprocess.Popen(
        [*TORCHRUN_DRIVER, str(REPO / "jobs" / "smoke.yaml"), *job, "--nproc-per-node=2"],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = f"{prefix}/checkpoints/step-00000020/COMMITTED"
    deadline = time.time() + 300
    while marker not in s3_server.keys(bucket, f"{prefix}/checkpoints/step-00000020/"):
        assert proc.poll() is None and time.time() < deadline, "no commit at step 20"
        time.sleep(0.1)
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    proc.kill()
    proc.wait()
    text = client.get_object(Bucket=bucket, Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps[:20] == list(range(1, 21)), steps  # nothing up to the commit was lost

    resumed = run_torchrun(REPO / "jobs" / "smoke.yaml", env, *job)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    resumed_from = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/summary.json")["Body"].read())[
        "resumed_from"
    ]
    assert resumed_from and resumed_from[0] >= 20
    assert "rank 1 fetched 2 files" in log and "rank 0 fetched" in log, log[-3000:]
    assert not list((tmp_path / "tmpdir").glob("sftc-stage-*"))  # staging removed, killed ones too
