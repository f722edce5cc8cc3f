"""The per-worker training program (launcher-independent)."""

from sft_cluster.train.worker import run_worker

__all__ = ["run_worker"]
