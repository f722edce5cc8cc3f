"""The run claim on a real local run directory: whose commits these are, and what a start may do."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_cluster.checkpoint import CheckpointStore, Manifest, hash_local_dir
from sft_cluster.driver.claim import RunComplete, RunRefused, check_start, claim_run
from sft_cluster.spec import load_job
from sft_cluster.tracking import RUN_ID_ENV, run_dir_of

REPO = Path(__file__).resolve().parents[2]


def _job(out: Path, *overrides: str):
    return load_job(REPO / "jobs" / "smoke.yaml", [f"output_uri={out}", "train.max_steps=20", *overrides])


def _commit(out: Path, step: int, tmp: Path) -> None:
    local = tmp / f"staged-{step}"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"m" * step)
    store = CheckpointStore(str(out / "checkpoints"))
    store.upload(local, step)
    store.commit(Manifest(step=step, files=hash_local_dir(local)))


def test_a_restart_of_the_same_run_resumes_even_with_resume_never(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(RUN_ID_ENV, "slurm-1234")  # what a requeued Slurm job carries again
    claim_run(_job(out, "checkpoint.resume=never"), 2, print)
    assert run_dir_of(_job(out)).read_json(str(out / "run.json"))["run_id"] == "slurm-1234"
    _commit(out, 10, tmp_path)
    assert check_start(_job(out, "checkpoint.resume=never")) is True  # its own commits
    monkeypatch.setenv(RUN_ID_ENV, "slurm-9999")  # another job into the same folder
    with pytest.raises(RunRefused, match="holds committed checkpoints of an earlier run"):
        check_start(_job(out, "checkpoint.resume=never"))
    assert check_start(_job(out)) is True  # resume: auto continues that run


def test_a_committed_last_step_is_complete_only_with_its_final_model(tmp_path):
    out = tmp_path / "run"
    _commit(out, 20, tmp_path)
    assert check_start(_job(out)) is True  # final/ missing: the worker writes it, trains nothing
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    with pytest.raises(RunComplete, match="already completed: step 20 of train.max_steps 20"):
        check_start(_job(out))
    assert check_start(_job(out, "train.max_steps=30")) is True  # asked for more: it continues


def test_a_local_output_uri_is_refused_when_several_nodes_can_run_workers(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunRefused) as refused:
        claim_run(_job(out), 2, print, nodes=2)
    message = str(refused.value)
    assert f"output_uri = '{out}' is a local path, and 2 nodes can run" in message
    assert "s3://BUCKET/runs/smoke" in message and "storage.shared_filesystem: true" in message
    assert not out.exists()  # refused before anything was written
    claim_run(_job(out, "storage.shared_filesystem=true"), 2, print, nodes=2)  # NFS, Lustre: allowed
    claim_run(_job(tmp_path / "one-node"), 2, print, nodes=1)
    assert (out / "run.json").exists() and (tmp_path / "one-node" / "run.json").exists()


def test_torchrun_on_several_nodes_refuses_a_local_output_uri(tmp_path):
    """The torchrun executor's claim counts its nodes (one agent per node): nothing is written."""
    from rich.console import Console

    from sft_cluster.driver.run import drive
    from sft_cluster.driver.torchrun import TorchrunExecutor

    executor = TorchrunExecutor(tmp_path / "job.yaml", 2, 1, "127.0.0.1:1", "test")
    console = Console(record=True, width=400)
    summary = drive(_job(tmp_path / "run"), executor, console)
    assert summary["status"] == "rejected"
    assert "2 nodes can run this job's workers" in console.export_text()
    assert executor.exit_code is None  # no agent was started
    assert not (tmp_path / "run").exists()


def test_liger_without_liger_kernel_is_refused_by_the_claim_before_anything_is_written(tmp_path, monkeypatch):
    """Checked on the cluster (the claim): the submitting machine may lack what its image has."""
    import transformers.utils
    from rich.console import Console

    from sft_cluster.driver.run import drive
    from sft_cluster.driver.torchrun import TorchrunExecutor

    out = tmp_path / "run"
    job = _job(out, "strategy.liger=true", "resources.gpus_per_worker=1")
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: False)
    with pytest.raises(RunRefused) as refused:
        claim_run(job, 2, print)
    assert str(refused.value) == (
        "strategy.liger = true but the liger_kernel package (0.3.0 or newer) is not installed where "
        "this run starts (pip install liger-kernel in the cluster's environment, or remove strategy.liger)"
    )
    executor = TorchrunExecutor(tmp_path / "job.yaml", 1, 2, None, "test")
    console = Console(record=True, width=400)
    assert drive(job, executor, console)["status"] == "rejected"  # the driver exits 2
    assert "the liger_kernel package (0.3.0 or newer) is not installed" in console.export_text()
    assert executor.exit_code is None  # no worker was started
    assert not out.exists()
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: True)
    claim_run(job, 2, print)  # where it is installed, the run starts
    assert (out / "run.json").exists()
