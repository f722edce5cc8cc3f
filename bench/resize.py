"""Final loss of a run resumed on another world size, against the same run uninterrupted.

    .venv/bin/python bench/resize.py [--steps 40] [--strategies ddp fsdp2 zero3 zero2 lora-ddp lora-zero3]

For each strategy: the smoke job on 2 CPU workers (torchrun through the driver,
gloo), constant learning rate, global batch 8 (``train.global_batch_size``),
a commit every ``steps / 2``, to the end (the reference); then copies of it cut
back to the middle commit resume on 4 and on 1 worker. Prints the final loss
of each and its ratio to the reference (target, issue #15: within 15%), and
the mean loss over the resumed half beside the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ddp": ["strategy.kind=ddp"],
    "fsdp2": ["strategy.kind=fsdp", "strategy.fsdp.version=2"],
    "zero3": ["strategy.kind=deepspeed", "strategy.deepspeed.stage=3"],
    "zero2": ["strategy.kind=deepspeed", "strategy.deepspeed.stage=2"],
    "lora-ddp": ["strategy.kind=ddp", "strategy.lora={merge: true}"],
    "lora-zero3": ["strategy.kind=deepspeed", "strategy.deepspeed.stage=3", "strategy.lora={merge: true}"],
}


def driver(job: Path, out: Path, workers: int, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sft_cluster.driver", "--executor=torchrun", str(job)]
    result = subprocess.run(
        [*command, *overrides, f"output_uri={out}", f"--nproc-per-node={workers}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"{out.name}: exit {result.returncode}\n{result.stderr[-3000:]}")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--strategies", nargs="+", default=["ddp", "fsdp2", "zero3"], choices=list(STRATEGIES)
    )
    args = parser.parse_args()
    half = args.steps // 2
    common = [
        f"train.max_steps={args.steps}",
        f"checkpoint.every_n_steps={half}",
        "train.lr_scheduler=constant",
        "train.global_batch_size=8",
        "tracking=none",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-resize-") as tmp:
        for name in args.strategies:
            reference = Path(tmp) / f"{name}-2"
            driver(REPO / "jobs" / "smoke.yaml", reference, 2, *common, *STRATEGIES[name])
            base = losses(reference)
            for workers in (4, 1):
                out = Path(tmp) / f"{name}-2-to-{workers}"
                shutil.copytree(reference, out)
                shutil.rmtree(out / "checkpoints" / f"step-{args.steps:08d}")
                shutil.rmtree(out / "final")
                driver(out / "job.yaml", out, workers)
                resumed = losses(out)
                rows.append(
                    {
                        "strategy": name,
                        "resize": f"2 -> {workers}",
                        "final_loss": resumed[-1],
                        "reference_final_loss": base[-1],
                        "ratio": resumed[-1] / base[-1],
                        "mean_resumed_half": sum(resumed[half:]) / len(resumed[half:]),
                        "reference_mean": sum(base[half:]) / len(base[half:]),
                    }
                )
                row = rows[-1]
                print(
                    f"{name:6} {row['resize']}: final loss {row['final_loss']:.4f} vs "
                    f"{row['reference_final_loss']:.4f} uninterrupted (x{row['ratio']:.3f}); mean over steps "
                    f"{half + 1}-{args.steps} {row['mean_resumed_half']:.4f} vs {row['reference_mean']:.4f}",
                    flush=True,
                )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
