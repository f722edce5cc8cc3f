"""Where a run's wall time went, and its goodput: the share spent on training steps that were kept.

The timeline of one ``drive`` (from ``started_at`` to ``ended_at``) is cut at the times the steps
were logged (``metrics.jsonl``), so the parts add up to the wall time:

- ``startup``: from the start to the first step logged;
- between two records of one attempt: ``data_wait`` (``data_wait_s``), ``checkpoint`` (the steps
  held by a save, ``checkpoint_s``), ``evaluation`` (``events.jsonl``) and the rest, ``productive``;
- at each restart (a ``resumed`` event): ``lost`` (from the resumed step's record to the last step
  the failed attempt logged, then trained again) and ``restart`` (from there to the next record);
- ``finish``: after the last record (the final save, the export and upload of the model).

A run resumed by a later ``drive`` (``sft-cluster resume``) starts its own timeline; its restart
from the earlier one is its start-up.
"""

from __future__ import annotations

from typing import Any

PARTS = ("startup", "productive", "evaluation", "checkpoint", "data_wait", "lost", "restart", "finish")


def _evaluation_s(events: list[dict[str, Any]], start: float, end: float) -> float:
    """Seconds evaluating between ``start`` and ``end`` (each evaluation's start to its end)."""
    began: float | None = None
    total = 0.0
    for event in events:
        if event.get("event") == "eval_started":
            began = event["time"]
        elif event.get("event") == "eval_finished" and began is not None:
            if start <= began and event["time"] <= end:
                total += event["time"] - began
            began = None
    return total


def _restarts(resumed: list[dict[str, Any]], kept_at: float, next_at: float) -> tuple[float, float]:
    """(lost, restart) seconds between the record of the step resumed from (``kept_at``) and the
    next record kept (``next_at``), across the attempts that resumed from that step in turn: each
    trained until its last record (``failed_at``: lost), then the next one started (restart)."""
    lost = restart = 0.0
    since = kept_at
    for event in sorted(resumed, key=lambda e: e["time"]):
        failed_at = max(event.get("failed_at", since), since)
        lost += failed_at - since
        restart += event["time"] - failed_at
        since = event["time"]
    return lost, restart + next_at - since


def time_split(
    records: list[dict[str, Any]], events: list[dict[str, Any]], started_at: float, ended_at: float
) -> dict[str, Any]:
    """Seconds per part (``PARTS``), ``goodput`` (productive / wall) and ``unaccounted`` (what the
    parts miss of the wall time: zero up to clock noise, a check of the metrics)."""
    wall = ended_at - started_at
    mine = sorted((r for r in records if r.get("time", 0) >= started_at), key=lambda r: r["step"])
    by_step = {r["step"]: r for r in records}
    restarts: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        if event.get("event") == "resumed" and event["time"] >= started_at:
            restarts.setdefault(event["step"], []).append(event)
    split = dict.fromkeys(PARTS, 0.0)
    if not mine:
        split["startup"] = wall
    else:
        split["startup"] = mine[0]["time"] - started_at
        previous = by_step.get(mine[0]["step"] - 1)
        for record in mine:
            if previous is not None and previous["time"] >= started_at:
                resumed = [e for e in restarts.get(previous["step"], []) if e["time"] <= record["time"]]
                if resumed:
                    lost, restart = _restarts(resumed, previous["time"], record["time"])
                    split["lost"] += lost
                    split["restart"] += restart
                else:
                    span = record["time"] - previous["time"]
                    steps = record["step"] - previous["step"]
                    waited = record.get("data_wait_s", 0.0) * steps
                    held = record.get("checkpoint_s", 0.0)
                    evaluating = _evaluation_s(events, previous["time"], record["time"])
                    split["data_wait"] += waited
                    split["checkpoint"] += held
                    split["evaluation"] += evaluating
                    split["productive"] += span - waited - held - evaluating
            previous = record
        split["finish"] = ended_at - mine[-1]["time"]
    accounted = sum(split.values())
    return {
        "wall_seconds": round(wall, 3),
        **{f"{part}_seconds": round(seconds, 3) for part, seconds in split.items()},
        "unaccounted_seconds": round(wall - accounted, 3),
        "goodput": round(split["productive"] / wall, 4) if wall > 0 else None,
    }


def describe_split(split: dict[str, Any]) -> str:
    """One line: the goodput, then each part that took time, largest first."""
    parts = sorted(((split[f"{part}_seconds"], part) for part in PARTS if part != "productive"), reverse=True)
    shown = ", ".join(f"{part.replace('_', ' ')} {took:.1f} s" for took, part in parts if took >= 0.05)
    goodput = split.get("goodput")
    head = "-" if goodput is None else f"{goodput:.1%} ({split['productive_seconds']:.1f} s training)"
    return f"{head}; {shown}" if shown else head
