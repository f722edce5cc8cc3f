"""Preemption: a signal sets a flag; the trainer checkpoints at the next step and stops.

The handler only sets an event, so a second signal during the save changes
nothing. Handlers must be installed from a process's main thread: under Ray
Train V2 the training function runs in another thread, so the driver installs
them through ``runtime_env={"worker_process_setup_hook": ...}``.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_REQUESTED = threading.Event()
# A checkpoint wanted now, training going on: an elastic worker group is about to be resized.
SAVE_REQUESTED = threading.Event()
SIGNALS_ENV = "SFT_CLUSTER_PREEMPTION_SIGNALS"


def _handler(signum: int, frame: object) -> None:
    STOP_REQUESTED.set()


def install(names: list[str]) -> bool:
    """Route each named signal to the stop flag; False when not on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for name in names:
        signal.signal(getattr(signal, name), _handler)
    return True


def install_from_env() -> None:
    """``worker_process_setup_hook`` for Ray workers: signals listed in the environment."""
    names = [n for n in os.environ.get(SIGNALS_ENV, "").split(",") if n]
    install(names)
