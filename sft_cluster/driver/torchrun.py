"""The torchrun executor: torchrun's agent in this process, one driver per node.

A launcher (the Slurm torchrun template) runs ``python -m sft_cluster.driver JOB
--executor=torchrun --nnodes=N ...`` once on every node, with ``SFT_CLUSTER_NODE_RANK``
(0 on the first node) and ``SFT_CLUSTER_NODE_NAME`` set. The first node's driver prepares
the run and later finishes it; every node's driver then starts torchrun's agent, whose
workers read what was prepared. On several nodes the others wait for the first node's word
first, on a TCPStore at the rendezvous endpoint that torchrun's c10d rendezvous then uses as its
own (its agent joins an existing store as a client): a refused run ends every node at once,
with the same exit code, instead of leaving agents waiting for a rendezvous that never comes.

Exit codes: when the workers stopped for preemption the driver exits 75, not torchrun's
generic 1, so the batch script requeues; exit 2 (a mistake in the job or its data, already
explained by the worker) stays 2. "Stopped for preemption": at least one worker exited 75
and every other failed worker either exited 75 or was ended by the agent's own SIGTERM
(torchrun stops the remaining workers as soon as the first one exits non-zero; every rank
exits 75 only after the checkpoint of that step is committed, so nothing is lost). A hang that
this node's watcher ended (``NodeWatch``: stacks written, ranks killed) also exits 75, and so does
the first node's driver when any node's watcher ended one: the run failed, and a restart resumes
it from its newest commit, as a requeued job does.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from rich.console import Console

from sft_cluster.driver.node_watch import NodeWatch, collect_node_hangs
from sft_cluster.driver.run import Outcome, Prepared
from sft_cluster.driver.watchdog import Hang
from sft_cluster.exitcodes import PREEMPTED, USER_ERROR, status_of
from sft_cluster.spec import JobSpec, dump_job_yaml
from sft_cluster.tracking import run_dir_of

NODE_RANK_ENV = "SFT_CLUSTER_NODE_RANK"
_VERDICT_KEY = "sft-cluster/prepared"
_READ_KEY = "sft-cluster/read"
PREPARE_TIMEOUT_S = 900.0
_RELEASE_WAIT_S = 60.0


def _signal(name: str) -> signal.Signals:
    name = name.upper()
    if name.isdigit():
        return signal.Signals(int(name))
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def ignore_signal(name: str) -> None:
    """The agent ignores the preemption signal: Slurm delivers a step's signals to every process of
    the step; the workers turn it into a checkpoint-and-stop, while an agent left at the default
    action would die and take the workers with it. Workers inherit the ignored disposition until
    they install their own handler at start-up."""
    signal.signal(_signal(name), signal.SIG_IGN)


def exit_code(codes: set[int]) -> int:
    """The driver's exit code for the workers' exit codes (see the module docstring)."""
    for code in (PREEMPTED, USER_ERROR):
        if code in codes and codes <= {code, -signal.SIGTERM}:
            return code
    return 1


class NodeWord:
    """The first node's word to the others: 0 (go: start the agent) or the exit code to end with."""

    def __init__(self, endpoint: str, nnodes: int, first: bool):
        from torch.distributed import TCPStore

        host, port = endpoint.rsplit(":", 1)
        self.nnodes = nnodes
        self.store = TCPStore(
            host,
            int(port),
            is_master=first,
            timeout=timedelta(seconds=PREPARE_TIMEOUT_S),
            wait_for_workers=False,
        )

    def give(self, code: int) -> None:
        self.store.set(_VERDICT_KEY, str(code))
        if code:  # nobody will join a rendezvous: wait (briefly) until every node has read it
            deadline = time.monotonic() + _RELEASE_WAIT_S
            while self.store.add(_READ_KEY, 0) < self.nnodes - 1 and time.monotonic() < deadline:
                time.sleep(0.5)

    def take(self) -> int:
        code = int(self.store.get(_VERDICT_KEY))
        self.store.add(_READ_KEY, 1)
        return code


class TorchrunExecutor:
    """``nnodes`` x ``nproc_per_node`` workers started by torchrun's agent (``torch.distributed.run``)."""

    name = "torchrun"

    def __init__(
        self,
        job_file: Path,
        nnodes: int,
        nproc_per_node: int,
        rdzv_endpoint: str | None,
        rdzv_id: str,
        word: NodeWord | None = None,
        worker_module: str = "sft_cluster.train",
        rdzv_backend: str = "c10d",
        node_rank: int = 0,
    ):
        self.job_file = job_file
        self.word = word
        self.worker_module = worker_module
        self.nnodes = nnodes
        self.nproc_per_node = nproc_per_node
        self.rdzv_endpoint = rdzv_endpoint
        self.rdzv_id = rdzv_id
        self.rdzv_backend = rdzv_backend
        self.node_rank = node_rank
        self.exit_code: int | None = None  # the agent's, once it ran (2 and 1 are both "failed")
        self.attempt: int | None = None  # the number of the worker group the agent started
        self.hang: Hang | None = None  # the hang this node's watcher ended, if any

    def world(self, job: JobSpec) -> tuple[int, int]:
        return self.nnodes * self.nproc_per_node, self.nnodes

    def torchrun_args(self) -> list[str]:
        where = (
            [
                f"--rdzv-backend={self.rdzv_backend}",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-id={self.rdzv_id}",
            ]
            if self.rdzv_endpoint
            else ["--standalone"]
        )
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            *where,
            "--max-restarts=0",
            "-m",
            self.worker_module,
            str(self.job_file),
        ]

    def start_agent(self, job: JobSpec) -> int:
        """Run torchrun's agent until its workers end, this node's hang watcher beside it; the exit
        code (see ``exit_code``), ``PREEMPTED`` ("requeue me") when the watcher ended a hang."""
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        with NodeWatch(job.watchdog, run_dir_of(job), self.node_rank) as watch:
            try:
                torchrun(self.torchrun_args())
                code = 0
            except ChildFailedError as exc:
                codes = {failure.exitcode for failure in exc.failures.values()}
                print(f"sft-cluster: worker exit codes {sorted(codes)}", file=sys.stderr, flush=True)
                code = exit_code(codes)
        self.attempt, self.hang = watch.attempt, watch.hang
        return PREEMPTED if code and self.hang is not None else code

    def execute(self, prepared: Prepared, console: Console) -> Outcome:
        """The first node's: also records every node's hang (``collect_node_hangs``) and ends the
        run as hung when any node's watcher ended one, although this node's workers may have died
        of it first (a collective's peer gone) before its own watcher fired."""
        self.job_file.write_text(dump_job_yaml(prepared.job))  # with the batch split the driver chose
        run = run_dir_of(prepared.job)
        collect_node_hangs(run)  # a node's record of an earlier attempt, written after it was collected
        if self.word is not None:
            self.word.give(0)
        code = self.exit_code = self.start_agent(prepared.job)
        recorded = [Hang.from_event(r) for r in collect_node_hangs(run) if r["attempt"] == self.attempt]
        hangs = recorded or ([self.hang] if self.hang else [])  # its own, also when its record failed
        if code and hangs:  # failed, for the summary; exit 75, so the launcher starts it again
            code = self.exit_code = PREEMPTED
            said = "; ".join(hang.describe() for hang in hangs)
            return Outcome("failed", f"{said} (exit code {code}: restart to resume)")
        status = status_of(code)
        return Outcome(status, f"a worker failed (exit code {code})" if status == "failed" else None)


@contextlib.contextmanager
def job_file(job: JobSpec) -> Iterator[Path]:
    """The job as the driver resolved it (overrides applied), for the workers to read; removed after."""
    with tempfile.NamedTemporaryFile("w", prefix="sftc-job-", suffix=".yaml", delete=False) as handle:
        handle.write(dump_job_yaml(job))
    try:
        yield Path(handle.name)
    finally:
        Path(handle.name).unlink(missing_ok=True)
