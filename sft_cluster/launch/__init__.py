"""One backend per target; nothing about the target leaks below this package."""

from sft_cluster.launch.local import run_local

__all__ = ["run_local"]
