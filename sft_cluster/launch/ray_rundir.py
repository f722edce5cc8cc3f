"""A Ray Job's run directory as the submitting machine sees it: the stop request, the summary.

Ray stops a job with SIGTERM and SIGKILL a few seconds later
(``RAY_JOB_STOP_WAIT_TIME_S``), too soon to checkpoint. A graceful stop is a
file instead: ``<output_uri>/control/stop`` naming the run; the driver polls
it, has the workers checkpoint and end, and exits ``exitcodes.PREEMPTED``.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from sft_cluster import storage
from sft_cluster.launch.base import LaunchError
from sft_cluster.spec import JobSpec
from sft_cluster.spec.cluster import redact_text
from sft_cluster.tracking import RunDir, run_dir_of

JOB_ENV = "SFT_CLUSTER_JOB_YAML"


def run_dir(info: Any) -> RunDir:
    """The run directory of a job of ours (``get_job_info``), with the storage options of its job YAML."""
    uri = info.metadata["output_uri"]
    env_vars = (info.runtime_env or {}).get("env_vars") or {}
    try:
        job = JobSpec.model_validate(yaml.safe_load(env_vars[JOB_ENV]))
    except Exception:  # not ours, or another version's schema: the environment's settings
        return RunDir(uri, storage.storage_options_for(uri, None, {}))
    return run_dir_of(job)


def request_stop(info: Any) -> str:
    """Write the stop request for the run of ``info``; returns where it went.

    Raises LaunchError when the run directory cannot be written from here: the
    job then keeps running, and only ``stop --now`` can end it.
    """
    job_id = info.submission_id
    now = f"'sft-cluster stop {job_id} --now' (steps since its last checkpoint are lost)"
    if not (info.metadata or {}).get("output_uri"):
        raise LaunchError(
            f"job '{job_id}' was not submitted by sft-cluster (no output_uri in its metadata): it cannot "
            f"be asked to checkpoint; end it with {now}"
        )
    run = run_dir(info)
    if storage.is_local(run.uri) and not storage.local_path(run.uri).is_dir():
        raise LaunchError(
            f"job '{job_id}': its output_uri {run.uri} is not a directory on this machine (the cluster "
            f"writes it elsewhere, or the job has not created it yet): the stop request cannot reach "
            f"the job. Retry in a moment, or end it with {now}"
        )
    try:
        run.write_json(run.stop_request, {"run_id": job_id, "requested_at": time.time()})
    except Exception as exc:
        reason = redact_text(" ".join(str(exc).split()))[:200] or type(exc).__name__
        raise LaunchError(
            f"job '{job_id}': cannot write the stop request to {run.stop_request} from here ({reason}); "
            f"the job is still running: fix access to {run.uri}, or end it with {now}"
        ) from None
    return run.stop_request


def preempted_message(info: Any, cluster_file: str) -> str:
    """What a job that checkpointed and ended on request left, and how to continue it."""
    run = run_dir(info)
    try:
        steps = run.read_json(run.summary).get("steps")
    except Exception:  # unreadable from here: say what is certain
        steps = None
    where = f" at step {steps}" if isinstance(steps, int) else ""
    return f"checkpointed{where}; resume with: sft-cluster resume {run.uri} --cluster {cluster_file}"
