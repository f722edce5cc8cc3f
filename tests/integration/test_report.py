"""``sft-cluster report`` on a run directory in the real S3 server (SeaweedFS): the time split from
summary.json, printed, and report.png drawn; a folder that is no run is a clear error."""

from __future__ import annotations

import json

from tests.conftest import run_cli
from tests.fixtures.s3 import s3_server  # noqa: F401

SPLIT = {
    "wall_seconds": 50.0,
    "startup_seconds": 10.0,
    "productive_seconds": 30.0,
    "evaluation_seconds": 2.0,
    "checkpoint_seconds": 1.0,
    "data_wait_seconds": 0.5,
    "lost_seconds": 3.0,
    "restart_seconds": 2.5,
    "finish_seconds": 1.0,
    "unaccounted_seconds": 0.0,
    "goodput": 0.6,
}


def test_report_of_a_run_on_object_storage(s3_server, tmp_path):  # noqa: F811
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    summary = {"name": "smoke", "status": "completed", "time_split": SPLIT, "goodput": 0.6}
    records = [
        {"step": s, "loss": 3.0 - s / 10, "tokens_per_second": 1000.0 + s, "time": 100.0 + s}
        for s in (1, 2, 3)
    ]
    client.put_object(Bucket=bucket, Key="run/summary.json", Body=json.dumps(summary).encode())
    client.put_object(
        Bucket=bucket, Key="run/metrics.jsonl", Body="".join(json.dumps(r) + "\n" for r in records).encode()
    )
    client.put_object(
        Bucket=bucket, Key="run/events.jsonl", Body=b'{"event": "resumed", "step": 2, "time": 101.5}\n'
    )
    env = {**s3_server.env(), "HOME": str(tmp_path)}
    out = tmp_path / "figure.png"
    args = ["report", f"s3://{bucket}/run", "--endpoint-url", s3_server.endpoint, "--out", str(out)]
    result = run_cli(args, env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert "30.0 s" in rows["productive"] and "60.0%" in rows["productive"]
    assert "3.0 s" in rows["lost"] and "2.5 s" in rows["restart"]
    assert "60.0%" in rows["goodput"] and "1" in rows["restarts"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    empty = run_cli(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")], env)
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert "no summary.json and no metrics.jsonl here" in empty.stderr
