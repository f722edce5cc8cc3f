"""How a worker tells whoever launched it how training goes.

A sink must never block a training step: the Ray sink is a fire-and-forget
actor call; under plain torchrun the sink writes a log line now and then.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("sft_cluster.progress")


class ProgressSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...


class LogSink:
    """Logs every ``every``-th step event; for launches without a live driver."""

    def __init__(self, every: int = 10):
        self.every = every

    def emit(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "beat":  # for a driver's watchdog (sft_cluster.train.heartbeat)
            return
        if event.get("kind") == "notice":
            log.info("%s", event["message"])
        elif event.get("kind") != "step":
            log.info("%s", event)
        elif event["step"] % self.every == 0 or event["step"] == event["max_steps"]:
            epoch = f" epoch {event['epoch']:.2f}" if event.get("epoch") is not None else ""
            mfu = f" MFU {event['mfu']:.1%}" if event.get("mfu") is not None else ""
            log.info(
                "step %d/%d%s loss %.4f tokens/s %.0f%s",
                event["step"],
                event["max_steps"],
                epoch,
                event.get("loss") or float("nan"),
                event.get("tokens_per_second") or 0.0,
                mfu,
            )
