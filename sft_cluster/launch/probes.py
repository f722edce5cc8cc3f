"""The doctor's checks of a cluster, per kind: does it answer, has it the resources this job asks
for, which versions and how much staging space its nodes have (with ``staged``, the bytes a node's
staging must hold: a short probe job)."""

from __future__ import annotations

import os
import shlex
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sft_cluster import storage
from sft_cluster.launch.base import LaunchError
from sft_cluster.launch.doctor import (
    PROBE_SOURCE,
    Check,
    check_data,
    check_output,
    check_stacks,
    check_staging,
    checkpoint_bytes,
    local_staging,
    local_versions,
    parse_probe,
    ptrace_facts,
    versions_agree,
)
from sft_cluster.spec import JobSpec

if TYPE_CHECKING:
    from sft_cluster.launch.local import LocalBackend
    from sft_cluster.launch.ray_jobs import RayJobsBackend
    from sft_cluster.launch.slurm import SlurmBackend

PROBE_TIMEOUT_S = 180.0  # a probe job that has not returned by then is reported as such


def _needs(job: JobSpec) -> tuple[float, float]:
    """(CPUs, GPUs) the job's fewest workers need together."""
    workers = job.resources.min_workers
    return workers * job.resources.cpus_per_worker, workers * job.resources.gpus_per_worker


def _resources(name: str, have: tuple[float, float], job: JobSpec, fix: str) -> Check:
    need_cpus, need_gpus = _needs(job)
    cpus, gpus = have
    detail = f"{cpus:g} CPUs, {gpus:g} GPUs; the job needs {need_cpus:g} CPUs, {need_gpus:g} GPUs"
    ok = cpus >= need_cpus and gpus >= need_gpus
    return Check(name, ok, detail, "" if ok else fix)


def _probe_checks(
    staged: Future[int], found: dict[str, Any] | None, where: str, failure: str
) -> Iterator[Check]:
    """What a probe that ran on a node says: versions there, and staging space there."""
    if found is None:
        yield Check("probe", False, f"the probe job on {where} {failure}", "see the cluster's logs for it")
        return
    yield versions_agree(local_versions(), found["versions"], f"on {where}")
    yield check_staging(
        staged.result(), int(found["staging_free_bytes"]), f"staging {found['staging']} on {where}"
    )
    yield check_stacks(found, f"on {where}")


def diagnose(backend: Any, job: JobSpec, deep: bool) -> Iterator[Check]:
    """Every check for ``job`` on ``backend``'s cluster, as each finishes: the cluster first (one that
    does not answer is the likeliest failure), then the output folder, and with ``deep`` the data.

    Without ``deep`` (what ``submit`` and ``sbatch`` run before sending) only the cluster, Ray's
    version and the output folder are checked: no probe job, no tokenizer, and no resources, as a
    cluster that scales up or a queue may still run a job it cannot hold today."""
    kinds = {"local": local_checks, "ray": ray_checks, "slurm": slurm_checks}
    with ThreadPoolExecutor(1) as pool:
        # The work done here (reading and tokenizing the data, then counting the model's parameters)
        # overlaps the cluster's probe job, in one thread: transformers' lazy imports are not safe
        # from two threads at once.
        data = pool.submit(check_data, job) if deep else None
        staged = pool.submit(checkpoint_bytes, job) if deep else None
        yield from kinds[backend.kind](backend, job, staged)
        if backend.kind == "ray" and storage.is_local(job.output_uri):
            # A Ray Job's local path is the cluster's path (a Slurm cluster shares its file system).
            yield Check("output", True, f"{job.output_uri}: a path on the cluster, checked when it starts")
        else:
            yield check_output(job)
        if data is not None:
            yield from data.result()


# --- local: the embedded cluster on this machine ---------------------------------------------


def local_checks(backend: LocalBackend, job: JobSpec, staged: Future[int] | None) -> Iterator[Check]:
    cpus = backend.cluster.num_cpus or os.cpu_count() or 1
    gpus = 0
    if job.resources.gpus_per_worker:
        import torch

        gpus = torch.cuda.device_count()
    yield Check("cluster", True, "embedded Ray on this machine (started by the run)")
    yield _resources(
        "resources",
        (cpus, gpus),
        job,
        "lower resources.num_workers or resources.cpus_per_worker (or raise num_cpus in the cluster file)",
    )
    if staged is not None:
        yield local_staging(staged.result())
        yield check_stacks(ptrace_facts(), "here")


# --- Ray: the dashboard's REST API and a Ray Job ----------------------------------------------


def ray_checks(backend: RayJobsBackend, job: JobSpec, staged: Future[int] | None) -> Iterator[Check]:
    deep = staged is not None
    try:
        client = backend._client()
        with backend._errors():
            version = client._do_request("GET", "/api/version").json()
            alive = _alive_nodes(client) if deep else None
    except LaunchError as exc:
        yield Check("cluster", False, str(exc), f"check address and auth in {backend.cluster_file}")
        return
    address, _ = backend.address()
    nodes = "" if alive is None else f", {len(alive)} nodes alive"
    yield Check("cluster", True, f"{address}: Ray {version['ray_version']}{nodes}")
    if alive is None:
        yield versions_agree(
            {"ray": local_versions()["ray"]}, {"ray": version["ray_version"]}, "on the cluster"
        )
        return
    totals = [sum(node["resources_total"].get(key, 0) for node in alive) for key in ("CPU", "GPU")]
    yield _resources(
        "resources",
        (totals[0], totals[1]),
        job,
        "lower resources.num_workers, cpus_per_worker or gpus_per_worker, or add nodes to the cluster",
    )
    found, failure = _ray_probe(backend, client)
    yield from _probe_checks(staged, found, "a Ray node", failure)


def _alive_nodes(client: Any, wait_s: float = 15.0) -> list[dict[str, Any]]:
    """The nodes the head lists as alive; a head that has just started lists itself seconds after
    its dashboard answers, so an empty list is asked again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = client._do_request("GET", "/api/v0/nodes?detail=1").json()["data"]["result"]["result"]
        alive = [node for node in nodes if node.get("state") == "ALIVE"]
        if alive or time.monotonic() > deadline:
            return alive
        time.sleep(1.0)


def _ray_probe(backend: RayJobsBackend, client: Any) -> tuple[dict[str, Any] | None, str]:
    """Run the probe as a Ray Job (the cluster's own Python; its image when the cluster file names
    one). Its record stays, named ``sftc-doctor-*``: Ray 2.60 brings a deleted job back as FAILED."""
    image = backend.cluster.runtime_env.image_uri
    try:
        with backend._errors():
            job_id = client.submit_job(
                entrypoint=f"python -c {shlex.quote(PROBE_SOURCE)}",
                submission_id=f"sftc-doctor-{uuid.uuid4().hex[:12]}",
                runtime_env={"image_uri": image} if image else None,
                metadata={"job_name": "sft-cluster doctor probe"},
            )
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            while not client.get_job_status(job_id).is_terminal():
                if time.monotonic() > deadline:
                    client.stop_job(job_id)
                    return None, f"did not end within {PROBE_TIMEOUT_S:.0f} s"
                time.sleep(0.5)
            return parse_probe(client.get_job_logs(job_id)), f"{job_id} printed nothing"
    except LaunchError as exc:
        return None, f"failed: {exc}"


# --- Slurm: sinfo, and the probe as one short srun --------------------------------------------


def slurm_checks(backend: SlurmBackend, job: JobSpec, staged: Future[int] | None) -> Iterator[Check]:
    from sft_cluster.launch.slurm_render import node_range
    from sft_cluster.launch.slurm_status import run

    cluster = backend.cluster
    where = f"partition {cluster.partition}" if cluster.partition else "the default partition"
    try:
        result = run(["sinfo", "-h", "-o", "%P|%a|%D|%c|%G"], "sinfo", timeout=30)
    except LaunchError as exc:
        yield Check("cluster", False, str(exc), "run this where Slurm's client tools answer (a login node)")
        return
    if result.returncode != 0:
        yield Check("cluster", False, f"sinfo: {result.stderr.strip()}", "is slurmctld up? (scontrol ping)")
        return
    rows = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 4]
    wanted = [
        r
        for r in rows
        if r[0].rstrip("*") == cluster.partition or (not cluster.partition and r[0].endswith("*"))
    ]
    if not wanted:
        known = ", ".join(sorted({r[0].rstrip("*") for r in rows})) or "none"
        yield Check(
            "cluster", False, f"no {where} (partitions: {known})", f"set partition in {backend.cluster_file}"
        )
        return
    name, state, node_total, cpus, gres = wanted[0]
    if state != "up":
        yield Check(
            "cluster", False, f"{where} is {state}", "ask the cluster's admins, or use another partition"
        )
        return
    yield Check(
        "cluster", True, f"Slurm {where}: up, {node_total} nodes, {cpus} CPUs and GRES {gres} per node"
    )
    if staged is None:
        return
    _, most = node_range(job, cluster)
    node_gpus = _gres_gpus(gres)
    enough = int(node_total) >= most and (not cluster.gpus_per_node or node_gpus >= cluster.gpus_per_node)
    detail = f"{node_total} nodes with {node_gpus} GPUs each; the job asks for {most} nodes"
    detail += f" with {cluster.gpus_per_node} GPUs" if cluster.gpus_per_node else ""
    yield Check(
        "resources", enough, detail, "" if enough else "lower the workers or nodes, or use another partition"
    )
    found, failure = _slurm_probe(backend)
    yield from _probe_checks(staged, found, f"a node of {where}", failure)


def _gres_gpus(gres: str) -> int:
    """GPUs per node from sinfo's GRES column, e.g. ``gpu:h100:8(S:0-1)`` -> 8."""
    for part in gres.split(","):
        fields = part.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            return int(fields[-1])
    return 0


def _slurm_probe(backend: SlurmBackend) -> tuple[dict[str, Any] | None, str]:
    """The probe as one short ``srun`` on a node, with the cluster file's set-up line."""
    from sft_cluster.launch.slurm_status import run

    cluster = backend.cluster
    if cluster.container is not None:
        return None, "was not run: the job runs in a container image, checked when it starts"
    options = [
        f"--{key}={value}"
        for key, value in (
            ("partition", cluster.partition),
            ("account", cluster.account),
            ("qos", cluster.qos),
        )
        if value
    ]
    setup = [f"module load {shlex.quote(module)}" for module in cluster.modules] + (
        [cluster.setup] if cluster.setup else []
    )
    command = " && ".join([*setup, f"{shlex.quote(backend._python())} -c {shlex.quote(PROBE_SOURCE)}"])
    try:
        result = run(
            [
                "srun",
                *options,
                "--nodes=1",
                "--ntasks=1",
                "--time=2",
                "--job-name=sftc-doctor",
                "bash",
                "-c",
                command,
            ],
            "the probe job",
            timeout=PROBE_TIMEOUT_S,
        )
    except LaunchError as exc:
        return None, f"failed: {exc}"
    if result.returncode != 0:
        return None, f"failed (exit {result.returncode}): {result.stderr.strip()[-300:]}"
    return parse_probe(result.stdout), "printed nothing"
