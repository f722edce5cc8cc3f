"""What one rank did, written to ``workers/rank-N.json``: topology and what it trained on.

Each row this rank trains on is folded into one running digest (constant size, whatever
the run's length). The full list of per-row fingerprints, which grows with every step,
is kept only when ``SFT_CLUSTER_RECORD_ROWS=1`` (tests that compare what ranks saw).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

from sft_cluster.data.packing import IGNORE_INDEX
from sft_cluster.train import staging
from sft_cluster.train.callbacks import ProgressCallback
from sft_cluster.train.model import parameter_share

RECORD_ROWS_ENV = "SFT_CLUSTER_RECORD_ROWS"


class RecordingCollator:
    """Wraps the collator to fingerprint and count every row this rank trains on."""

    def __init__(self, inner):
        self.inner = inner
        self.rows = 0
        self.trained_tokens = 0  # labels that carry loss
        self._digest = hashlib.sha256()
        self.row_digests: list[str] | None = [] if os.environ.get(RECORD_ROWS_ENV) == "1" else None

    def __call__(self, features):
        for row in features:
            digest = hashlib.sha1(row["input_ids"].numpy().tobytes()).digest()[:8]
            self._digest.update(digest)
            self.rows += 1
            self.trained_tokens += int((row["labels"] != IGNORE_INDEX).sum())
            if self.row_digests is not None:
                self.row_digests.append(digest.hex())
        return self.inner(features)

    @property
    def digest(self) -> str:
        """One hash of every row read, in order (includes rows read ahead by the loader)."""
        return self._digest.hexdigest()[:32]


def worker_report(
    trainer,
    recorder: RecordingCollator,
    rank: int,
    world_size: int,
    started: float,
    progress: ProgressCallback,
) -> dict[str, Any]:
    """What this rank did: topology and fingerprints, for tests and post-mortems."""
    report = {
        "rank": rank,
        "world_size": world_size,
        "hostname": socket.gethostname(),
        # The launcher's node name tells fake (or containerised) nodes on one host apart.
        "node": staging.node_name(),
        "ray_node_id": os.environ.get(staging.NODE_ENV),
        "pid": os.getpid(),
        "distributed_type": trainer.accelerator.distributed_type.value,
        "model_wrapper": type(trainer.model_wrapped).__name__,
        "model_class": type(trainer.model).__name__,
        "parameter_share": parameter_share(trainer.model),
        "device": str(trainer.args.device),
        "steps": trainer.state.global_step,
        "rows_seen": recorder.rows,
        "trained_tokens_seen": recorder.trained_tokens,
        "rows_digest": recorder.digest,
        "started_at": started,
        "first_step_at": progress.first_step_time,
        "finished_at": time.time(),
    }
    if recorder.row_digests is not None:
        report["row_digests"] = recorder.row_digests
    if trainer.args.torch_compile:
        report["compiled_graphs"] = compiled_graphs()
    return report


def compiled_graphs() -> int:
    """How many graphs torch.compile built in this process: an OptimizedModule compiles lazily, at its
    first call, so its class alone does not show that anything was compiled."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
