"""Shared fixtures: an isolated HOME and environment for everything the tests start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sft_cluster"]


def isolated_environment(home: Path) -> dict[str, str]:
    """Environment for a subprocess: its own HOME (Ray writes ~/.ray), offline hub."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="120")
    # DeepSpeed's compiled ops are cached outside HOME (the Makefile sets the same place).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    return isolated_environment(tmp_path / "home")


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path = REPO):
    """Run ``sft-cluster ARGS`` as a user would and capture everything it prints."""
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


TORCHRUN_DRIVER = [sys.executable, "-m", "sft_cluster.driver", "--executor=torchrun"]


def run_torchrun(job_yaml: Path, env: dict[str, str], *overrides: str, nproc: int = 2):
    """The driver with its torchrun executor, as the Slurm torchrun template starts it on each node
    (one node here): it prepares the run, runs torchrun's agent in-process, writes the summary."""
    return subprocess.run(
        [*TORCHRUN_DRIVER, str(job_yaml), *overrides, f"--nproc-per-node={nproc}"],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the final weights of two run directories."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# The uninterrupted run that runs with faults (test_fault_tolerance) and across nodes
# (test_multinode) must end equal to: the smoke job, 2 workers, 60 steps.
REFERENCE_STEPS = 60
REFERENCE_JOB = [
    "jobs/smoke.yaml",
    f"train.max_steps={REFERENCE_STEPS}",
    "checkpoint.every_n_steps=10",
    "checkpoint.keep_last=3",
    "train.eval_every_n_steps=20",
    "tracking=none",
]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """REFERENCE_JOB run once on the embedded cluster, uninterrupted: its run directory."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    result = run_cli(["run", *REFERENCE_JOB, f"output_uri={out}"], isolated_environment(tmp / "home"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out
