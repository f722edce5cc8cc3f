"""What Slurm's tools print, parsed into job states: canned ``squeue``, ``sacct`` and ``scontrol``
outputs through the pure parsers, and the order ``job_state`` asks the tools in.

The real tools answer in tests/integration (scripts/slurm_services.sh); these pin the shapes.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from sft_cluster.launch import LaunchError, slurm_status
from sft_cluster.launch.slurm_status import (
    parse_jobcomp,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
    path_field,
)

CHECKPOINTED = "exit 75: a checkpoint was committed; continue with sft-cluster resume OUTPUT_URI"


def epoch(text: str) -> float:
    """Slurm prints local time without a zone, as the parsers read it."""
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


# --- squeue -h -o "%i|%j|%T|%S|%r" --------------------------------------------------------

SQUEUE = """\
1234|smoke|RUNNING|2026-12-01T10:00:00|None
1235|big|PENDING|N/A|Resources
1236_3|sweep|RUNNING|2026-12-01T10:05:00|None
1236_[4-9]|sweep|PENDING|N/A|JobArrayTaskLimit
1237|smoke|PENDING|2026-12-01T10:12:00|BeginTime
1238|smoke|REQUEUED|2026-12-01T10:00:00|(null)
"""


def test_squeue_running_and_pending() -> None:
    queue = parse_squeue(SQUEUE)
    running = queue["1234"]
    assert (running.state, running.name, running.start, running.message) == (
        "RUNNING",
        "smoke",
        epoch("2026-12-01T10:00:00"),
        None,
    )
    assert not running.finished
    pending = queue["1235"]
    assert (pending.state, pending.start, pending.message) == ("PENDING", None, "Resources")


def test_squeue_requeued_job() -> None:
    """A requeued job waits as PENDING (BeginTime) or shows REQUEUED for a moment: never finished."""
    queue = parse_squeue(SQUEUE)
    assert (queue["1237"].state, queue["1237"].message) == ("PENDING", "BeginTime")
    assert (queue["1238"].state, queue["1238"].message) == ("REQUEUED", None)
    assert not queue["1237"].finished and not queue["1238"].finished


def test_squeue_array_tasks_keep_their_task_ids() -> None:
    queue = parse_squeue(SQUEUE)
    assert queue["1236_3"].state == "RUNNING"
    assert queue["1236_[4-9]"].message == "JobArrayTaskLimit"  # the tasks not started yet, as one line


def test_squeue_unknown_id_and_noise() -> None:
    assert parse_squeue("").get("999") is None  # squeue -j 999 of a job it forgot prints nothing
    assert parse_squeue("slurm_load_jobs error: Invalid job id specified\n") == {}
    assert parse_squeue(SQUEUE).get("123") is None  # a prefix of an id is not the id


# --- sacct -n -P -X -o JobID,JobName,State,Start,End,ExitCode ----------------------------

SACCT = """\
1240|smoke|COMPLETED|2026-12-01T10:00:00|2026-12-01T10:30:00|0:0
1241|smoke|FAILED|2026-12-01T10:00:00|2026-12-01T10:01:00|1:0
1242|smoke|FAILED|2026-12-01T10:00:00|2026-12-01T10:20:00|75:0
1243|smoke|CANCELLED by 1000|2026-12-01T10:00:00|2026-12-01T10:05:00|0:15
1244|smoke|TIMEOUT|2026-12-01T10:00:00|2026-12-01T11:00:00|0:0
1245|smoke|PENDING|Unknown|Unknown|0:0
1236_3|sweep|COMPLETED|2026-12-01T10:05:00|2026-12-01T10:09:00|0:0
"""


def test_sacct_completed() -> None:
    state = parse_sacct(SACCT, "1240")
    assert state is not None
    assert (state.state, state.name, state.message) == ("COMPLETED", "smoke", None)
    assert (state.start, state.end) == (epoch("2026-12-01T10:00:00"), epoch("2026-12-01T10:30:00"))
    assert state.finished and state.succeeded


def test_sacct_failed_says_the_exit_code() -> None:
    state = parse_sacct(SACCT, "1241")
    assert state is not None
    assert (state.state, state.message) == ("FAILED", "exit 1:0")
    assert state.finished and not state.succeeded


def test_sacct_exit_75_is_preempted() -> None:
    """The batch script's exit 75: checkpointed, resume me (Slurm itself says FAILED)."""
    state = parse_sacct(SACCT, "1242")
    assert state is not None
    assert (state.state, state.message) == ("PREEMPTED", CHECKPOINTED)
    assert state.finished and not state.succeeded


def test_sacct_cancelled_by_a_user_and_timeout() -> None:
    cancelled = parse_sacct(SACCT, "1243")
    assert cancelled is not None
    assert (cancelled.state, cancelled.message) == ("CANCELLED", "exit 0:15")  # the word, not "by 1000"
    timeout = parse_sacct(SACCT, "1244")
    assert timeout is not None and (timeout.state, timeout.message) == ("TIMEOUT", None)


def test_sacct_pending_has_no_times() -> None:
    state = parse_sacct(SACCT, "1245")
    assert state is not None
    assert (state.state, state.start, state.end) == ("PENDING", None, None)


def test_sacct_array_task_and_unknown_id() -> None:
    task = parse_sacct(SACCT, "1236_3")
    assert task is not None and (task.id, task.state) == ("1236_3", "COMPLETED")
    assert parse_sacct(SACCT, "999") is None
    assert parse_sacct("", "1240") is None


# --- sacct -c: the job-completion log, one row per attempt --------------------------------

JOBCOMP = """\
1250|smoke|NODE_FAIL|2026-12-01T10:00:00|2026-12-01T10:10:00|0:0
1250|smoke|FAILED|2026-12-01T10:11:00|2026-12-01T10:20:00|75:0
1250|smoke|COMPLETED|2026-12-01T10:21:00|2026-12-01T10:40:00|0:0
1251|smoke|FAILED|2026-12-01T10:00:00|2026-12-01T10:20:00|75:0
12500|other|FAILED|2026-12-01T10:00:00|2026-12-01T10:20:00|1:0
"""


def test_jobcomp_takes_the_last_attempt() -> None:
    state = parse_jobcomp(JOBCOMP, "1250")
    assert state is not None
    assert (state.state, state.start, state.message) == ("COMPLETED", epoch("2026-12-01T10:21:00"), None)


def test_jobcomp_exit_75_is_preempted_and_ids_match_whole() -> None:
    state = parse_jobcomp(JOBCOMP, "1251")
    assert state is not None and (state.state, state.message) == ("PREEMPTED", CHECKPOINTED)
    assert parse_jobcomp(JOBCOMP, "125") is None
    assert parse_jobcomp("", "1250") is None


# --- scontrol -o show job ------------------------------------------------------------------


def scontrol_line(**fields: str) -> str:
    base = {
        "JobId": "1260",
        "JobName": "smoke",
        "UserId": "me(1000)",
        "JobState": "RUNNING",
        "Reason": "None",
        "Requeue": "1",
        "Restarts": "0",
        "ExitCode": "0:0",
        "StartTime": "2026-12-01T10:00:00",
        "EndTime": "2026-12-01T11:00:00",
        "Command": "/shared/runs/smoke/slurm/job.sbatch",
        "WorkDir": "/home/me/sft",
        "StdOut": "/shared/runs/smoke/slurm/slurm-1260.out",
    }
    return " ".join(f"{key}={value}" for key, value in {**base, **fields}.items())


def test_scontrol_running() -> None:
    state = parse_scontrol(scontrol_line(), "1260")
    assert state is not None
    assert (state.state, state.name, state.message) == ("RUNNING", "smoke", None)
    assert state.start == epoch("2026-12-01T10:00:00")


def test_scontrol_requeued_and_waiting() -> None:
    line = scontrol_line(JobState="PENDING", Reason="BeginTime", Restarts="2", EndTime="Unknown")
    state = parse_scontrol(line, "1260")
    assert state is not None
    assert (state.state, state.end, state.message) == ("PENDING", None, "BeginTime, requeued 2x")


def test_scontrol_failed_and_preempted() -> None:
    failed = parse_scontrol(
        scontrol_line(JobState="FAILED", Reason="NonZeroExitCode", ExitCode="1:0"), "1260"
    )
    assert failed is not None and (failed.state, failed.message) == ("FAILED", "exit 1:0, NonZeroExitCode")
    line = scontrol_line(JobState="FAILED", Reason="NonZeroExitCode", ExitCode="75:0", Restarts="1")
    preempted = parse_scontrol(line, "1260")
    assert preempted is not None
    assert (preempted.state, preempted.message) == ("PREEMPTED", f"{CHECKPOINTED}, requeued 1x")


def test_scontrol_completed() -> None:
    state = parse_scontrol(scontrol_line(JobState="COMPLETED"), "1260")
    assert state is not None and state.succeeded and state.message is None


def test_scontrol_array_task_is_named_as_asked() -> None:
    """``scontrol show job 1260_2`` answers with the task's own JobId; the state keeps the asked id."""
    line = scontrol_line(JobId="1262", ArrayJobId="1260", ArrayTaskId="2", JobName="sweep")
    state = parse_scontrol(line, "1260_2")
    assert state is not None and (state.id, state.name, state.state) == ("1260_2", "sweep", "RUNNING")


def test_scontrol_unknown_id() -> None:
    assert parse_scontrol("", "999") is None
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified", "999") is None


def test_path_fields_may_hold_spaces() -> None:
    line = scontrol_line(StdOut="/shared/my runs/slurm-1260.out") + " StdIn=/dev/null"
    assert path_field(line, "StdOut") == "/shared/my runs/slurm-1260.out"
    assert path_field(line, "Command") == "/shared/runs/smoke/slurm/job.sbatch"
    assert path_field(line, "StdErr") is None


# --- job_state: which tool answers ----------------------------------------------------------


@pytest.fixture
def tools(monkeypatch):
    """``tools(**outputs)``: stand-ins for squeue, sacct, sacct -c and scontrol: (exit code, stdout)."""

    def install(**outputs: tuple[int, str]) -> list[str]:
        asked: list[str] = []

        def run(args: list[str], what: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            name = "jobcomp" if args[:2] == ["sacct", "-c"] else args[0]
            asked.append(name)
            code, out = outputs.get(name, (1, ""))
            return subprocess.CompletedProcess(args, code, out, "")

        monkeypatch.setattr(slurm_status, "run", run)
        monkeypatch.setattr(slurm_status.shutil, "which", lambda name: f"/usr/bin/{name}")
        return asked

    return install


def test_squeue_answers_first(tools) -> None:
    asked = tools(squeue=(0, SQUEUE), sacct=(0, SACCT))
    assert slurm_status.job_state("1234").state == "RUNNING"
    assert asked == ["squeue"]


def test_sacct_once_the_queue_forgot(tools) -> None:
    asked = tools(squeue=(1, ""), sacct=(0, SACCT))
    assert slurm_status.job_state("1242").state == "PREEMPTED"
    assert asked == ["squeue", "sacct"]


def test_scontrol_then_jobcomp_without_accounting(tools) -> None:
    asked = tools(squeue=(0, ""), sacct=(1, ""), scontrol=(0, scontrol_line(JobState="COMPLETED")))
    assert slurm_status.job_state("1260").state == "COMPLETED"
    assert asked == ["squeue", "sacct", "scontrol"]
    asked = tools(squeue=(0, ""), sacct=(1, ""), scontrol=(1, ""), jobcomp=(0, JOBCOMP))
    assert slurm_status.job_state("1250").state == "COMPLETED"
    assert asked == ["squeue", "sacct", "scontrol", "jobcomp"]


def test_unknown_and_malformed_ids(tools) -> None:
    tools(squeue=(1, ""), sacct=(0, ""), scontrol=(1, ""), jobcomp=(0, ""))
    with pytest.raises(
        LaunchError, match="unknown Slurm job id '999' \\(not in squeue, sacct or scontrol\\)"
    ):
        slurm_status.job_state("999")
    with pytest.raises(LaunchError, match="'12a' is not a Slurm job id"):
        slurm_status.job_state("12a")


def test_listed_is_the_whole_queue(tools) -> None:
    tools(squeue=(0, SQUEUE))
    assert sorted(slurm_status.listed()) == ["1234", "1235", "1236_3", "1236_[4-9]", "1237", "1238"]
