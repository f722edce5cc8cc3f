"""Real faults on the embedded Ray cluster: SIGKILLed workers and drivers (the chaos test),
a preemption signal, corrupt checkpoints. Each run must end with the weights and per-step
losses of an uninterrupted run (CPU, DDP over gloo: bitwise in practice; we
allow 1e-6).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from sft_cluster.tracking.goodput import PARTS as GOODPUT_PARTS
from tests.conftest import CLI, REPO, isolated_environment, max_weight_diff, run_cli, run_torchrun
from tests.conftest import REFERENCE_JOB as JOB
from tests.conftest import REFERENCE_STEPS as STEPS


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.2)


def _start(out: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "run", *JOB, f"output_uri={out}", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("faults")
    return tmp, isolated_environment(tmp / "home")


def test_checkpoint_layout_and_retention(reference_run):
    steps = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert steps == ["step-00000040", "step-00000050", "step-00000060"]
    newest = reference_run / "checkpoints" / "step-00000060"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert (newest / "COMMITTED").read_text().strip() == "60"
    for name in (
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state_0.pth",
        "rng_state_1.pth",
    ):
        assert manifest["files"][name]["size"] == (newest / name).stat().st_size


def test_preemption_signal_checkpoints_exits_75_and_resume_finishes(workdir, reference_run):
    tmp, env = workdir
    out = tmp / "preempted"
    proc = _start(out, env)
    _wait_for(out / "checkpoints" / "step-00000010" / "COMMITTED", proc)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)  # a second signal while it saves changes nothing
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted"
    stopped_at = summary["steps"]
    assert 10 < stopped_at < STEPS
    # The step it stopped at is committed: nothing to recompute.
    assert (out / "checkpoints" / f"step-{stopped_at:08d}" / "COMMITTED").exists()
    assert "stop requested" in output

    # Portable: a run started by `run` (Ray) resumes under plain torchrun, as sbatch runs it.
    resumed = run_torchrun(out / "job.yaml", env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == [stopped_at]
    assert summary["launcher"] == "torchrun"
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
    assert max_weight_diff(out, reference_run) <= 1e-6


def test_resume_skips_corrupt_and_uncommitted_checkpoints(workdir, reference_run):
    tmp, env = workdir
    out = tmp / "corrupt"
    shutil.copytree(reference_run, out)
    (out / "final").rename(out / "final-before")
    with (out / "checkpoints" / "step-00000060" / "optimizer.pt").open("r+b") as handle:
        handle.truncate(100)
    (out / "checkpoints" / "step-00000050" / "COMMITTED").unlink()
    result = run_cli(["resume", str(out)], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "step-00000060" in log and "optimizer.pt has 100 bytes" in log
    assert "step-00000050" in log and "no COMMITTED marker" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == [40]
    assert max_weight_diff(out, reference_run) <= 1e-6


def _records(run: Path, name: str) -> list[dict]:
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _committed(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step-*/COMMITTED"))


def _train_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline())
    ]


def _until(condition, proc: subprocess.Popen, what: str, timeout: float = 300, poll: float = 0.005):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return found


# Opt-in (`-m slow`, ~5 min on 2 cores): CI keeps the single-fault tests (preemption, corrupt
# and uncommitted checkpoints, node loss, Slurm requeues) within its time budget.
@pytest.mark.slow
def test_chaos_five_faults_end_with_the_uninterrupted_weights(workdir, reference_run):
    """One run, five seeded faults at five different points; the result is the uninterrupted one."""
    rng = random.Random(20261201)
    tmp, env = workdir
    out = tmp / "chaos"
    faults: list[dict] = []  # what landed where, and when (for recovery times)
    seen: list[psutil.Process] = []

    def last_step() -> int:
        records = _records(out, "metrics.jsonl")
        return records[-1]["step"] if records else 0

    def fault(kind: str, where: str, proc: subprocess.Popen, target: psutil.Process | None = None) -> None:
        seen.extend(psutil.Process(proc.pid).children(recursive=True))
        faults.append({"kind": kind, "where": where, "time": time.time(), "step": last_step()})
        if target is None:
            proc.send_signal(signal.SIGUSR1 if kind == "SIGUSR1 to the driver" else signal.SIGKILL)
        else:
            target.send_signal(signal.SIGKILL)

    # `resume: never` keeps a new run off other runs' checkpoints, never off its own restarts.
    first = _start(out, env, "checkpoint.max_failures=5", "checkpoint.resume=never")
    # 1. A worker dies before anything was committed: the restart starts from step 0.
    threshold = rng.randint(2, 5)
    _until(lambda: last_step() >= threshold and not _committed(out), first, "the first steps")
    fault("worker SIGKILL", "before the first commit", first, rng.choice(_train_workers(first)))

    # 2. A worker dies while a checkpoint is uploaded (files landing, no COMMITTED yet).
    def uploading() -> int | None:
        done = _committed(out)
        for folder in (out / "checkpoints").glob("step-*"):
            step = int(folder.name[5:])
            if step >= 20 and done and step > done[-1] and (folder / "model.safetensors").exists():
                return step
        return None

    step = _until(uploading, first, "an upload in flight")
    fault("worker SIGKILL", "during an upload", first, rng.choice(_train_workers(first)))
    assert not (out / "checkpoints" / f"step-{step:08d}" / "COMMITTED").exists(), "the upload had finished"

    # 3. A worker dies during an evaluation.
    since = time.time()

    def evaluating() -> bool:
        events = [e for e in _records(out, "events.jsonl") if e.get("time", 0) > since]
        started = {e["step"] for e in events if e["event"] == "eval_started"}
        return bool(started - {e["step"] for e in events if e["event"] == "eval_finished"})

    _until(evaluating, first, "an evaluation")
    fault("worker SIGKILL", "during eval", first, rng.choice(_train_workers(first)))

    # 4. The driver is asked to stop right after a commit: it commits the next step, exits 75.
    # Early enough that the stop (the workers poll for it every 2 s) leaves steps for fault 5.
    _until(lambda: any(s >= 30 for s in _committed(out)), first, "a commit at step 30")
    fault("SIGUSR1 to the driver", "right after a commit", first)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 75, output[-4000:]
    assert output.count("restarting the worker group") >= 3, output[-4000:]
    assert "resumed from step" in output
    first_summary = json.loads((out / "summary.json").read_text())
    stopped_at = first_summary["steps"]
    assert stopped_at in _committed(out) and stopped_at < STEPS - 5
    # The goodput report of that drive: three restarts' downtime and lost steps, and the parts add
    # up to the wall time.
    split = first_summary["time_split"]
    assert split["restart_seconds"] > 0 and split["lost_seconds"] > 0 and split["evaluation_seconds"] > 0
    parts = sum(split[f"{part}_seconds"] for part in GOODPUT_PARTS)
    assert abs(parts - first_summary["wall_seconds"]) <= 0.02 * first_summary["wall_seconds"], split
    assert first_summary["goodput"] == pytest.approx(
        split["productive_seconds"] / split["wall_seconds"], abs=1e-3
    )

    # 5. The resumed run's driver is SIGKILLed mid-steps; `sft-cluster resume` finishes.
    second = subprocess.Popen(
        [*CLI, "resume", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    target = min(stopped_at + rng.randint(2, 5), STEPS - 5)
    _until(lambda: last_step() >= target, second, f"step {target}")
    fault("driver SIGKILL", "mid-steps, then `sft-cluster resume`", second)
    second.wait()
    final = run_cli(["resume", str(out)], env)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    assert len({(f["kind"], f["where"]) for f in faults}) == 5
    base, ours = _losses(reference_run), _losses(out)
    records = _records(out, "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step logged once
    assert all(ours[s] == base[s] for s in base), [(s, ours[s], base[s]) for s in base if ours[s] != base[s]]
    assert max_weight_diff(out, reference_run) == 0.0  # bitwise
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["first_loss"] == base[1]
    _, alive = psutil.wait_procs(seen, timeout=60)
    assert not alive, [p.cmdline()[:3] for p in alive]  # no process outlived the run

    # For docs/benchmarks.md: the first drive's goodput (three worker kills, then the stop),
    # then recovery: fault to the first step trained again, and steps redone.
    print("\nfirst drive:", json.dumps(split, sort_keys=True))
    resumes = [e for e in _records(out, "events.jsonl") if e["event"] == "resumed"]
    print("\nfault | lands | step at fault | recovery s | steps recomputed")
    for f, upto in zip(faults, [*(g["time"] for g in faults[1:]), float("inf")], strict=True):
        resumed = next((e for e in resumes if f["time"] < e["time"] < upto), None)
        since, start = (resumed["time"], resumed["step"]) if resumed else (f["time"], 0)
        again = min((r["time"] for r in records if r["time"] > since), default=float("nan"))
        redone = max(0, f["step"] - start)
        print(f"{f['kind']} | {f['where']} | {f['step']} | {again - f['time']:.1f} | {redone}")
