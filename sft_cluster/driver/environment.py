"""What a Ray worker process needs before the training function runs."""

from __future__ import annotations

import os
from typing import Any

from sft_cluster.spec import JobSpec
from sft_cluster.train.signals import SIGNALS_ENV

# NCCL's settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ...) and torch's for NCCL
# (TORCH_NCCL_ASYNC_ERROR_HANDLING, ...): a Ray worker on another node would not have them.
PASS_THROUGH_PREFIXES = ("NCCL_", "TORCH_NCCL_")


def ray_worker_runtime_env(job: JobSpec) -> dict[str, Any]:
    """Ray ``runtime_env`` for the workers of ``job``.

    Ray Train's print patch would dump bytecode from ``datasets.map`` into the
    logs; the setup hook installs the preemption handlers on the worker's main
    thread (the training function runs in another one). NCCL settings in this
    process's environment reach every worker, on every node, as they are here.
    """
    env = {name: value for name, value in os.environ.items() if name.startswith(PASS_THROUGH_PREFIXES)}
    env.update(
        {
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "TOKENIZERS_PARALLELISM": "false",
            SIGNALS_ENV: ",".join(job.checkpoint.preemption_signals),
        }
    )
    return {"env_vars": env, "worker_process_setup_hook": "sft_cluster.train.signals.install_from_env"}
