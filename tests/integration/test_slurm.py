"""`sft-cluster sbatch` on a real Slurm (scripts/slurm_services.sh): both templates,
preemption -> checkpoint -> requeue -> resume, hostile values, `status`.

One training at a time (2 cores). Weights are compared as in test_fault_tolerance.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, max_weight_diff, run_cli
from tests.fixtures import slurm as slurm_fixtures
from tests.fixtures.slurm import SlurmHarness, scontrol_job

# The fixtures, visible to pytest in this module.
slurm_services = slurm_fixtures.slurm_services
slurm = slurm_fixtures.slurm

pytestmark = pytest.mark.timeout(1800)

STEPS = 30
JOB = ["jobs/smoke.yaml", f"train.max_steps={STEPS}", "checkpoint.every_n_steps=10", "tracking=none"]
LOCAL = "cluster_configs/slurm-local.yaml"
TORCHRUN = "cluster_configs/slurm-local-torchrun.yaml"
TWO_NODES = "cluster_configs/slurm-local-2node.yaml"


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def ray_baseline(slurm: SlurmHarness) -> Path:
    """The smoke job through the Ray template, uninterrupted, to COMPLETED."""
    out = slurm.tmp / "ray-baseline"
    job_id = slurm.sbatch(*JOB, "--cluster", LOCAL, f"output_uri={out}")
    slurm.wait(job_id, {"COMPLETED"})
    assert "COMPLETED" in slurm.status(job_id)
    return out


def test_smoke_job_through_ray_template_completes(slurm: SlurmHarness, ray_baseline: Path) -> None:
    out = ray_baseline
    assert (out / "final" / "model.safetensors").exists()
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["world_size"] == 2
    script = (out / "slurm" / "job.sbatch").read_text()
    assert script.startswith("#!/bin/bash") and "#SBATCH --requeue" in script
    assert (out / "slurm" / "job.yaml").exists()
    log = next((out / "slurm").glob("slurm-*.out")).read_text()
    assert "Ray node(s) joined" in log and "sft-cluster: exit 0" in log


@pytest.fixture(scope="module")
def torchrun_baseline(slurm: SlurmHarness) -> Path:
    """The smoke job through the torchrun template, uninterrupted."""
    out = slurm.tmp / "torchrun"
    job_id = slurm.sbatch(*JOB, "--cluster", TORCHRUN, f"output_uri={out}")
    slurm.wait(job_id, {"COMPLETED"})
    assert "COMPLETED" in slurm.status(job_id)
    return out


def test_torchrun_template_completes(slurm: SlurmHarness, torchrun_baseline: Path) -> None:
    summary = _summary(torchrun_baseline)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["world_size"] == 2 and summary["launcher"] == "torchrun"
    assert (torchrun_baseline / "final" / "model.safetensors").exists()
    script = (torchrun_baseline / "slurm" / "job.sbatch").read_text()
    assert "--rdzv-backend=c10d" in script


def _committed(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}" / "COMMITTED"


def _submit_and_wait_for_step_10(slurm: SlurmHarness, out: Path, cluster: str) -> str:
    """Submit the smoke job; return its id once step 10 is committed (training is under way)."""
    job_id = slurm.sbatch(*JOB, "--cluster", cluster, f"output_uri={out}")
    slurm.wait(job_id, {"RUNNING"}, timeout=300)
    assert "RUNNING" in slurm.status(job_id)
    deadline = time.monotonic() + 600
    while not _committed(out, 10).exists():
        assert time.monotonic() < deadline, "no checkpoint at step 10"
        assert scontrol_job(job_id).get("JobState") == "RUNNING", scontrol_job(job_id)
        time.sleep(0.5)
    return job_id


def _preempt_and_resume(slurm: SlurmHarness, out: Path, cluster: str) -> tuple[str, dict[str, str]]:
    job_id = _submit_and_wait_for_step_10(slurm, out, cluster)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    # The script forwards the signal, the workers checkpoint and exit 75, the script requeues.
    slurm.wait(job_id, {"PENDING", "REQUEUED"}, timeout=600)
    assert "PENDING" in slurm.status(job_id) or "REQUEUED" in slurm.status(job_id)
    fields = slurm.wait(job_id, {"COMPLETED"}, timeout=900, release_requeued=True)
    assert fields.get("Restarts") == "1", fields
    return job_id, fields


def test_preempted_job_requeues_and_resumes_to_identical_weights(
    slurm: SlurmHarness, ray_baseline: Path
) -> None:
    out = slurm.tmp / "preempted"
    job_id, fields = _preempt_and_resume(slurm, out, LOCAL)
    log = Path(fields["StdOut"]).read_text()
    assert "got SIGUSR1" in log
    assert "requeue 1 of 3" in log
    assert "sft-cluster: exit 75" in log
    assert "attempt 2" in log  # SLURM_RESTART_COUNT=1 in the requeued job
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["resumed_from"] and summary["resumed_from"][0] >= 10
    assert max_weight_diff(out, ray_baseline) <= 1e-6
    assert "COMPLETED" in slurm.status(job_id)


def test_preempted_torchrun_job_requeues_and_resumes_to_identical_weights(
    slurm: SlurmHarness, torchrun_baseline: Path
) -> None:
    out = slurm.tmp / "torchrun-preempted"
    _job_id, fields = _preempt_and_resume(slurm, out, TORCHRUN)
    log = Path(fields["StdOut"]).read_text()
    assert "got SIGUSR1" in log and "requeue 1 of 3" in log and "attempt 2" in log
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert max_weight_diff(out, torchrun_baseline) <= 1e-6


def test_hostile_values_render_and_run_inert(slurm: SlurmHarness) -> None:
    marker = slurm.tmp / "pwned"
    hostile = f"a'b\"c $(touch {marker}) `touch {marker}`; touch {marker} #"
    cluster = slurm.tmp / "hostile-cluster.yaml"
    cluster.write_text((REPO / LOCAL).read_text())
    with cluster.open("a") as handle:
        handle.write(f"extra_sbatch:\n  - {json.dumps('--comment=' + hostile)}\n")
    # (no " #" in the path: the KEY=VALUE override parser reads it as a YAML comment)
    out = slurm.tmp / hostile.removesuffix(" #").replace("/", "_")
    # The job name is checked before anything is rendered.
    rejected = run_cli(["sbatch", *JOB, "--cluster", str(cluster), f"name=x$(touch {marker})"], slurm.env)
    assert rejected.returncode == 2 and "name" in rejected.stderr
    job_id = slurm.sbatch(*JOB, "train.max_steps=4", "--cluster", str(cluster), f"output_uri={out}")
    slurm.wait(job_id, {"COMPLETED"})
    assert not marker.exists(), "a hostile value was executed"
    log = out / "slurm" / f"slurm-{job_id}.out"  # sbatch read the quoted --output path exactly
    assert "sft-cluster: exit 0" in log.read_text()
    logs = run_cli(["logs", job_id], slurm.env)
    assert logs.returncode == 0 and "sft-cluster: exit 0" in logs.stdout, logs.stderr
    assert (out / "final" / "model.safetensors").exists()
    assert not marker.exists()
    flat = marker.as_posix().replace("/", "_")  # the path's own "$(touch ...)", run from any cwd
    assert not list(REPO.glob(f"*{flat}*")) and not (out.parent / flat).exists()


def test_status_of_unknown_job_is_a_clear_error(slurm: SlurmHarness) -> None:
    result = run_cli(["status", "999999", "--cluster", LOCAL], slurm.env)
    assert result.returncode == 2
    assert "unknown Slurm job id '999999'" in result.stderr


def _slurm_nodes_of_training(job_id: str, pattern: str, seen: set[str]) -> None:
    """Add the Slurm node names (SLURMD_NODENAME) of this job's training processes to ``seen``."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if pattern not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME"):
            seen.add(env["SLURMD_NODENAME"])


def _run_watching_nodes(slurm: SlurmHarness, job_id: str, pattern: str) -> tuple[set[str], dict[str, str]]:
    seen: set[str] = set()
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        fields = scontrol_job(job_id)
        if fields.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        _slurm_nodes_of_training(job_id, pattern, seen)
        time.sleep(0.5)
    return seen, slurm.wait(job_id, {"COMPLETED"}, timeout=60)


def test_torchrun_template_on_two_fake_nodes(slurm: SlurmHarness) -> None:
    out = slurm.tmp / "torchrun-2node"
    cluster = slurm.tmp / "torchrun-2node.yaml"
    cluster.write_text((REPO / TWO_NODES).read_text().replace("launcher: ray", "launcher: torchrun"))
    # The fake nodes share this machine's disk: a local output_uri is shared, as on NFS.
    job_id = slurm.sbatch(
        *JOB,
        "train.max_steps=10",
        "storage.shared_filesystem=true",
        "--cluster",
        str(cluster),
        f"output_uri={out}",
    )
    seen, _ = _run_watching_nodes(slurm, job_id, "-m sft_cluster.train")
    assert seen == {"node1", "node2"}
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["nodes"] == ["node1", "node2"]


def test_a_refusal_on_the_first_of_two_torchrun_nodes_ends_both(slurm: SlurmHarness) -> None:
    """The first node's driver refuses (a local output_uri, not declared shared, on 2 nodes); the
    other node's driver waits for its word and ends with the same exit code instead of waiting in
    torchrun's rendezvous (600 s). Nothing is written into the run directory."""
    out = slurm.tmp / "torchrun-2node-refused"
    cluster = slurm.tmp / "torchrun-2node-refused.yaml"
    cluster.write_text((REPO / TWO_NODES).read_text().replace("launcher: ray", "launcher: torchrun"))
    job_id = slurm.sbatch(*JOB, "train.max_steps=10", "--cluster", str(cluster), f"output_uri={out}")
    fields = slurm.wait(job_id, {"FAILED", "COMPLETED"}, timeout=300)
    assert fields.get("JobState") == "FAILED" and fields.get("ExitCode") == "2:0", fields
    log = Path(fields["StdOut"]).read_text()
    assert log.count("2 nodes can run this job's workers") == 1, log[-3000:]
    assert "the first node's driver did not start the run (exit 2)" in log  # the other node
    assert "worker exit codes" not in log  # no agent started on either node
    assert sorted(p.name for p in out.iterdir()) == ["slurm"]  # the claim wrote nothing


def test_ray_template_spans_two_fake_nodes(slurm: SlurmHarness) -> None:
    out = slurm.tmp / "ray-2node"
    # 2 CPUs a worker on 2-CPU nodes: one worker on each node.
    job_id = slurm.sbatch(
        *JOB, "train.max_steps=10", "resources.cpus_per_worker=2", "storage.shared_filesystem=true",
        "--cluster", TWO_NODES, f"output_uri={out}",
    )  # fmt: skip
    seen, fields = _run_watching_nodes(slurm, job_id, "RayTrainWorker")
    log = Path(fields["StdOut"]).read_text()
    assert "2 Ray node(s) joined" in log
    assert seen == {"node1", "node2"}
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["nodes"] == ["node1", "node2"]


def test_step_signal_without_batch_flag_requeues_under_torchrun(slurm: SlurmHarness) -> None:
    """``signal: USR1@60`` (no ``B:``), allowed for torchrun only: Slurm signals the job step, not
    the batch shell (``scancel --signal`` without ``--batch`` does the same). The workers commit and
    exit 75, the agent passes 75 on, and the script requeues."""
    cluster = slurm.tmp / "torchrun-step-signal.yaml"
    cluster.write_text((REPO / TORCHRUN).read_text().replace('"B:USR1@60"', '"USR1@60"'))
    out = slurm.tmp / "step-signal"
    job_id = _submit_and_wait_for_step_10(slurm, out, str(cluster))
    assert "#SBATCH --signal=USR1@60" in (out / "slurm" / "job.sbatch").read_text()
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    fields = slurm.wait(job_id, {"PENDING"}, timeout=300)
    subprocess.run(["scancel", job_id], check=True, timeout=30)  # the requeued attempt is not needed
    assert fields.get("Restarts") == "1", fields
    log = Path(fields["StdOut"]).read_text()
    assert "got SIGUSR1" not in log  # the batch shell never saw the signal
    assert "exit codes [-15, 75]" in log or "exit codes [75]" in log, log[-3000:]
    assert "requeue 1 of 3" in log and "sft-cluster: exit 75" in log
    summary = _summary(out)
    assert summary["status"] == "preempted" and 10 <= summary["steps"] < STEPS
    assert _committed(out, summary["steps"]).exists()


def test_stop_checkpoints_and_ends_without_requeue(slurm: SlurmHarness) -> None:
    out = slurm.tmp / "stopped"
    job_id = _submit_and_wait_for_step_10(slurm, out, TORCHRUN)
    stopped = run_cli(["stop", job_id], slurm.env, timeout=700)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    fields = scontrol_job(job_id)
    # Ended with exit 75, which Slurm calls FAILED and sft-cluster PREEMPTED (checkpointed, resumable).
    assert fields.get("JobState") == "FAILED" and fields.get("ExitCode") == "75:0", fields
    assert fields.get("Restarts") == "0", fields
    summary = _summary(out)
    steps = summary["steps"]
    assert summary["status"] == "preempted" and 10 <= steps < STEPS
    assert _committed(out, steps).exists()
    printed = " ".join(stopped.stdout.split())
    assert f"job {job_id}: PREEMPTED stopped by sft-cluster stop: step {steps}, checkpoint" in printed
    assert f"step {steps}, checkpoint committed (summary.json: status preempted)" in printed
    assert f"(summary.json: status preempted); resume with: sft-cluster resume {out} --cluster" in printed
    log = Path(fields["StdOut"]).read_text()
    assert "got SIGUSR1" in log
    assert f"stopped by sft-cluster stop, not requeued; resume with: sft-cluster resume {out}" in log
    assert "requeue 1 of" not in log and "attempt 2" not in log
    assert not (out / "slurm" / f"stop-{job_id}").exists()  # honoured and removed
    time.sleep(3)
    assert scontrol_job(job_id).get("Restarts") == "0"
    assert f"{job_id}  PREEMPTED  exit 75: a checkpoint was committed" in slurm.status(job_id)
    followed = run_cli(["logs", job_id, "--follow"], slurm.env, timeout=120)
    assert followed.returncode == 75, followed.stderr  # as `run` exits after a checkpointed stop
    assert f"job {job_id} attempt 1" in followed.stdout and f"job {job_id}: PREEMPTED" in followed.stdout
    listed = run_cli(["list"], slurm.env)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr
    again = run_cli(["stop", job_id], slurm.env)
    assert again.returncode == 2
    assert f"Slurm job '{job_id}' is already PREEMPTED: nothing to stop" in again.stderr


def test_stop_now_cancels_a_running_job_and_stop_cancels_a_pending_one(slurm: SlurmHarness) -> None:
    running = slurm.sbatch(*JOB, "--cluster", TORCHRUN, f"output_uri={slurm.tmp / 'stop-now'}")
    slurm.wait(running, {"RUNNING"}, timeout=300)
    stopped = run_cli(["stop", running, "--now"], slurm.env, timeout=300)
    assert stopped.returncode == 0 and f"job {running}: CANCELLED" in stopped.stdout, stopped.stderr
    assert scontrol_job(running).get("JobState") == "CANCELLED"
    later = slurm.tmp / "later.yaml"
    later.write_text((REPO / TORCHRUN).read_text() + "extra_sbatch: ['--begin=now+1hour']\n")
    pending = slurm.sbatch(*JOB, "--cluster", str(later), f"output_uri={slurm.tmp / 'stop-pending'}")
    assert scontrol_job(pending).get("JobState") == "PENDING"
    stopped = run_cli(["stop", pending], slurm.env, timeout=300)
    assert stopped.returncode == 0 and f"job {pending}: CANCELLED" in stopped.stdout, stopped.stderr
    assert scontrol_job(pending).get("JobState") == "CANCELLED"


def test_rejected_submission_is_a_clear_error(slurm: SlurmHarness) -> None:
    cluster = slurm.tmp / "bad-partition.yaml"
    cluster.write_text("kind: slurm\npartition: nosuch\n")
    result = run_cli(["sbatch", *JOB, "--cluster", str(cluster), f"output_uri={slurm.tmp}/bad"], slurm.env)
    assert result.returncode == 2
    # Caught by doctor's fast checks before anything is sent.
    assert result.stderr.startswith("error: no partition nosuch (partitions: debug")
    assert "nothing was submitted" in result.stderr


def test_doctor_probes_a_node_with_one_short_job(slurm: SlurmHarness) -> None:
    result = run_cli(["doctor", *JOB, "--cluster", LOCAL, f"output_uri={slurm.tmp}/doctor"], slurm.env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")}
    assert list(lines) == ["job", "cluster", "resources", "versions", "staging", "stacks", "output", "data"]
    assert "Slurm partition debug: up" in lines["cluster"]
    assert "on a node of partition debug: no Yama; py-spy may read" in lines["stacks"]
    assert "on a node of partition debug: ray 2." in lines["versions"]
    bad = slurm.tmp / "doctor-bad-partition.yaml"
    bad.write_text("kind: slurm\npartition: nosuch\n")
    failed = run_cli(["doctor", *JOB, "--cluster", str(bad), f"output_uri={slurm.tmp}/doctor"], slurm.env)
    assert failed.returncode == 2
    assert "FAIL cluster" in failed.stdout and "fix: set partition in" in failed.stdout
    assert not (slurm.tmp / "doctor").exists()


def test_an_elastic_job_requeued_onto_fewer_nodes_resumes_at_the_size_it_got(slurm: SlurmHarness) -> None:
    """resources.num_workers {min: 1, max: 2}, one torchrun process a node: ``--nodes=1-2``. The job
    starts on both fake nodes; after the step-10 commit node2 is drained and the job preempted, so
    the requeued job gets node1 alone: it resumes on 1 worker, the data left re-planned 2 -> 1."""
    out = slurm.tmp / "torchrun-elastic"
    cluster = slurm.tmp / "torchrun-elastic.yaml"
    cluster.write_text((REPO / TWO_NODES).read_text().replace("launcher: ray", "launcher: torchrun"))
    job_id = slurm.sbatch(
        *JOB, "storage.shared_filesystem=true", "resources.num_workers={min: 1, max: 2}",
        "train.global_batch_size=8", "--cluster", str(cluster), f"output_uri={out}",
    )  # fmt: skip
    assert "#SBATCH --nodes=1-2" in (out / "slurm" / "job.sbatch").read_text()
    slurm.wait(job_id, {"RUNNING"}, timeout=300)
    deadline = time.monotonic() + 600
    while not _committed(out, 10).exists():
        assert time.monotonic() < deadline, "no checkpoint at step 10"
        time.sleep(0.5)
    drain = ["scontrol", "update", "NodeName=node2"]
    subprocess.run([*drain, "State=DRAIN", "Reason=sft-cluster elastic test"], check=True, timeout=30)
    try:
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
        fields = slurm.wait(job_id, {"COMPLETED"}, timeout=900, release_requeued=True)
    finally:
        subprocess.run([*drain, "State=RESUME"], check=False, timeout=30)
    assert fields.get("Restarts") == "1", fields
    log = Path(fields["StdOut"]).read_text()
    assert "torchrun on 2 node(s)" in log and "torchrun on 1 node(s)" in log
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["world_size"] == 1 and summary["nodes"] == ["node1"]
    plan = json.loads((out / "plan.json").read_text())
    [replanned] = plan["history"]
    assert (replanned["from"], replanned["to"]) == (2, 1) and replanned["step"] == summary["resumed_from"][0]
    assert "on 1 workers (the checkpoint was written by 2)" in log
