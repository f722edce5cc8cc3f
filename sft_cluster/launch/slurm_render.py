"""The sbatch script, rendered from ``slurm/*.sbatch.j2`` (pure: no files, no Slurm).

Every value the templates render goes through a quoting filter: ``quote``
(``shlex.quote``) in shell lines and ``sbatch_quote`` in ``#SBATCH`` lines,
which sbatch parses itself (double quotes and backslashes, no single quotes).
The cluster file's ``setup`` line is the one exception: it is the user's own
shell, rendered as written.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import jinja2

from sft_cluster.launch.base import LaunchError
from sft_cluster.spec import JobSpec, SlurmCluster
from sft_cluster.train.batch import misfits

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
_SAFE_SBATCH = re.compile(r"[A-Za-z0-9_./:=,@+%-]+")
JOIN_TIMEOUT_S = 300
# ``sft-cluster stop`` writes ``<run>/slurm/stop-<job id>``; the script then ends without a requeue.
STOP_PREFIX = "stop-"


def sbatch_quote(value: object) -> str:
    """Quote one ``#SBATCH`` argument the way sbatch's own parser reads it."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise LaunchError(f"an #SBATCH value cannot span lines: {text!r}")
    if _SAFE_SBATCH.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shell_quote(value: object) -> str:
    return shlex.quote(str(value))


def signal_name(spec: str) -> str:
    """``B:USR1@300`` -> ``USR1`` (the name ``kill -s``, ``trap`` and ``scancel`` take)."""
    name = spec.split(":", 1)[-1].split("@", 1)[0].upper()
    if name.isdigit():
        try:
            name = signal.Signals(int(name)).name
        except ValueError:
            raise LaunchError(f"signal = {spec!r}: no signal number {name}") from None
    return name.removeprefix("SIG")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=False,
        # Bash's ${#array[@]} would open a Jinja comment: templates use no comments.
        comment_start_string="{=#",
        comment_end_string="#=}",
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["quote"] = shell_quote
    env.filters["sbatch_quote"] = sbatch_quote
    return env


def node_count(job: JobSpec, cluster: SlurmCluster) -> int:
    """``nodes`` from the cluster file, else the workers divided over the GPUs of a node."""
    if cluster.nodes:
        return cluster.nodes
    if cluster.gpus_per_node and job.resources.gpus_per_worker:
        per_node = max(1, int(cluster.gpus_per_node // job.resources.gpus_per_worker))
        return -(-job.resources.max_workers // per_node)
    return 1


def node_range(job: JobSpec, cluster: SlurmCluster) -> tuple[int, int]:
    """(fewest, most) nodes the job may run on: an elastic ``resources.num_workers {min, max}``
    lets Slurm start (or requeue) it on fewer nodes than its most, as many workers on each."""
    most = node_count(job, cluster)
    per_node = -(-job.resources.max_workers // most)
    return -(-job.resources.min_workers // per_node), most


def sbatch_options(job: JobSpec, cluster: SlurmCluster, log_path: str, workdir: str) -> list[str]:
    """The ``#SBATCH`` lines, each ``--option=value`` (unquoted; the template quotes)."""
    fewest, nodes = node_range(job, cluster)
    options = [f"--job-name={job.name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if fewest < nodes:
        # A task count (from --ntasks-per-node) would be met by the fewest nodes, and Slurm would give
        # no more: the range alone gets as many nodes as are free. Each srun says its own tasks.
        options[1:] = [f"--nodes={fewest}-{nodes}"]
    for field, flag in (("partition", "partition"), ("account", "account"), ("qos", "qos")):
        value = getattr(cluster, field)
        if value:
            options.append(f"--{flag}={value}")
    if cluster.gpus_per_node:
        options.append(f"--gpus-per-node={cluster.gpus_per_node}")
    # One task per node holds the node's workers (Ray or torchrun): their CPUs by default.
    per_node = -(-job.resources.max_workers // nodes)
    cpus = cluster.cpus_per_task or max(1, math.ceil(per_node * job.resources.cpus_per_worker))
    options.append(f"--cpus-per-task={cpus}")
    if cluster.mem:
        options.append(f"--mem={cluster.mem}")
    options.append(f"--time={cluster.time}")
    if cluster.constraint:
        options.append(f"--constraint={cluster.constraint}")
    if cluster.exclusive:
        options.append("--exclusive")
    options += [
        f"--signal={cluster.signal}",
        "--requeue",
        "--open-mode=append",
        f"--output={log_path}",
        f"--chdir={workdir}",
        "--export=ALL",
    ]
    options += cluster.extra_sbatch
    return options


def render(
    job: JobSpec,
    cluster: SlurmCluster,
    *,
    run_dir: str,
    workdir: str,
    python: str = "python",
) -> str:
    """The sbatch script for ``job`` on ``cluster``."""
    from sft_cluster.tracking import RUN_ID_ENV

    if cluster.setup and ("\n" in cluster.setup or "\r" in cluster.setup):
        raise LaunchError("setup: must be one shell line (chain commands with '&&')")
    sig = signal_name(cluster.signal)
    if f"SIG{sig}" not in job.checkpoint.preemption_signals:
        raise LaunchError(
            f"signal = {cluster.signal!r} sends SIG{sig}, which the job does not treat as "
            f"preemption (checkpoint.preemption_signals = {job.checkpoint.preemption_signals}); "
            f"add SIG{sig} there or change the cluster's signal"
        )
    fewest, nodes = node_range(job, cluster)
    workers = job.resources.max_workers
    if cluster.launcher == "torchrun" and (workers % nodes or job.resources.min_workers % (workers // nodes)):
        raise LaunchError(
            f"resources.num_workers = {workers} does not divide over {nodes} nodes "
            "(torchrun starts the same number of processes on every node"
            + (
                f", and an elastic run's min must be a multiple of it: {workers // nodes})"
                if fewest < nodes
                else ")"
            )
        )
    if fewest < nodes:
        per_node = workers // nodes
        bad = misfits(job, range(fewest * per_node, workers + 1, per_node))
        if bad:
            raise LaunchError(
                f"train.global_batch_size = {job.train.global_batch_size} does not split over "
                f"{', '.join(map(str, bad))} workers ({per_node} a node on {fewest} to {nodes} nodes): "
                "use a multiple of each"
            )
    log_path = os.path.join(run_dir, "slurm-%j.out")
    context: dict[str, Any] = {
        "name": job.name,
        "launcher": cluster.launcher,
        "sbatch": sbatch_options(job, cluster, log_path.replace("%", "%%").replace("%%j", "%j"), workdir),
        "run_dir": run_dir,
        "job_yaml": os.path.join(run_dir, "job.yaml"),
        "output_uri": job.output_uri,
        "python": python,
        "workdir": workdir,
        "signal_name": sig,
        "max_requeues": cluster.max_requeues,
        "run_id_env": RUN_ID_ENV,
        "stop_prefix": STOP_PREFIX,
        "env": [("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_DISABLE_TELEMETRY", "1")],
        "modules": cluster.modules,
        "setup": cluster.setup,
        "container": cluster.container,
        "gpus_per_node": cluster.gpus_per_node,
        "nproc_per_node": workers // nodes,
        "join_timeout": JOIN_TIMEOUT_S,
    }
    return _environment().get_template(f"{cluster.launcher}.sbatch.j2").render(context)


def check_syntax(script: str) -> None:
    """``bash -n``: the script parses (nothing runs)."""
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", "-n"], input=script, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise LaunchError(f"the rendered sbatch script does not parse (bash -n): {result.stderr.strip()}")
