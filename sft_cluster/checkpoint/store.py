"""Commit, find, verify and prune checkpoints under a run's ``checkpoints/``."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_cluster import storage
from sft_cluster.checkpoint.manifest import COMMITTED, MANIFEST, Manifest

log = logging.getLogger("sft_cluster.checkpoint")
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class CommittedCheckpoint:
    step: int
    uri: str
    manifest: Manifest


class CheckpointStore:
    """The ``checkpoints/`` folder of one run, on any fsspec filesystem."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None):
        """``uri``: the run's checkpoints folder (``RunDir.checkpoints``, which names it)."""
        self.uri = uri
        self.options = options or {}
        self.fs, self.path = storage.filesystem(self.uri, self.options)
        # Steps this process has seen verify (or wrote itself): retention need not hash them again.
        self._verified: set[int] = set()

    def step_uri(self, step: int) -> str:
        return storage.join(self.uri, f"step-{step:08d}")

    def _step_path(self, step: int) -> str:
        return f"{self.path.rstrip('/')}/step-{step:08d}"

    def steps(self) -> list[int]:
        """Every step folder present, committed or not, oldest first."""
        if not self.fs.exists(self.path):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        return sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.match(n)))

    def is_committed(self, step: int) -> bool:
        return self.fs.exists(f"{self._step_path(step)}/{COMMITTED}")

    def committed_steps(self) -> list[int]:
        return [s for s in self.steps() if self.is_committed(s)]

    def begin(self, step: int) -> None:
        """Before any file of a (re-)save lands in ``step``'s folder: it must stop looking committed.

        A step can be saved again after its commit failed verification and was retrained;
        the old ``COMMITTED`` goes first, then the manifest, so a crash mid-upload leaves a
        folder that is plainly incomplete instead of one whose marker vouches for mixed files.
        """
        base = self._step_path(step)
        for name in (COMMITTED, MANIFEST):
            if self.fs.exists(f"{base}/{name}"):
                storage.retrying(self.fs.rm, f"{base}/{name}", what=f"removing {name} of step {step}")
        self._verified.discard(step)

    def upload(self, local_dir: Path, step: int) -> None:
        """Copy a local checkpoint folder's files into the step folder (not committed yet)."""
        target = self._step_path(step)
        if storage.is_local(self.uri):
            Path(target).mkdir(parents=True, exist_ok=True)
        self.fs.put(str(local_dir).rstrip("/") + "/", target + "/", recursive=True)

    def upload_files(self, local_root: Path, relative_paths: list[str], step: int) -> None:
        """Copy some files of a local checkpoint folder (one rank's share) into the step folder."""
        target = self._step_path(step)
        for rel in relative_paths:
            destination = f"{target}/{rel}"
            self.fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
            storage.retrying(self.fs.put_file, str(local_root / rel), destination, what=f"uploading {rel}")

    def download_files(self, step: int, relative_paths: list[str], local_dir: Path) -> None:
        """Copy some files of a step folder into ``local_dir`` (one rank's or one node's share)."""
        base = self._step_path(step)
        for rel in relative_paths:
            destination = local_dir / rel
            destination.parent.mkdir(parents=True, exist_ok=True)
            storage.retrying(self.fs.get_file, f"{base}/{rel}", str(destination), what=f"downloading {rel}")

    def commit(self, manifest: Manifest) -> str:
        """Write the manifest, then ``COMMITTED``: from that moment the checkpoint counts."""
        step_uri = self.step_uri(manifest.step)
        storage.write_text(storage.join(step_uri, MANIFEST), manifest.to_json(), self.options)
        storage.write_text(storage.join(step_uri, COMMITTED), f"{manifest.step}\n", self.options)
        return step_uri

    def read_manifest(self, step: int) -> Manifest:
        """``step``'s manifest, unverified; ValueError when it is missing or unreadable."""
        try:
            return Manifest.from_json(self.fs.cat_file(f"{self._step_path(step)}/{MANIFEST}").decode())
        except FileNotFoundError:
            raise ValueError("manifest.json is missing") from None
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"manifest.json is unreadable ({exc})") from None

    def verify(self, step: int, fast: bool = False) -> Manifest:
        """The manifest of ``step`` if every file matches it; raises ValueError naming the problem."""
        base = self._step_path(step)
        manifest = self.read_manifest(step)
        for rel, expected in manifest.files.items():
            path = f"{base}/{rel}"
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                raise ValueError(f"{rel} is missing") from None
            if size != expected["size"]:
                raise ValueError(f"{rel} has {size} bytes, manifest says {expected['size']}")
            if not fast:
                digest = hashlib.sha256()
                with self.fs.open(path, "rb") as handle:
                    while chunk := handle.read(8 << 20):
                        digest.update(chunk)
                if digest.hexdigest() != expected["sha256"]:
                    raise ValueError(f"{rel} does not match its sha256 in the manifest")
        if not fast:
            self._verified.add(step)
        return manifest

    def mark_verified(self, step: int) -> None:
        """``step`` was just committed from files this process hashed itself."""
        self._verified.add(step)

    def _verifies(self, step: int, fast: bool) -> bool:
        try:
            self.verify(step, fast=fast or step in self._verified)
        except (ValueError, OSError) as exc:
            log.warning("retention does not count %s: %s", self.step_uri(step), exc)
            return False
        return True

    def latest(
        self, fast: bool = False, on_skip: Callable[[str], None] | None = None
    ) -> CommittedCheckpoint | None:
        """The newest checkpoint that is committed and verifies.

        Each one skipped is reported (a warning, and ``on_skip`` with the message).
        """

        def skip(message: str) -> None:
            log.warning("%s", message)
            if on_skip is not None:
                on_skip(message)

        for step in reversed(self.steps()):
            uri = self.step_uri(step)
            if not self.is_committed(step):
                skip(f"skipping checkpoint {uri}: no COMMITTED marker (incomplete save)")
                continue
            try:
                manifest = self.verify(step, fast=fast)
            except ValueError as exc:
                skip(f"skipping checkpoint {uri}: {exc}")
                continue
            return CommittedCheckpoint(step, uri, manifest)
        return None

    def local_folder(self, step: int) -> Path | None:
        """``step``'s folder as a local path when the store is local (resume reads it in place)."""
        return Path(self._step_path(step)) if storage.is_local(self.uri) else None

    def prune(self, keep_last: int, keep_every: int | None = None, fast: bool = False) -> list[int]:
        """Delete old checkpoints; returns the steps deleted.

        Only commits that verify count: the newest ``keep_last`` of them stay, and every
        multiple of ``keep_every``. Anything older than the newest verified commit and not
        kept goes (superseded commits, corrupt ones, leftovers of interrupted saves); newer
        folders stay (a save in progress, or a corrupt commit nothing replaced yet). With no
        verified commit nothing is deleted. ``fast`` checks sizes only, as ``resume --fast``.
        """
        verified: list[int] = []
        for step in reversed(self.committed_steps()):
            if len(verified) == keep_last:
                break
            if self._verifies(step, fast):
                verified.append(step)
        if not verified:
            return []
        keep = set(verified)
        if keep_every:
            keep |= {s for s in self.committed_steps() if s % keep_every == 0}
        newest = verified[0]
        doomed = [s for s in self.steps() if s not in keep and s < newest]
        for step in doomed:
            path = self._step_path(step)
            # Remove the marker first: a half-deleted folder must never look committed.
            if self.fs.exists(f"{path}/{COMMITTED}"):
                self.fs.rm(f"{path}/{COMMITTED}")
            self.fs.rm(path, recursive=True)
            self._verified.discard(step)
        return doomed
