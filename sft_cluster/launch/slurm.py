"""Slurm: render an sbatch script from ``slurm/*.sbatch.j2``, submit it, follow it.

``submit`` writes ``<run>/slurm/job.sbatch`` and the resolved ``job.yaml`` next
to it (``<run>`` is the job's ``output_uri`` when it is a local path, else a
folder under the submitter's state directory), checks the script with
``bash -n`` and submits it with ``sbatch --parsable --export=ALL``: secrets
reach the job through the submitter's environment, never through a file.

Every value the templates render goes through a quoting filter: ``quote``
(``shlex.quote``) in shell lines and ``sbatch_quote`` in ``#SBATCH`` lines,
which sbatch parses itself (double quotes and backslashes, no single quotes).
The cluster file's ``setup`` line is the one exception: it is the user's own
shell, rendered as written.

Status comes from ``squeue`` while Slurm still knows the job, then ``sacct``,
then the job-completion log or ``scontrol show job`` where accounting is off.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2

from sft_cluster.launch.base import JobState, LaunchError, Submission
from sft_cluster.spec import JobSpec, SlurmCluster, dump_job_yaml

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
_SAFE_SBATCH = re.compile(r"[A-Za-z0-9_./:=,@+%-]+")
_JOB_ID = re.compile(r"\d+(?:_\d+)?")
JOIN_TIMEOUT_S = 300
# squeue/sacct short state codes and states -> the words JobState uses.
_STATE_WORDS = {
    "PD": "PENDING",
    "R": "RUNNING",
    "CG": "COMPLETING",
    "CD": "COMPLETED",
    "F": "FAILED",
    "CA": "CANCELLED",
    "TO": "TIMEOUT",
    "PR": "PREEMPTED",
    "NF": "NODE_FAIL",
    "OOM": "OUT_OF_MEMORY",
    "RQ": "REQUEUED",
    "S": "SUSPENDED",
}


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
    """``B:USR1@300`` -> ``USR1`` (the name ``kill -s`` and ``trap`` take)."""
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
        return -(-job.resources.num_workers // per_node)
    return 1


def sbatch_options(job: JobSpec, cluster: SlurmCluster, log_path: str, workdir: str) -> list[str]:
    """The ``#SBATCH`` lines, each ``--option=value`` (unquoted; the template quotes)."""
    nodes = node_count(job, cluster)
    options = [f"--job-name={job.name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    for field, flag in (("partition", "partition"), ("account", "account"), ("qos", "qos")):
        value = getattr(cluster, field)
        if value:
            options.append(f"--{flag}={value}")
    if cluster.gpus_per_node:
        options.append(f"--gpus-per-node={cluster.gpus_per_node}")
    # One task per node holds the node's workers (Ray or torchrun): their CPUs by default.
    per_node = -(-job.resources.num_workers // nodes)
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
    """The sbatch script for ``job`` on ``cluster`` (pure: no files, no Slurm)."""
    if cluster.setup and ("\n" in cluster.setup or "\r" in cluster.setup):
        raise LaunchError("setup: must be one shell line (chain commands with '&&')")
    sig = signal_name(cluster.signal)
    if f"SIG{sig}" not in job.checkpoint.preemption_signals:
        raise LaunchError(
            f"signal = {cluster.signal!r} sends SIG{sig}, which the job does not treat as "
            f"preemption (checkpoint.preemption_signals = {job.checkpoint.preemption_signals}); "
            f"add SIG{sig} there or change the cluster's signal"
        )
    nodes = node_count(job, cluster)
    workers = job.resources.num_workers
    if cluster.launcher == "torchrun" and workers % nodes:
        raise LaunchError(
            f"resources.num_workers = {workers} does not divide over {nodes} nodes "
            "(torchrun starts the same number of processes on every node)"
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
        "env": [("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_DISABLE_TELEMETRY", "1")],
        "modules": cluster.modules,
        "setup": cluster.setup,
        "container": cluster.container,
        "gpus_per_node": cluster.gpus_per_node,
        "nodes": nodes,
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


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LaunchError(
            f"'{name}' not found: Slurm's client tools must be on PATH (on a login node, or "
            "`module load slurm`); for this machine's test Slurm run scripts/slurm_services.sh up"
        )
    return path


def _run(args: list[str], what: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [_tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{what}: '{args[0]}' did not answer in {timeout:.0f} s") from None


def _epoch(text: str | None) -> float | None:
    if not text or text in ("Unknown", "None", "N/A", "(null)"):
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


class SlurmBackend:
    """``sbatch``/``status``/``logs``/``stop``/``list`` for ``kind: slurm`` cluster files."""

    kind = "slurm"

    def __init__(self, cluster: SlurmCluster, cluster_file: str):
        self.cluster = cluster
        self.cluster_file = cluster_file

    # --- submit ------------------------------------------------------------------

    def run_dir(self, job: JobSpec) -> Path:
        """Where the script, the job YAML and the log go: ``<output_uri>/slurm`` when local."""
        from sft_cluster.spec import is_local_uri

        if is_local_uri(job.output_uri):
            return Path(job.output_uri.removeprefix("file://")).expanduser().absolute() / "slurm"
        state = os.environ.get("SFT_CLUSTER_STATE_DIR") or Path.home() / ".local" / "state" / "sft-cluster"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path(state).absolute() / "slurm" / f"{job.name}-{stamp}"

    def _python(self) -> str:
        # With neither a set-up line nor a container, the submitter's interpreter (shared FS).
        return "python" if (self.cluster.setup or self.cluster.container) else sys.executable

    def submit(self, job: JobSpec, dry_run: bool = False) -> Submission | str:
        from sft_cluster.launch.local import anchor_local_paths

        job = anchor_local_paths(job)
        run_dir = self.run_dir(job)
        script = render(job, self.cluster, run_dir=str(run_dir), workdir=os.getcwd(), python=self._python())
        check_syntax(script)
        if dry_run:
            return script
        sbatch = _tool("sbatch")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.yaml").write_text(dump_job_yaml(job), encoding="utf-8")
        script_path = run_dir / "job.sbatch"
        script_path.write_text(script, encoding="utf-8")
        try:
            result = subprocess.run(
                [sbatch, "--parsable", "--export=ALL", str(script_path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LaunchError("sbatch did not answer in 60 s: is slurmctld up?") from None
        if result.returncode != 0:
            raise LaunchError(
                f"sbatch rejected {script_path}: {result.stderr.strip() or result.stdout.strip()}"
            )
        job_id = result.stdout.strip().split(";", 1)[0]
        if not _JOB_ID.fullmatch(job_id):
            raise LaunchError(f"sbatch printed no job id: {result.stdout.strip()!r}")
        return Submission(
            id=job_id,
            backend=self.kind,
            cluster_file=self.cluster_file,
            name=job.name,
            output_uri=job.output_uri,
            submitted_at=time.time(),
            extra={"script": str(script_path), "log": str(run_dir / f"slurm-{job_id}.out")},
        )

    # --- status ------------------------------------------------------------------

    def _check_id(self, job_id: str) -> None:
        if not _JOB_ID.fullmatch(job_id):
            raise LaunchError(f"'{job_id}' is not a Slurm job id (a number such as 1234)")

    def _squeue(self, job_id: str) -> JobState | None:
        result = _run(["squeue", "-h", "-j", job_id, "-o", "%i|%j|%T|%S|%r"], "squeue")
        for line in result.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 5 and parts[0] == job_id:
                reason = parts[4] if parts[4] not in ("None", "(null)") else None
                return JobState(job_id, parts[2], name=parts[1], start=_epoch(parts[3]), message=reason)
        return None

    def _sacct(self, job_id: str) -> JobState | None:
        if shutil.which("sacct") is None:
            return None
        result = _run(
            ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,JobName,State,Start,End,ExitCode"],
            "sacct",
        )
        if result.returncode != 0:
            return None  # accounting off: "Slurm accounting storage is disabled"
        for line in result.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 6 and parts[0] == job_id:
                state = parts[2].split()[0]
                return JobState(
                    job_id,
                    state,
                    name=parts[1],
                    start=_epoch(parts[3]),
                    end=_epoch(parts[4]),
                    message=f"exit {parts[5]}" if parts[5] not in ("0:0", "") else None,
                )
        return None

    def _scontrol(self, job_id: str) -> JobState | None:
        result = _run(["scontrol", "-o", "show", "job", job_id], "scontrol")
        if result.returncode != 0:
            return None
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        if "JobState" not in fields:
            return None
        reason = fields.get("Reason")
        message = [f"exit {fields['ExitCode']}"] if fields.get("ExitCode") not in (None, "0:0") else []
        if reason and reason != "None":
            message.append(reason)
        restarts = fields.get("Restarts")
        if restarts and restarts != "0":
            message.append(f"requeued {restarts}x")
        return JobState(
            job_id,
            fields["JobState"],
            name=fields.get("JobName"),
            start=_epoch(fields.get("StartTime")),
            end=_epoch(fields.get("EndTime")),
            message=", ".join(message) or None,
        )

    def _jobcomp(self, job_id: str) -> JobState | None:
        """The job-completion log (``JobCompType=jobcomp/filetxt``), read through ``sacct -c``."""
        if shutil.which("sacct") is None:
            return None
        result = _run(
            ["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "JobID,JobName,State,Start,End"], "sacct"
        )
        states = [line.split("|") for line in result.stdout.splitlines() if line.startswith(job_id + "|")]
        if result.returncode != 0 or not states:
            return None
        parts = states[-1]  # a requeued job has one line per attempt
        return JobState(
            job_id, parts[2].split()[0], name=parts[1], start=_epoch(parts[3]), end=_epoch(parts[4])
        )

    def status(self, job_id: str) -> JobState:
        self._check_id(job_id)
        for source in (self._squeue, self._sacct, self._scontrol, self._jobcomp):
            state = source(job_id)
            if state is not None:
                return state
        raise LaunchError(f"unknown Slurm job id '{job_id}' (not in squeue, sacct or scontrol)")

    # --- logs, stop, list ----------------------------------------------------------

    def _log_path(self, job_id: str) -> Path:
        from sft_cluster.launch import registry

        known = registry.find(job_id)
        if known is not None and known.backend == self.kind and known.extra.get("log"):
            return Path(known.extra["log"])
        result = _run(["scontrol", "-o", "show", "job", job_id], "scontrol")
        # The path may hold spaces: it runs up to the next " Key=" field.
        match = re.search(r"\bStdOut=(.*?)(?= [A-Za-z]+=|$)", result.stdout.strip())
        if match:
            return Path(match.group(1))
        raise LaunchError(f"no log known for Slurm job '{job_id}' (not in scontrol, not submitted from here)")

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        self._check_id(job_id)
        path = self._log_path(job_id)
        return self._read_log(job_id, path, follow)

    def _read_log(self, job_id: str, path: Path, follow: bool) -> Iterator[str]:
        while follow and not path.exists():
            if self.status(job_id).finished:
                break
            time.sleep(1)
        if not path.exists():
            if follow:
                return
            raise LaunchError(f"no log yet for Slurm job '{job_id}': {path} does not exist (still pending?)")
        with path.open(encoding="utf-8", errors="replace") as handle:
            while True:
                line = handle.readline()
                if line:
                    yield line
                    continue
                if not follow or self.status(job_id).finished:
                    yield from handle.readlines()
                    return
                time.sleep(1)

    def stop(self, job_id: str) -> None:
        self._check_id(job_id)
        self.status(job_id)  # unknown ids fail loudly
        result = _run(["scancel", job_id], "scancel")
        if result.returncode != 0:
            raise LaunchError(f"scancel {job_id} failed: {result.stderr.strip()}")

    def list(self) -> list[JobState]:
        from sft_cluster.launch import registry

        mine = [s for s in registry.submissions() if s.backend == self.kind]
        result = _run(["squeue", "-h", "-o", "%i|%j|%T|%S"], "squeue")
        live = {}
        for line in result.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 4:
                live[parts[0]] = JobState(parts[0], parts[2], name=parts[1], start=_epoch(parts[3]))
        states = dict(live)
        for submission in mine:
            if submission.id not in states:
                try:
                    states[submission.id] = self.status(submission.id)
                except LaunchError:
                    continue
            states[submission.id].output_uri = submission.output_uri
        return [states[key] for key in sorted(states, key=lambda k: int(k.split("_")[0]))]
