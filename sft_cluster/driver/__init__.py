"""The one driver every launcher goes through: prepare the run, run an executor, finish the run.

``run.drive`` is the shape; the executors are ``ray_train`` (Ray Train on a Ray cluster:
``sft-cluster run``'s embedded one, a Ray Job's, a Slurm allocation's) and ``torchrun``
(torchrun's agent on each node of a Slurm allocation). ``python -m sft_cluster.driver`` is the
entrypoint on a cluster. This package's ``__init__`` imports nothing heavy: the CLI reads
``claim`` without importing Ray, which must be imported only after its auth settings are set.
"""

from typing import Any

__all__ = ["run_training"]


def __getattr__(name: str) -> Any:
    if name == "run_training":  # imports ray
        from sft_cluster.driver.ray_train import run_training

        return run_training
    raise AttributeError(name)
