"""The embedded launcher: an in-process Ray cluster that only this run uses."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from sft_cluster.spec import JobSpec, LocalCluster
from sft_cluster.train.environment import ray_worker_runtime_env

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


def run_local(
    job: JobSpec, cluster: LocalCluster, console: Console, verify_fast: bool = False
) -> dict[str, Any]:
    """``sft-cluster run``: train on this machine; returns the run summary."""
    started_at = time.time()
    needed = int(job.resources.num_workers * job.resources.cpus_per_worker + 0.999)
    num_cpus = cluster.num_cpus or max(needed, os.cpu_count() or 1)
    console.print(f"[dim]starting a local Ray cluster ({num_cpus} CPUs)[/dim]")
    with embedded_ray(num_cpus, ray_worker_runtime_env(job), cluster.temp_dir):
        from sft_cluster.driver import run_training  # imports ray: only after its auth is set

        return run_training(job, console, started_at=started_at, verify_fast=verify_fast)


def anchor_local_paths(job: JobSpec) -> JobSpec:
    """Make relative local paths absolute, so workers resolve them like the user did."""
    from sft_cluster.storage import is_local

    def anchor(uri: str) -> str:
        if uri.startswith("builtin:") or not is_local(uri):
            return uri
        return str(Path(uri.removeprefix("file://")).expanduser().absolute())

    sources = [s.model_copy(update={"uri": anchor(s.uri)}) for s in job.data.sources]
    eval_sources = [s.model_copy(update={"uri": anchor(s.uri)}) for s in job.data.eval]
    model = job.model
    if Path(model.name_or_path).exists():
        model = model.model_copy(update={"name_or_path": anchor(model.name_or_path)})
    return job.model_copy(
        update={
            "output_uri": anchor(job.output_uri),
            "data": job.data.model_copy(update={"sources": sources, "eval": eval_sources}),
            "model": model,
        }
    )


def describe_local(job: JobSpec, cluster: LocalCluster) -> dict[str, Any]:
    """What ``run`` would start, for ``--dry-run``."""
    r = job.resources
    return {
        "launcher": "local (embedded Ray)",
        "ray_init": {
            "num_cpus": cluster.num_cpus
            or max(int(r.num_workers * r.cpus_per_worker + 0.999), os.cpu_count() or 1)
        },
        "scaling_config": {
            "num_workers": r.num_workers,
            "resources_per_worker": {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker},
        },
        "backend": "nccl" if r.gpus_per_worker else "gloo",
        "output_uri": job.output_uri,
    }
