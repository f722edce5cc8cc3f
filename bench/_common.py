"""What several benches share."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB (``VmHWM``). Not ``ru_maxrss``: Linux carries that over from
    the parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
