"""``manifest.json``: what a committed checkpoint must contain, byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_local_dir(root: Path) -> dict[str, dict[str, int | str]]:
    """``{relative path: {size, sha256}}`` for every file under ``root``."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST, COMMITTED):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


@dataclass
class Manifest:
    step: int
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"step": self.step, "files": self.files, "metadata": self.metadata}, indent=2, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(step=data["step"], files=data["files"], metadata=data.get("metadata", {}))


def state_file(name: str, rank: int) -> str:
    """Where rank ``rank`` keeps its named state ``name`` (its data cursor, ...) in a checkpoint folder."""
    return f"{name}/rank-{rank:05d}.json"


# Files only one rank reads back: its RNG state, its named states (``state_file``), its DeepSpeed
# ZeRO partition. Everything else (the DDP model and optimizer, the trainer state, DCP shards,
# which any rank may read from) is needed by every node.
_RANK_FILES = (
    re.compile(r"(?:^|/)rng_state_(\d+)\.pth$"),
    re.compile(r"(?:^|/)[A-Za-z0-9_.-]+/rank-(\d+)\.json$"),
    re.compile(r"(?:^|/)[^/]*zero_pp_rank_(\d+)_[^/]*$"),
)


def owning_rank(rel: str) -> int | None:
    """The one rank that reads ``rel`` on resume, or None when every rank may."""
    for pattern in _RANK_FILES:
        match = pattern.search(rel)
        if match:
            return int(match.group(1))
    return None


def files_to_fetch(manifest: Manifest, ranks: list[int], shared: bool) -> list[str]:
    """What to download for ``ranks`` (the ranks of one process, or of one node's fetcher).

    ``shared``: also the files no single rank owns (fetched once per node).
    """
    wanted = set(ranks)
    return sorted(
        rel for rel in manifest.files if (owner := owning_rank(rel)) in wanted or (owner is None and shared)
    )
