"""The GPU check's worker program, started by the driver's torchrun executor (``--worker-module``):
``sft_cluster.train`` with deterministic kernels and a note of what it used (``gpu_check.worker_command``)."""

import sys

from scripts.gpu_check import worker_command

if __name__ == "__main__":
    sys.exit(worker_command(sys.argv[1:]))
