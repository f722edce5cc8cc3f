"""What a saved data cursor depends on: the driver checks it at a resume, the worker records it."""

from __future__ import annotations

import hashlib
from typing import Any

from sft_cluster.spec import JobSpec

TEMPLATE_KEY = "chat template"
GLOBAL_BATCH_KEY = "global batch rows"
# The name of each rank's data cursor in a checkpoint (its folder: ``data-cursor/rank-NNNNN.json``).
DATA_CURSOR = "data-cursor"
# Recorded with the cursors, but another split of the same global batch re-plans instead of refusing.
SPLIT_KEYS = ("train.micro_batch_size", "train.grad_accum_steps")


def template_fingerprint(template: str) -> str:
    """A short hash of the chat template samples are tokenized with (the text that decides every token)."""
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def cursor_settings(job: JobSpec, fingerprint: str, global_rows: int) -> dict[str, Any]:
    """Everything a saved data cursor means something only with (written into each manifest).

    ``global_rows``: rows per optimizer step over all workers. The micro batch and accumulation
    are recorded too, but another split of the same global batch re-plans, so only the product
    must stay what it was.
    """
    return {
        GLOBAL_BATCH_KEY: global_rows,
        "data.max_seq_len": job.data.max_seq_len,
        "data.packing": job.data.packing,
        "data.truncation": job.data.truncation,
        "data.eval_fraction": job.data.eval_fraction,
        "train.micro_batch_size": job.train.micro_batch_size,
        "train.grad_accum_steps": job.train.grad_accum_steps,
        TEMPLATE_KEY: fingerprint,
    }
