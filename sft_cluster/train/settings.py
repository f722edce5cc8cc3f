"""What a saved data cursor depends on: the driver checks it at a resume, the worker records it."""

from __future__ import annotations

import hashlib
from typing import Any

from sft_cluster.spec import JobSpec

TEMPLATE_KEY = "chat template"


def template_fingerprint(template: str) -> str:
    """A short hash of the chat template samples are tokenized with (the text that decides every token)."""
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def cursor_settings(job: JobSpec, fingerprint: str) -> dict[str, Any]:
    """Everything a saved data cursor means something only with (written into each manifest)."""
    return {
        "data.max_seq_len": job.data.max_seq_len,
        "data.packing": job.data.packing,
        "data.truncation": job.data.truncation,
        "data.eval_fraction": job.data.eval_fraction,
        "train.micro_batch_size": job.train.micro_batch_size,
        "train.grad_accum_steps": job.train.grad_accum_steps,
        TEMPLATE_KEY: fingerprint,
    }
