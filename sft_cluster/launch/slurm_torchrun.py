"""``torchrun`` for the Slurm template: the same launcher, two differences.

- The agent ignores the preemption signal (``--ignore-signal USR1``). Slurm
  delivers a step's signals to every process of the step; the workers turn it
  into a checkpoint-and-stop, while an agent left at the default action would
  die and take the workers with it. Workers inherit the ignored disposition
  until they install their own handler at start-up.
- When the workers stopped for preemption, the agent exits 75 too, instead of
  torchrun's generic 1, so the batch script requeues. "Stopped for preemption":
  at least one worker exited 75 and every other failed worker either exited 75
  or was ended by the agent's own SIGTERM (torchrun stops the remaining
  workers as soon as the first one exits non-zero; every rank exits 75 only
  after the checkpoint of that step is committed, so nothing is lost).
  Likewise exit 2 (a mistake in the job or its data, already explained by the
  worker) stays 2, so the batch script neither requeues nor hides it.

Usage: ``python -m sft_cluster.launch.slurm_torchrun [--ignore-signal SIG] TORCHRUN_ARGS...``
"""

from __future__ import annotations

import signal
import sys

from sft_cluster.exitcodes import PREEMPTED, USER_ERROR


def _signal(name: str) -> signal.Signals:
    name = name.upper()
    if name.isdigit():
        return signal.Signals(int(name))
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    while args and args[0].startswith("--ignore-signal"):
        option = args.pop(0)
        name = option.split("=", 1)[1] if "=" in option else args.pop(0)
        signal.signal(_signal(name), signal.SIG_IGN)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        print(f"sft-cluster: worker exit codes {sorted(codes)}", file=sys.stderr, flush=True)
        for code in (PREEMPTED, USER_ERROR):
            if code in codes and codes <= {code, -signal.SIGTERM}:
                return code
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
