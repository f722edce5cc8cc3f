"""What a start of a run may do in its run directory, decided once by the driver before any worker starts.

The driver claims the run directory:

- a new run never mixes with an earlier run's checkpoints: ``checkpoint.resume: never``
  over a directory holding another run's commits is refused (exit 2), nothing written;
- the run's own restarts (Ray Train's new worker group, a requeued Slurm job, which
  carries the same ``SFT_CLUSTER_RUN_ID``) always resume from its own commits;
- a run whose newest commit is at ``train.max_steps`` (or the steps counted for
  ``train.epochs``) and that has its ``final/`` model is complete: nothing is trained again;
- a resume after a change the saved data cursors depend on (sequence length, packing,
  global batch, chat template, ...) is refused, naming the field and both values;
- a resume on another world size (or another split of the same global batch) re-plans the
  data that is left (``resize``).
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sft_cluster import storage
from sft_cluster.checkpoint import CheckpointStore
from sft_cluster.data import DataError, ShardPlan, build_plan, list_sources, plan_changes, same_listing
from sft_cluster.driver.resize import read_plan, resume_plan
from sft_cluster.spec import JobSpec, dump_job_yaml
from sft_cluster.tracking import RUN_ID_ENV, RunDir, run_dir_of
from sft_cluster.tracking.trackers import missing_packages
from sft_cluster.train.batch import BatchSplit, batch_split, global_batch
from sft_cluster.train.settings import (
    GLOBAL_BATCH_KEY,
    SPLIT_KEYS,
    TEMPLATE_KEY,
    cursor_settings,
    template_fingerprint,
)
from sft_cluster.train.steps import planned_steps, target_text


class RunRefused(Exception):
    """This start would lose or mix work: the user must change the job (exit 2)."""


class RunComplete(Exception):
    """The run already reached its last step and saved its final model: nothing to do."""


@dataclass(frozen=True)
class RunStart:
    run_id: str
    resuming: bool  # the run has committed checkpoints to resume from
    plan: ShardPlan
    split: BatchSplit  # the workers' micro batch and accumulation


def current_run_id() -> str:
    """The launcher's run id (stable across its restarts), else one made for this process."""
    given = os.environ.get(RUN_ID_ENV) or os.environ.get("TORCHELASTIC_RUN_ID", "")
    return given if given and given != "none" else _process_run_id()


@functools.cache
def _process_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def _owner(run: RunDir) -> dict[str, Any]:
    if not storage.exists(run.owner, run.options):
        return {}
    try:
        return run.read_json(run.owner)
    except (ValueError, OSError):
        return {}


def _saved_settings(store: CheckpointStore, committed: list[int]) -> tuple[int, dict[str, Any]] | None:
    """(step, settings) from the newest committed manifest that can be read."""
    for step in reversed(committed):
        try:
            manifest = store.read_manifest(step)
        except (ValueError, OSError):
            continue
        if "cursor_settings" in manifest.metadata:
            return step, manifest.metadata["cursor_settings"]
    return None


def _settings_problems(job: JobSpec, saved: dict[str, Any], step: int) -> list[str]:
    from sft_cluster.train.model import load_chat

    fingerprint = saved.get(TEMPLATE_KEY, "")
    if fingerprint:
        fingerprint = template_fingerprint(load_chat(job).template)
    run = run_dir_of(job)
    first_world = read_plan(run, body=False).first_world_size if storage.exists(run.plan, run.options) else 1
    now = cursor_settings(job, fingerprint, global_batch(job, first_world))
    problems = []
    for key, old in saved.items():
        if key not in now or now[key] == old or key in SPLIT_KEYS:
            continue
        if key == TEMPLATE_KEY:
            problems.append(
                f"the tokenizer's chat template changed since step {step} was saved (fingerprint {old}, "
                f"now {now[key]}): the saved data cursors count samples tokenized with the old one "
                "(restore the template or model.tokenizer it had)"
            )
        elif key == GLOBAL_BATCH_KEY:
            train = job.train
            how = (
                f"train.global_batch_size {train.global_batch_size}"
                if train.global_batch_size
                else f"train.micro_batch_size {train.micro_batch_size} x train.grad_accum_steps "
                f"{train.grad_accum_steps} x {first_world} workers"
            )
            problems.append(
                f"the global batch is now {now[key]} rows ({how}), but the checkpoints up to step {step} "
                f"were trained with {old}: the step count, the learning-rate schedule and the data cursors "
                f"count in those (set train.global_batch_size={old} to continue, with any micro batch)"
            )
        else:
            problems.append(
                f"{key} = {now[key]!r}, but the checkpoints up to step {step} were written with "
                f"{key} = {old!r}: their data cursors only fit the old value (set {key}={old!r} to "
                "continue)"
            )
    return problems


def _final_saved(run: RunDir) -> bool:
    fs, path = storage.filesystem(run.final, run.options)
    return any(fs.exists(f"{path.rstrip('/')}/{name}") for name in ("config.json", "adapter_config.json"))


def check_start(job: JobSpec) -> bool:
    """Whether this start resumes; raises RunRefused or RunComplete. Reads only, writes nothing."""
    run = run_dir_of(job)
    store = run.checkpoint_store()
    committed = store.committed_steps()
    if not committed:
        return False
    own_restart = _owner(run).get("run_id") == current_run_id()
    if job.checkpoint.resume == "never" and not own_restart:
        raise RunRefused(
            f"output_uri = {run.uri} holds committed checkpoints of an earlier run (steps "
            f"{', '.join(map(str, committed[-3:]))}{' ...' if len(committed) > 3 else ''}) and "
            "checkpoint.resume is 'never': a new run never mixes with them or prunes them (set "
            "output_uri to a new folder, or checkpoint.resume=auto to continue that run, e.g. "
            f"`sft-cluster resume {run.uri}`)"
        )
    newest = committed[-1]
    target = planned_steps(job)  # None: train.epochs not counted for this plan yet
    if target is not None and newest >= target and _final_saved(run):
        field = "train.max_steps" if job.train.max_steps is not None else "train.epochs"
        raise RunComplete(
            f"run '{job.name}' at {run.uri} already completed: step {newest} of {target_text(job, target)} "
            f"is committed and its final model is in {run.final}; nothing to train (raise {field} to "
            "train further, or use a new output_uri)"
        )
    saved = _saved_settings(store, committed)
    problems = _settings_problems(job, saved[1], saved[0]) if saved else []
    if problems:
        raise RunRefused(
            f"cannot resume {run.uri}: " + "; ".join(problems) + " (or start over with a new output_uri)"
        )
    return True


def check_reach(job: JobSpec, nodes: int) -> None:
    """Refuse a local ``output_uri`` when workers may run on several nodes.

    Each node would write its own partial copy of every checkpoint, and a worker
    restarted on another node (after a node loss) would not find the run's commits.
    """
    if nodes > 1 and storage.is_local(job.output_uri) and not job.storage.shared_filesystem:
        raise RunRefused(
            f"output_uri = {job.output_uri!r} is a local path, and {nodes} nodes can run this job's "
            "workers: each node would keep its own partial checkpoints, and a worker restarted on "
            f"another node would not find them. Use storage every node reaches (s3://BUCKET/runs/"
            f"{job.name}, gs://...), or set storage.shared_filesystem: true if the path is on a "
            "filesystem every node mounts (NFS, Lustre)"
        )


def check_trainable(job: JobSpec) -> None:
    """Refuse (DataError) a chat template that cannot tell the assistant's tokens, or a source
    whose first samples train no token: a run that would learn nothing never starts."""
    from sft_cluster.data.inspect import untrained_sources
    from sft_cluster.train.model import load_chat

    problems = untrained_sources(job.data, job.storage, load_chat(job))
    if problems:
        raise DataError("; ".join(problems))


def check_kernels(job: JobSpec) -> None:
    """Refuse (RunRefused) ``strategy.liger`` where liger_kernel cannot be imported. Checked here, on
    the cluster, since the machine that submits may lack packages the cluster's image has."""
    if not job.strategy.liger:
        return  # importing transformers costs about a second of every start
    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        raise RunRefused(
            "strategy.liger = true but the liger_kernel package (0.3.0 or newer) is not installed "
            "where this run starts (pip install liger-kernel in the cluster's environment, or "
            "remove strategy.liger)"
        )


def check_trackers(job: JobSpec) -> None:
    """Refuse (RunRefused) an MLflow or W&B ``tracking`` whose package is missing where the run starts,
    rather than a failure in the middle of training."""
    problems = missing_packages(job)
    if problems:
        raise RunRefused("; ".join(problems))


def _fits(plan: ShardPlan, job: JobSpec) -> list[str]:
    """Why ``plan`` cannot serve this job (empty: it can)."""
    problems = []
    if plan.seed != job.train.seed:
        problems.append(f"the run was planned with train.seed={plan.seed}, not {job.train.seed}")
    planned, named = [s.uri for s in plan.sources], [s.uri for s in job.data.sources]
    if planned != named:
        problems.append(f"the run was planned for data sources {planned}, the job names {named}")
    return problems


def ensure_plan(
    job: JobSpec, world_size: int, notify: Callable[[str], None], resuming: bool
) -> tuple[ShardPlan, BatchSplit]:
    """The plan of this run and its batch split: the saved plan when resuming (re-planned for
    another world size; warning if the listing changed), else a new one."""
    run = run_dir_of(job)
    if resuming and storage.exists(run.plan, run.options):
        problems = _fits(read_plan(run, body=False), job)
        if problems:
            raise DataError(
                "this run has committed checkpoints whose data cursors belong to its saved data plan "
                f"({run.plan}), but " + "; ".join(problems) + " (or use a new output_uri to start over)"
            )
        plan, split = resume_plan(job, run, world_size, notify)
        listing = list_sources(job.data, job.storage)
        if not same_listing(plan, listing):  # the whole plan is read only to name what changed
            for change in plan_changes(read_plan(run), listing):
                notify(f"warning: {change}")
        return plan, split
    split = batch_split(job, world_size, world_size)  # refused before anything is written
    plan = build_plan(job.data, job.storage, world_size, job.train.seed)
    run.save_plan(plan)
    return plan, split


def claim_run(job: JobSpec, world_size: int, notify: Callable[[str], None], nodes: int = 1) -> RunStart:
    """Check this start (see ``check_reach``, ``check_kernels``, ``check_trackers`` and
    ``check_start``; ``nodes``: how many nodes may run its workers), then take the run directory:
    its plan, the resolved ``job.yaml`` (what ``sft-cluster resume`` reads) and ``run.json``."""
    check_reach(job, nodes)
    check_kernels(job)
    check_trackers(job)
    resuming = check_start(job)
    check_trainable(job)
    plan, split = ensure_plan(job, world_size, notify, resuming=resuming)
    run = run_dir_of(job)
    storage.write_text(run.job_yaml, dump_job_yaml(job), run.options)
    run_id = current_run_id()
    run.write_json(run.owner, {"run_id": run_id, "claimed_at": time.time(), "name": job.name})
    return RunStart(run_id=run_id, resuming=resuming, plan=plan, split=split)
