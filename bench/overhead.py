"""sft-cluster run vs a plain TRL script under torchrun, side by side.

    .venv/bin/python bench/overhead.py [--steps 150]

Both train the smoke job (same model, data, batch, steps, 2 CPU processes).
Prints time from launch to the first optimizer step, steady-state tokens/s
(first to last logged step), peak memory of the whole process tree, and the
ratios sft-cluster / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sft_cluster.tracking.summary import steady_tokens_per_second  # noqa: E402


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Run ``cmd``; return (start time, wall seconds, peak RSS of its process tree)."""
    start = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return start, time.time() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1"}
    (tmp / "home").mkdir()

    out = tmp / "sftc"
    start, wall, peak = run_measured(
        [
            sys.executable,
            "-m",
            "sft_cluster",
            "run",
            "jobs/smoke.yaml",
            f"output_uri={out}",
            f"train.max_steps={args.steps}",
            "tracking=none",
        ],
        env,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ours = {
        "first_step": records[0]["time"] - start,
        "tps": steady_tokens_per_second(records),
        "wall": wall,
        "peak_gib": peak / 2**30,
    }

    timeline = tmp / "plain.jsonl"
    start, wall, peak = run_measured(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(REPO / "bench" / "plain_trl.py"),
            str(timeline),
            str(args.steps),
        ],
        env,
    )
    records = [json.loads(line) for line in timeline.read_text().splitlines()]
    base = {
        "first_step": records[0]["time"] - start,
        "tps": steady_tokens_per_second(records),
        "wall": wall,
        "peak_gib": peak / 2**30,
    }

    print(f"{'':28}{'sft-cluster run':>18}{'torchrun + TRL':>18}{'ratio':>10}")
    rows = [
        ("time to first step (s)", "first_step"),
        ("steady tokens/s", "tps"),
        ("wall time (s)", "wall"),
        ("peak memory, tree (GiB)", "peak_gib"),
    ]
    for label, key in rows:
        print(f"{label:28}{ours[key]:>18.2f}{base[key]:>18.2f}{ours[key] / base[key]:>10.3f}")


if __name__ == "__main__":
    main()
