"""The per-worker training program (launcher-independent).

``run_worker`` is imported lazily: launchers import light modules of this
package (signals, environment) without paying for torch and transformers.
"""

from typing import Any

__all__ = ["run_worker"]


def __getattr__(name: str) -> Any:
    if name == "run_worker":
        from sft_cluster.train.worker import run_worker

        return run_worker
    raise AttributeError(name)
