"""Node-local staging folders of one attempt: removed whatever the outcome.

The Trainer saves into a staging folder before our upload, and a resume downloads into
one. A worker that ends normally or with an exception removes its own; one that was
SIGKILLed cannot, so every start also removes the folders whose owner process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "sftc-stage-"
_OWNER = ".owner-pid"
# Set by the executor in each worker. Nodes of one host (test clusters, containers) share /tmp,
# so the node, not the host, names a node's shared folder: the Ray node id (Ray executor), and the
# node's name as its launcher knows it (a Slurm template sets it from SLURMD_NODENAME).
NODE_ENV = "SFT_CLUSTER_NODE_ID"
NODE_NAME_ENV = "SFT_CLUSTER_NODE_NAME"


def node_name() -> str:
    """This process's node as people name it: the launcher's node name, else the host name."""
    return os.environ.get(NODE_NAME_ENV) or socket.gethostname()


def node_key() -> str:
    """This process's node: the Ray node, else the launcher's node name, else the host name."""
    return os.environ.get(NODE_ENV) or node_name()


def _root() -> Path:
    return Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _OWNER).write_text(str(os.getpid()))
    return folder


def sweep() -> list[Path]:
    """Remove staging folders left by processes that no longer exist on this node."""
    removed = []
    for folder in _root().glob(f"{PREFIX}*"):
        try:
            pid = int((folder / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # being created right now, or not ours
        if not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def node_folder(token: str, owner: bool) -> Path:
    """A folder every rank of this node finds by the same ``token``; ``owner`` makes it."""
    node = re.sub(r"[^A-Za-z0-9_.-]", "_", node_key())[:64]
    folder = _root() / f"{PREFIX}resume-{token}-{node}"
    return _claim(folder) if owner else folder


@contextlib.contextmanager
def staging(label: str) -> Iterator[Path]:
    """A fresh staging folder for this process, removed on the way out."""
    folder = _claim(Path(tempfile.mkdtemp(prefix=f"{PREFIX}{label}-")))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
