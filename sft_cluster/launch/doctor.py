"""``sft-cluster doctor``: what can be checked in seconds before a job is submitted, each check with
its outcome and, when it fails, the fix.

The checks that need the cluster (does it answer, which versions and resources does it have) are
the cluster kind's (``launch/probes.py``); the ones here read the job's own inputs from this
machine: the output folder, the data and the space a checkpoint needs. ``submit`` and ``sbatch``
run the fast subset (``deep=False``): no probe job on the cluster, no tokenizer.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_cluster import storage
from sft_cluster.spec import JobSpec

# The packages whose versions the submitting machine and the cluster must agree on (major.minor):
# ray for the Jobs API and the job file's meaning, the rest for the checks run here (masks,
# templates) to hold where the job trains, and for checkpoints to move between launchers.
AGREEING_PACKAGES = ("ray", "torch", "transformers", "trl")
# Bytes per parameter a node's staging holds at most: fp32 weights and Adam's two moments in a
# checkpoint (12), and the fp32 final model staged before its upload (4).
STAGED_BYTES_PER_PARAM = 16


def ptrace_facts() -> dict[str, Any]:
    """What decides whether the hang watchdog's py-spy may read a worker's stacks on this machine:
    Yama's ``ptrace_scope`` (None without Yama) and whether this user may trace any process (root,
    or ``CAP_SYS_PTRACE``, bit 19 of the effective capabilities). Standard library only: the probe
    runs it on a node (``PROBE_SOURCE``)."""
    import os

    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as file:
            scope = int(file.read())
    except (OSError, ValueError):
        scope = None
    capable = os.geteuid() == 0
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("CapEff:"):
                    capable = capable or bool(int(line.split()[1], 16) >> 19 & 1)
    except OSError:
        pass
    return {"ptrace_scope": scope, "ptrace_capable": capable}


# Run on a node with the cluster's Python: only the standard library, so it needs nothing shipped.
PROBE_MARK = "SFTC-PROBE "
PROBE_SOURCE = f"""
import importlib.metadata as m, json, os, shutil, tempfile
from typing import Any
{inspect.getsource(ptrace_facts)}
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
print({PROBE_MARK!r} + json.dumps({{
    "versions": {{name: version(name) for name in {AGREEING_PACKAGES!r}}},
    "cpus": os.cpu_count(),
    "staging_free_bytes": shutil.disk_usage(tempfile.gettempdir()).free,
    "staging": tempfile.gettempdir(),
    **ptrace_facts(),
}}))
"""


@dataclass
class Check:
    """One line of the doctor's report: ``fix`` says what to do when ``ok`` is false."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def parse_probe(output: str) -> dict[str, Any] | None:
    """The probe's findings from its output (None: it printed none)."""
    for line in reversed(output.splitlines()):
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK) :])
    return None


def local_versions() -> dict[str, str | None]:
    """This machine's versions of ``AGREEING_PACKAGES`` (from the installed metadata, no import)."""
    import importlib.metadata

    found: dict[str, str | None] = {}
    for name in AGREEING_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _release(version: str | None) -> str | None:
    return None if version is None else ".".join(version.split("+")[0].split(".")[:2])


def versions_agree(here: dict[str, str | None], there: dict[str, str | None], where: str) -> Check:
    """Major.minor of every package in ``AGREEING_PACKAGES`` the same here and ``where``."""
    differ = [name for name in here if _release(here[name]) != _release(there.get(name))]
    listed = ", ".join(f"{name} {there.get(name) or 'missing'}" for name in AGREEING_PACKAGES)
    if not differ:
        return Check("versions", True, f"{where}: {listed}")
    pins = " ".join(f"{name}=={here[name]}" for name in differ if here[name])
    return Check(
        "versions",
        False,
        "; ".join(
            f"{name} {here[name] or 'missing'} here, {there.get(name) or 'missing'} {where}"
            for name in differ
        ),
        f"install the same releases in both places (e.g. pip install {pins} {where})",
    )


def check_output(job: JobSpec) -> Check:
    """``output_uri`` takes a write and gives it back: a probe object is written, read and removed.
    A local folder that does not exist yet is not made: its nearest existing parent must be writable."""
    uri = job.output_uri.rstrip("/")
    if storage.is_local(uri):
        return _local_output(storage.absolute_path(uri))
    probe = storage.join(uri, f".sftc-doctor-{uuid.uuid4().hex[:12]}")
    options = storage.storage_options_for(uri, job.storage.endpoint_url, job.storage.options)
    try:
        storage.write_text(probe, "probe", options)
        back = storage.read_text(probe, options)
        fs, path = storage.filesystem(probe, options)
        fs.rm(path)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return Check(
            "output",
            False,
            f"{job.output_uri}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            "check the bucket, its permissions and the credentials in this environment "
            "(storage.endpoint_url for an S3-compatible server)",
        )
    if back != "probe":
        return Check("output", False, f"{job.output_uri}: read back something other than was written")
    return Check("output", True, f"{job.output_uri}: written, read back and removed")


def _local_output(folder: Path) -> Check:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return Check(
            "output",
            False,
            f"{folder}: {existing} is not a folder this user can write to",
            "choose another output_uri, or fix the permissions",
        )
    said = "writable" if existing == folder else f"to be made in {existing} (writable)"
    return Check("output", True, f"{folder}: {said}")


def check_data(job: JobSpec) -> list[Check]:
    """Every source lists; its first records parse, and tokenize with a non-empty assistant mask."""
    from sft_cluster.data import DataError, check_sources
    from sft_cluster.driver.claim import check_trainable

    problems = check_sources(job.data, job.storage)
    if problems:
        return [Check("data", False, problem, "fix the source named, or remove it") for problem in problems]
    try:
        check_trainable(job)
    except DataError as exc:
        return [Check("data", False, str(exc), "see data preview: sft-cluster data preview JOB")]
    names = ", ".join(source.uri for source in job.data.sources)
    return [Check("data", True, f"{names}: listed; first records parse and train tokens")]


def checkpoint_bytes(job: JobSpec) -> int:
    """What a node's staging holds at most for this model (``STAGED_BYTES_PER_PARAM``), counted on the
    meta device from the model's config: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_cluster.spec import resolve_builtin

    name = job.model.name_or_path
    path = resolve_builtin(name) if name.startswith("builtin:") else name
    config = AutoConfig.from_pretrained(path, trust_remote_code=job.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=job.model.trust_remote_code)
    return sum(param.numel() for param in model.parameters()) * STAGED_BYTES_PER_PARAM


def check_staging(needed: int, free: int, where: str) -> Check:
    """Room in a node's staging folder for the largest thing staged there."""
    detail = f"{where}: {_size(free)} free; a checkpoint and the final model need {_size(needed)}"
    if free >= needed:
        return Check("staging", True, detail)
    return Check(
        "staging",
        False,
        detail,
        "free space there, or point TMPDIR at a larger local disk in the workers' environment",
    )


def check_stacks(found: dict[str, Any], where: str) -> Check:
    """The hang watchdog can read workers' stacks with py-spy ``where`` (``ptrace_facts``). Under
    Yama's scope 1 (Ubuntu's default) the workers name any process of their user as a tracer
    (``train.heartbeat.allow_stack_dumps``); scope 2 needs root or ``CAP_SYS_PTRACE``; 3 forbids it."""
    scope, capable = found.get("ptrace_scope"), bool(found.get("ptrace_capable"))
    setting = "no Yama" if scope is None else f"kernel.yama.ptrace_scope={scope}"
    if scope in (None, 0, 1) or (scope == 2 and capable):
        return Check("stacks", True, f"{where}: {setting}; py-spy may read the workers' stacks")
    return Check(
        "stacks",
        False,
        f"{where}: {setting}: a hung run is still ended and resumed, but without the workers' stacks",
        "run the workers as root or with CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE), or set "
        "kernel.yama.ptrace_scope to 1 or less",
    )


def _size(count: int) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e9 else f"{count / 1e6:,.1f} MB"


def local_staging(needed: int) -> Check:
    """``check_staging`` for this machine's temp folder, where the embedded cluster stages."""
    import tempfile

    folder = tempfile.gettempdir()
    return check_staging(needed, shutil.disk_usage(folder).free, f"staging {folder} here")
