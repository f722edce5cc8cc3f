"""``manifest.json``: what a committed checkpoint must contain, byte for byte."""

from __future__ import annotations

import hashlib
import json
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
