"""The Backend interface: every kind plans a printable request and launches it; the local run is a
backend too; the local-path and credential rules each exist once.

Nothing here starts Ray or Slurm: the embedded cluster, the driver and ``sbatch`` are stand-ins.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

import sft_cluster.driver
from sft_cluster import storage
from sft_cluster.launch import LaunchError, Printed, get_backend
from sft_cluster.launch import local as local_launch
from sft_cluster.launch.base import anchor_local_paths
from sft_cluster.launch.local import LocalBackend
from sft_cluster.launch.ray_jobs import RayJobsBackend
from sft_cluster.launch.slurm import SlurmBackend
from sft_cluster.spec import CLUSTER_ADAPTER, load_job
from sft_cluster.spec.cluster import CREDENTIAL_VAR

REPO = Path(__file__).resolve().parents[2]
NO_IDS = "c.yaml: local runs have no job ids; look in the run directory instead"


def _job(*overrides: str):
    return load_job(REPO / "jobs" / "smoke.yaml", list(overrides))


def _cluster(kind: str, **fields):
    return CLUSTER_ADAPTER.validate_python({"kind": kind, **fields})


@pytest.mark.parametrize(
    ("kind", "backend"), [("local", LocalBackend), ("ray", RayJobsBackend), ("slurm", SlurmBackend)]
)
def test_every_kind_has_a_backend_with_the_whole_interface(kind: str, backend: type) -> None:
    got = get_backend(_cluster(kind), "c.yaml")
    assert isinstance(got, backend) and got.kind == kind
    for method in ("plan", "launch", "status", "logs", "stop", "list"):
        assert callable(getattr(got, method)), method


@pytest.mark.parametrize("kind", ["local", "ray", "slurm"])
def test_every_request_carries_the_resolved_job_and_its_strategy(kind, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    request = get_backend(_cluster(kind), "c.yaml").plan(_job("output_uri=runs/x"))
    assert request.job.output_uri == str(tmp_path / "runs" / "x")
    strategy = request.dry_run()[-1]
    assert strategy.text.startswith("# strategy.json (generated from the job's strategy section)\n{")
    assert json.loads(strategy.text.split("\n", 1)[1])["world_size"] == 2
    assert strategy.stderr == (kind != "local")  # beside a script on stdout, it must not mix in
    assert not (tmp_path / "runs").exists()  # planning writes nothing


# --- the local backend ---------------------------------------------------------------------


def test_local_plan_is_what_run_dry_run_prints(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    backend = LocalBackend(_cluster("local", num_cpus=3), "c.yaml")
    request = backend.plan(_job("output_uri=runs/x", "resources.gpus_per_worker=1"))
    assert request.plan == {
        "launcher": "local (embedded Ray)",
        "ray_init": {"num_cpus": 3},
        "scaling_config": {"num_workers": 2, "resources_per_worker": {"CPU": 1.0, "GPU": 1.0}},
        "backend": "nccl",
        "output_uri": str(tmp_path / "runs" / "x"),
    }
    job_yaml, plan, strategy = request.dry_run()
    assert f"output_uri: {tmp_path / 'runs' / 'x'}" in job_yaml.text
    assert plan == Printed(json.dumps(request.plan, indent=2))
    assert not any(part.stderr or part.verbatim for part in (job_yaml, plan, strategy))


def test_local_cpus_default_to_the_workers_need_or_the_machine() -> None:
    request = LocalBackend(_cluster("local"), "c.yaml").plan(_job("resources.cpus_per_worker=3.5"))
    assert request.num_cpus == max(7, os.cpu_count() or 1)


def test_local_launch_runs_the_driver_in_an_embedded_cluster(monkeypatch) -> None:
    """The driver is imported only inside the embedded cluster (Ray's auth is set by then)."""
    seen: dict = {}

    @contextlib.contextmanager
    def embedded_ray(num_cpus, runtime_env, temp_dir):
        seen.update(num_cpus=num_cpus, env=runtime_env, temp_dir=temp_dir, inside=True)
        yield
        seen["inside"] = False

    def run_training(job, console, started_at=None, verify_fast=False):
        assert seen["inside"]
        seen.update(job=job, started_at=started_at, verify_fast=verify_fast)
        return {"status": "completed", "steps": 3}

    monkeypatch.setattr(local_launch, "embedded_ray", embedded_ray)
    monkeypatch.setattr(sft_cluster.driver, "run_training", run_training, raising=False)
    console = Console(record=True, width=120)
    backend = LocalBackend(_cluster("local", num_cpus=2, temp_dir="/tmp/x"), "c.yaml", console)
    request = replace(backend.plan(_job()), verify_fast=True)
    submission = backend.launch(request)
    assert submission.extra["summary"] == {"status": "completed", "steps": 3}
    assert (submission.backend, submission.id) == ("local", request.job.output_uri)  # its handle: the run dir
    assert seen["job"] == request.job and seen["verify_fast"] is True
    assert seen["started_at"] == submission.submitted_at
    assert (seen["num_cpus"], seen["temp_dir"]) == (2, "/tmp/x")
    assert "worker_process_setup_hook" in seen["env"]
    assert "starting a local Ray cluster (2 CPUs)" in console.export_text()


@pytest.mark.parametrize("call", ["status", "logs", "stop", "list"])
def test_local_runs_have_no_job_ids(call: str) -> None:
    backend = get_backend(_cluster("local"), "c.yaml")
    with pytest.raises(LaunchError) as info:
        getattr(backend, call)() if call == "list" else getattr(backend, call)("x")
    assert str(info.value) == NO_IDS


# --- the Slurm backend's files --------------------------------------------------------------


def test_slurm_files_go_beside_a_local_run_or_under_the_state_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFT_CLUSTER_STATE_DIR", "state")
    backend = SlurmBackend(_cluster("slurm"), "c.yaml")
    assert backend.folder(_job("output_uri=runs/x")) == tmp_path / "runs" / "x" / "slurm"
    assert backend.folder(_job(f"output_uri=file://{tmp_path}/y")) == tmp_path / "y" / "slurm"
    remote = backend.folder(_job("output_uri=s3://bucket/runs/x"))
    assert remote.parent == tmp_path / "state" / "slurm" and remote.name.startswith("smoke-")


def test_slurm_launch_writes_the_planned_files_and_submits_them(tmp_path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho "4242;cluster"\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    backend = SlurmBackend(_cluster("slurm"), "c.yaml")
    request = backend.plan(_job(f"output_uri={tmp_path}/run"))
    submission = backend.launch(request)
    folder = tmp_path / "run" / "slurm"
    assert (submission.id, submission.backend, submission.output_uri) == ("4242", "slurm", f"{tmp_path}/run")
    assert submission.extra == {"script": str(folder / "job.sbatch"), "log": str(folder / "slurm-4242.out")}
    assert (folder / "job.sbatch").read_text() == request.script
    assert load_job(folder / "job.yaml") == request.job
    assert (tmp_path / "sbatch.args").read_text().split() == [
        "--parsable",
        "--export=ALL",
        str(folder / "job.sbatch"),
    ]


# --- one copy of each rule -----------------------------------------------------------------


def test_local_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.is_local("runs/x") and storage.is_local("file:///x") and not storage.is_local("s3://b/x")
    assert storage.absolute_path("runs/x") == tmp_path / "runs" / "x"
    assert storage.absolute_path("file://runs/x") == tmp_path / "runs" / "x"
    assert storage.absolute_path("~/x") == Path.home() / "x"
    with pytest.raises(ValueError):
        storage.absolute_path("s3://b/x")


def test_anchoring_a_job_makes_its_local_paths_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text("")
    job = anchor_local_paths(
        _job(
            "output_uri=file://runs/x",
            "model.name_or_path=model",
            "data.sources=[{uri: data.jsonl}, {uri: s3://bucket/d.jsonl}, {uri: builtin:smoke-chat.jsonl}]",
        )
    )
    assert job.output_uri == str(tmp_path / "runs" / "x")
    assert job.model.name_or_path == str(tmp_path / "model")
    assert [s.uri for s in job.data.sources] == [
        str(tmp_path / "data.jsonl"),
        "s3://bucket/d.jsonl",
        "builtin:smoke-chat.jsonl",
    ]
    hub = anchor_local_paths(_job("model.name_or_path=Qwen/Qwen2.5-0.5B"))
    assert hub.model.name_or_path == "Qwen/Qwen2.5-0.5B"  # not a folder here: a hub id


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("AWS_SESSION_TOKEN", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("MY_SESSION", True),
        ("OPENAI_API_KEY", True),
        ("DB_PASSWD", True),
        ("TOKENIZERS_PARALLELISM", False),
        ("KEYBOARD_LAYOUT", False),
        ("NCCL_SOCKET_IFNAME", False),
    ],
)
def test_one_credential_pattern(name: str, secret: bool) -> None:
    """The cluster file refuses these in env_vars, and the Ray dry run redacts them: one pattern."""
    assert bool(CREDENTIAL_VAR.search(name)) == secret
