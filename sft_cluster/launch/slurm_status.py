"""What Slurm says about a job, through its client tools (pyslurm does not build on 22.05).

Status comes from ``squeue`` while Slurm still knows the job, then ``sacct``,
then ``scontrol show job``, then the job-completion log where accounting is off.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

from sft_cluster.exitcodes import PREEMPTED
from sft_cluster.launch.base import JobState, LaunchError

JOB_ID = re.compile(r"\d+(?:_\d+)?")
_CHECKPOINTED = "exit 75: a checkpoint was committed; continue with sft-cluster resume OUTPUT_URI"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LaunchError(
            f"'{name}' not found: Slurm's client tools must be on PATH (on a login node, or "
            "`module load slurm`); for this machine's test Slurm run scripts/slurm_services.sh up"
        )
    return path


def run(args: list[str], what: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{what}: '{args[0]}' did not answer in {timeout:.0f} s") from None


def check_id(job_id: str) -> None:
    if not JOB_ID.fullmatch(job_id):
        raise LaunchError(f"'{job_id}' is not a Slurm job id (a number such as 1234)")


def _epoch(text: str | None) -> float | None:
    if not text or text in ("Unknown", "None", "N/A", "(null)"):
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _state_word(state: str, exit_code: str | None) -> str:
    """Slurm's word, except that the batch script's exit 75 (checkpointed, resume me) reads
    PREEMPTED, as a Ray Job's does: Slurm itself says FAILED for any non-zero exit."""
    return "PREEMPTED" if state == "FAILED" and exit_code == f"{PREEMPTED}:0" else state


def scontrol_show(job_id: str) -> str | None:
    """``scontrol -o show job``'s one line, or None once Slurm has forgotten the job."""
    result = run(["scontrol", "-o", "show", "job", job_id], "scontrol")
    return result.stdout.strip() if result.returncode == 0 else None


def path_field(line: str, name: str) -> str | None:
    """A path field (``StdOut``, ``Command``) of a ``scontrol -o`` line; paths may hold spaces,
    so it runs up to the next `` Key=`` field."""
    match = re.search(rf"\b{name}=(.*?)(?= [A-Za-z]+=|$)", line)
    return match.group(1) if match else None


# --- parsing: pure functions of what each tool printed --------------------------------

SQUEUE_FORMAT = "%i|%j|%T|%S|%r"
SACCT_FIELDS = "JobID,JobName,State,Start,End,ExitCode"


def parse_squeue(text: str) -> dict[str, JobState]:
    """``squeue -h -o SQUEUE_FORMAT``: the queued jobs by id, each with its pending reason."""
    queued = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            reason = parts[4] if parts[4] not in ("None", "(null)") else None
            queued[parts[0]] = JobState(
                parts[0], parts[2], name=parts[1], start=_epoch(parts[3]), message=reason
            )
    return queued


def _accounted(job_id: str, parts: list[str], exit_message: bool) -> JobState:
    """A ``SACCT_FIELDS`` row; ``exit_message``: a non-zero exit code becomes the message."""
    state = _state_word(parts[2].split()[0], parts[5])  # "CANCELLED by 1000": the word alone
    message = None
    if state == "PREEMPTED":
        message = _CHECKPOINTED
    elif exit_message and parts[5] not in ("0:0", ""):
        message = f"exit {parts[5]}"
    return JobState(
        job_id, state, name=parts[1], start=_epoch(parts[3]), end=_epoch(parts[4]), message=message
    )


def parse_sacct(text: str, job_id: str) -> JobState | None:
    """``sacct -n -P -X -o SACCT_FIELDS``'s row for ``job_id`` (the allocation, not its steps)."""
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) == 6 and parts[0] == job_id:
            return _accounted(job_id, parts, exit_message=True)
    return None


def parse_jobcomp(text: str, job_id: str) -> JobState | None:
    """``sacct -c``'s (the job-completion log's) last row for ``job_id``: a requeued job has one
    row per attempt."""
    rows = [line.split("|") for line in text.splitlines() if line.startswith(job_id + "|")]
    if not rows or len(rows[-1]) != 6:
        return None
    return _accounted(job_id, rows[-1], exit_message=False)


def parse_scontrol(line: str, job_id: str) -> JobState | None:
    """``scontrol -o show job``'s one line; None without a JobState in it."""
    fields = dict(re.findall(r"(\w+)=(\S*)", line))
    if "JobState" not in fields:
        return None
    state = _state_word(fields["JobState"], fields.get("ExitCode"))
    reason = fields.get("Reason")
    if state == "PREEMPTED":
        message = [_CHECKPOINTED]
    else:
        message = [f"exit {fields['ExitCode']}"] if fields.get("ExitCode") not in (None, "0:0") else []
        if reason and reason != "None":
            message.append(reason)
    restarts = fields.get("Restarts")
    if restarts and restarts != "0":
        message.append(f"requeued {restarts}x")
    return JobState(
        job_id,
        state,
        name=fields.get("JobName"),
        start=_epoch(fields.get("StartTime")),
        end=_epoch(fields.get("EndTime")),
        message=", ".join(message) or None,
    )


# --- asking the tools ------------------------------------------------------------------


def _squeue(job_id: str) -> JobState | None:
    return parse_squeue(run(["squeue", "-h", "-j", job_id, "-o", SQUEUE_FORMAT], "squeue").stdout).get(job_id)


def _sacct(job_id: str) -> JobState | None:
    if shutil.which("sacct") is None:
        return None
    result = run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", SACCT_FIELDS], "sacct")
    if result.returncode != 0:
        return None  # accounting off: "Slurm accounting storage is disabled"
    return parse_sacct(result.stdout, job_id)


def _scontrol(job_id: str) -> JobState | None:
    line = scontrol_show(job_id)
    return parse_scontrol(line, job_id) if line else None


def _jobcomp(job_id: str) -> JobState | None:
    """The job-completion log (``JobCompType=jobcomp/filetxt``), read through ``sacct -c``."""
    if shutil.which("sacct") is None:
        return None
    result = run(["sacct", "-c", "-n", "-P", "-j", job_id, "-o", SACCT_FIELDS], "sacct")
    return parse_jobcomp(result.stdout, job_id) if result.returncode == 0 else None


def job_state(job_id: str) -> JobState:
    """The job's state from the first source that knows it; LaunchError for an unknown id."""
    check_id(job_id)
    for source in (_squeue, _sacct, _scontrol, _jobcomp):
        state = source(job_id)
        if state is not None:
            return state
    raise LaunchError(f"unknown Slurm job id '{job_id}' (not in squeue, sacct or scontrol)")


def listed() -> dict[str, JobState]:
    """Every job in the queue, by id."""
    return parse_squeue(run(["squeue", "-h", "-o", SQUEUE_FORMAT], "squeue").stdout)
