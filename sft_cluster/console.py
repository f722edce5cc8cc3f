"""The driver's view of training: one live bar on a terminal, a line now and then in logs."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressDisplay:
    """Renders worker events (``start``, ``first_step``, ``step``) for a person watching."""

    def __init__(self, console: Console, max_steps: int | None, log_every_seconds: float = 10.0):
        """``max_steps`` None: not known yet (``train.epochs`` is counted by the workers); every step
        event carries the run's step count, and the display takes it from there."""
        self.console = console
        self.max_steps = max_steps
        self.log_every_seconds = log_every_seconds
        self._last_line = 0.0
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressDisplay:
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[epoch]}loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s{task.fields[mfu]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.max_steps, loss="-", tps="-", mfu="", epoch=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def handle(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event.get("kind")
            if kind == "start" and event.get("rank") == 0:
                resumed = event.get("resumed_from")
                origin = f", resumed from step {resumed}" if resumed is not None else ""
                self._say(f"workers up: world size {event['world_size']}{origin}")
            elif kind == "step":
                self._step(event)
            elif kind == "checkpoint":
                self._say(f"checkpoint step {event['step']} committed")
            elif kind == "worker_failed":
                reason = escape(event["reason"])
                self._say(f"[red]rank {event['rank']} failed[/red] ({reason}); restarting the worker group")
            elif kind == "notice":
                self._say(f"[yellow]{escape(event['message'])}[/yellow]")
            elif kind == "preempted":
                self._say(f"stop requested: checkpointed step {event['step']} and stopped")

    def _say(self, message: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", soft_wrap=True)

    def _step(self, event: dict[str, Any]) -> None:
        if event.get("eval_loss") is not None:
            self._say(f"step {event['step']}: eval loss {event['eval_loss']:.4f}")
        self.max_steps = event.get("max_steps") or self.max_steps
        loss = f"{event['loss']:.4f}" if event.get("loss") is not None else "-"
        tps = f"{event['tokens_per_second']:,.0f}" if event.get("tokens_per_second") else "-"
        mfu = f"  MFU {event['mfu']:.1%}" if event.get("mfu") is not None else ""  # GPUs of a known peak
        epoch = f"epoch {event['epoch']:.2f}  " if event.get("epoch") is not None else ""
        if self._progress is not None:
            self._progress.update(
                self._task,
                total=self.max_steps,
                completed=event["step"],
                loss=loss,
                tps=tps,
                mfu=mfu,
                epoch=epoch,
            )
            return
        now = time.monotonic()
        if now - self._last_line >= self.log_every_seconds or event["step"] == self.max_steps:
            self._last_line = now
            self._say(f"step {event['step']}/{self.max_steps}  {epoch}loss {loss}  {tps} tok/s{mfu}")
