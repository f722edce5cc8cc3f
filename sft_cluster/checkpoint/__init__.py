"""Checkpoints that count only once committed, on any fsspec store.

A checkpoint is ``<run>/checkpoints/step-NNNNNNNN/`` holding the Trainer's
files, every rank's data cursor and ``manifest.json`` (each file's size and
sha256). ``COMMITTED`` is written last; a folder without it, or whose files do
not match the manifest, is never resumed from and never counted by retention.
"""

from sft_cluster.checkpoint.manifest import Manifest, hash_local_dir
from sft_cluster.checkpoint.store import CheckpointStore, CommittedCheckpoint

__all__ = ["CheckpointStore", "CommittedCheckpoint", "Manifest", "hash_local_dir"]
