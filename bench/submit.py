"""`sft-cluster submit` vs `ray job submit` of the plain TRL script, on the same Ray head.

    .venv/bin/python bench/submit.py [--steps 20] [--repeats 2]

Starts its own Ray head (2 CPUs, free ports, own temp dir; stopped by process
id afterwards). Each round submits the smoke job with `sft-cluster submit` and
`bench/plain_trl.py` under torchrun with `ray job submit --no-wait`, one at a
time, alternating which goes first. Measures, from the moment the submit
command starts:

- submit command: until the command returns (validate + package + submit);
- first step: until the first optimizer step is logged (our metrics.jsonl,
  the baseline's timeline file);
- for sft-cluster, where the time goes: until the driver is connected
  (summary.json's time_to_first_step_seconds counts from there), and from
  there through Ray Train's worker group to the first step;

and prints the medians and the ratios sft-cluster / baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.fixtures.ray_head import RAY, start_ray_head, stop_ray_head  # noqa: E402


def wait_done(address: str, job_id: str, trained=None, timeout: float = 600) -> None:
    """Until the job SUCCEEDED; or, once ``trained()`` says all steps ran, at most 20 s more.

    The plain script sometimes hangs after its last step in ``destroy_process_group``:
    its measurement is complete then, so the job is stopped rather than waited for.
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout
    trained_at = None
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            if status.value != "SUCCEEDED":
                sys.exit(f"{job_id}: {status.value}\n{client.get_job_logs(job_id)[-3000:]}")
            return
        if trained is not None and trained_at is None and trained():
            trained_at = time.monotonic()
        if trained_at is not None and time.monotonic() - trained_at > 20:
            print(f"  ({job_id}: all steps done but the job did not end; stopped it)", flush=True)
            client.stop_job(job_id)
            while not client.get_job_status(job_id).is_terminal():
                time.sleep(0.5)
            return
        time.sleep(0.5)
    sys.exit(f"{job_id}: not done after {timeout} s")


def warm_up(head) -> None:
    """The head's first job pays for starting the job machinery: neither side should."""
    from ray.job_submission import JobSubmissionClient

    start = time.time()
    job_id = JobSubmissionClient(head.address).submit_job(entrypoint="python -c pass")
    wait_done(head.address, job_id)
    print(f"warm-up job (python -c pass): {time.time() - start:.2f} s", flush=True)


def first_step_time(path: Path) -> float:
    return json.loads(path.read_text().splitlines()[0])["time"]


def ours(head, cluster: Path, env: dict, out: Path, steps: int) -> dict[str, float]:
    command = [sys.executable, "-m", "sft_cluster", "submit", "jobs/smoke.yaml", "--cluster", str(cluster)]
    command += [f"train.max_steps={steps}", f"output_uri={out}", "tracking=none"]
    start = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    submitted = time.time() - start
    if result.returncode != 0:
        sys.exit(f"sft-cluster submit failed:\n{result.stdout}\n{result.stderr}")
    job_id = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("submitted "))
    wait_done(head.address, job_id)
    first = first_step_time(out / "metrics.jsonl")
    in_driver = json.loads((out / "summary.json").read_text())["time_to_first_step_seconds"]
    return {"submit": submitted, "first_step": first - start, "driver_ready": first - in_driver - start}


def baseline(head, env: dict, timeline: Path, steps: int) -> dict[str, float]:
    entrypoint = "python -m torch.distributed.run --nproc_per_node 2 bench/plain_trl.py"
    command = [RAY, "job", "submit", "--address", head.address, "--no-wait", "--working-dir", "."]
    command += ["--", *entrypoint.split(), str(timeline), str(steps)]
    start = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    submitted = time.time() - start
    if result.returncode != 0:
        sys.exit(f"ray job submit failed:\n{result.stdout}\n{result.stderr}")
    text = result.stdout + result.stderr
    job_id = text.split("Job '", 1)[1].split("'", 1)[0]
    wait_done(
        head.address,
        job_id,
        trained=lambda: timeline.exists() and len(timeline.read_text().splitlines()) >= steps,
    )
    return {"submit": submitted, "first_step": first_step_time(timeline) - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    head = start_ray_head()
    try:
        cluster = head.cluster_file(tmp / "ray.yaml")
        env = {**head.env, "SFT_CLUSTER_STATE_DIR": str(tmp / "state")}
        warm_up(head)
        rows: dict[str, list[dict[str, float]]] = {"sft": [], "ray": []}
        for round_ in range(args.repeats):
            order = ["sft", "ray"] if round_ % 2 == 0 else ["ray", "sft"]
            for which in order:
                if which == "sft":
                    row = ours(head, cluster, env, tmp / f"sftc-{round_}", args.steps)
                else:
                    row = baseline(head, env, tmp / f"plain-{round_}.jsonl", args.steps)
                rows[which].append(row)
                ready = f", driver ready {row['driver_ready']:6.2f} s" if "driver_ready" in row else ""
                print(
                    f"round {round_ + 1} {which:3}: submit {row['submit']:6.2f} s, "
                    f"first step {row['first_step']:6.2f} s{ready}",
                    flush=True,
                )
    finally:
        stop_ray_head(head)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(which: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[which])

    print()
    print(
        f"{'median of ' + str(args.repeats):28}{'sft-cluster submit':>20}{'ray job submit':>16}{'ratio':>8}"
    )
    for label, key in (("submit command (s)", "submit"), ("submit to first step (s)", "first_step")):
        a, b = median("sft", key), median("ray", key)
        print(f"{label:28}{a:>20.2f}{b:>16.2f}{a / b:>8.2f}")
    ready = median("sft", "driver_ready")
    print(
        f"sft-cluster: submit to driver ready {ready:.2f} s (package, runtime env, imports, ray.init), "
        f"driver ready to first step {median('sft', 'first_step') - ready:.2f} s (Ray Train workers, "
        "as in `sft-cluster run`)"
    )


if __name__ == "__main__":
    main()
