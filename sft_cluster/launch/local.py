"""The embedded launcher: ``sft-cluster run`` trains in this process, on a Ray cluster only it uses."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from sft_cluster.driver.environment import ray_worker_runtime_env
from sft_cluster.launch.base import (
    JobState,
    LaunchError,
    Printed,
    Submission,
    anchor_local_paths,
    strategy_of,
    strategy_part,
)
from sft_cluster.spec import JobSpec, LocalCluster, dump_job_yaml

# Ray's rule for macOS and Windows, where it keeps a lone node on loopback: with
# clusters "disabled", a new node takes 127.0.0.1 as its address and every Ray
# server binds to the node's address. Ray reads it when it is imported.
_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK_IPS = ("127.0.0.1", "::1")


def _loopback_interface() -> str:
    """The loopback interface's name, for the collective libraries' socket choice."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def loopback_worker_env() -> dict[str, str]:
    """Keep gloo (and NCCL's bootstrap) on loopback: all ranks share this machine."""
    interface = _loopback_interface()
    return {name: os.environ.get(name, interface) for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


@contextmanager
def embedded_ray(num_cpus: int, runtime_env: dict[str, Any], temp_dir: str | None = None) -> Iterator[None]:
    """Start a private local Ray cluster and always shut it down (Ctrl-C included).

    Own temp dir and ports, so it never joins another cluster on the machine.
    Token auth stays on, with a fresh token kept in this process's
    environment instead of ``~/.ray/auth_token``. Everything Ray binds is on
    127.0.0.1 (see docs/design.md, "Embedded cluster on loopback").
    """
    # Ray reads its auth settings and the loopback rule once, when it is imported: set them first.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token":
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ[_RAY_LOOPBACK_ENV] = "0"
    import ray

    env_vars = {**loopback_worker_env(), **(runtime_env.get("env_vars") or {})}
    runtime_env = {**runtime_env, "env_vars": env_vars}
    owned = temp_dir is None
    # Ray's socket paths must stay short: keep the folder directly under /tmp.
    root = temp_dir or tempfile.mkdtemp(prefix="sftc-ray-", dir="/tmp")
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=root,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
        node_ip = ray.util.get_node_ip_address()
        if node_ip not in _LOOPBACK_IPS:  # Ray was imported before the rule was set
            raise RuntimeError(
                f"the embedded Ray cluster took {node_ip}, not loopback: "
                f"import ray only after {_RAY_LOOPBACK_ENV}=0 is set"
            )
        yield
    finally:
        ray.shutdown()
        if owned:
            shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class LocalRequest:
    """A run on this machine: the resolved job, the embedded cluster and training it gets.

    ``verify_fast``: a resume checks checkpoint sizes only, not hashes.
    """

    job: JobSpec
    plan: dict[str, Any]
    strategy: dict[str, Any]
    verify_fast: bool = False

    @property
    def num_cpus(self) -> int:
        return self.plan["ray_init"]["num_cpus"]

    def dry_run(self) -> list[Printed]:
        return [
            Printed(dump_job_yaml(self.job)),
            Printed(json.dumps(self.plan, indent=2)),
            strategy_part(self.strategy, stderr=False),
        ]


class LocalBackend:
    """``run``: train here, in this process; a local run has no job id to follow or stop."""

    kind = "local"

    def __init__(self, cluster: LocalCluster, cluster_file: str, console: Console | None = None):
        self.cluster = cluster
        self.cluster_file = cluster_file
        self.console = console or Console()

    def plan(self, job: JobSpec) -> LocalRequest:
        job = anchor_local_paths(job)
        r = job.resources
        needed = int(r.max_workers * r.cpus_per_worker + 0.999)
        plan = {
            "launcher": "local (embedded Ray)",
            "ray_init": {"num_cpus": self.cluster.num_cpus or max(needed, os.cpu_count() or 1)},
            "scaling_config": {
                "num_workers": [r.min_workers, r.max_workers] if r.elastic else r.num_workers,
                "resources_per_worker": {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker},
            },
            "backend": "nccl" if r.gpus_per_worker else "gloo",
            "output_uri": job.output_uri,
        }
        return LocalRequest(job, plan, strategy_of(job))

    def launch(self, request: LocalRequest) -> Submission:
        """Train to the end; the run summary is ``extra["summary"]``, the run directory the id."""
        started_at = time.time()
        job = request.job
        self.console.print(f"[dim]starting a local Ray cluster ({request.num_cpus} CPUs)[/dim]")
        with embedded_ray(request.num_cpus, ray_worker_runtime_env(job), self.cluster.temp_dir):
            from sft_cluster.driver import run_training  # imports ray: only after its auth is set

            summary = run_training(job, self.console, started_at=started_at, verify_fast=request.verify_fast)
        return Submission(
            id=job.output_uri,
            backend=self.kind,
            cluster_file=self.cluster_file,
            name=job.name,
            output_uri=job.output_uri,
            submitted_at=started_at,
            extra={"summary": summary},
        )

    def _no_ids(self) -> LaunchError:
        return LaunchError(
            f"{self.cluster_file}: local runs have no job ids; look in the run directory instead"
        )

    def status(self, job_id: str) -> JobState:
        raise self._no_ids()

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        raise self._no_ids()

    def stop(self, job_id: str, now: bool = False, wait_seconds: float = 600) -> JobState:
        raise self._no_ids()

    def list(self) -> list[JobState]:
        raise self._no_ids()
