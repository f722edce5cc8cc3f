"""``summary.json`` and ``loss.png``: written once a run ends, whatever the launcher."""

from __future__ import annotations

import time
from typing import Any

from sft_cluster.tracking.goodput import time_split
from sft_cluster.tracking.metrics import read_jsonl
from sft_cluster.tracking.plot import plot_loss
from sft_cluster.tracking.rundir import RunDir


def steady_tokens_per_second(records: list[dict[str, Any]]) -> float | None:
    """Tokens per second between the second and the last logged step (warm-up excluded)."""
    timed = [r for r in records if r.get("time") is not None and r.get("tokens") is not None][1:]
    if len(timed) < 2 or timed[-1]["time"] <= timed[0]["time"]:
        return None
    return (timed[-1]["tokens"] - timed[0]["tokens"]) / (timed[-1]["time"] - timed[0]["time"])


def steady_mean(records: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the records past the first 10% of the run's steps (warm-up, compilation and
    the first record, which has no rate, left out); None where no such record has it."""
    if not records:
        return None
    warm_up = records[-1]["step"] // 10
    values = [r[key] for r in records if r["step"] > warm_up and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def finalize_run(
    run: RunDir,
    *,
    name: str,
    status: str,
    started_at: float,
    error: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``summary.json`` and ``loss.png`` from what the workers left behind."""
    records = read_jsonl(run.metrics, run.options)
    events = read_jsonl(run.events, run.options)
    reports = run.worker_reports()
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    first_steps = [r["first_step_at"] for r in reports if r.get("first_step_at")]
    ended_at = time.time()
    split = time_split(records, events, started_at, ended_at)
    summary: dict[str, Any] = {
        "name": name,
        "status": status,
        "steps": records[-1]["step"] if records else 0,
        "world_size": reports[0]["world_size"] if reports else None,
        "nodes": sorted({r.get("node", r["hostname"]) for r in reports}),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "tokens": records[-1]["tokens"] if records else 0,
        "tokens_per_second": steady_tokens_per_second(records),
        "tokens_per_second_per_device": steady_mean(records, "tokens_per_second_per_device"),
        "time_to_first_step_seconds": (min(first_steps) - started_at) if first_steps else None,
        "wall_seconds": ended_at - started_at,
        "goodput": split["goodput"],
        "time_split": split,
        "restarts": sum(1 for e in events if e.get("event") == "resumed"),
        "resumed_from": [e["step"] for e in events if e.get("event") == "resumed"],
        "output_uri": run.uri,
        "final_model": run.final if status == "completed" else None,
        **(extra or {}),
    }
    mfu = steady_mean(records, "mfu")
    if mfu is not None:  # only measured on a GPU of a known peak (sft_cluster.train.flops)
        summary["mfu"] = mfu
    if records and records[-1].get("epoch") is not None:  # train.epochs: how far it got, in epochs
        summary["epochs"] = records[-1]["epoch"]
    if error:
        summary["error"] = error
    run.write_json(run.summary, summary)
    plot_loss(records, run.loss_png, f"{name}: loss", run.options)
    return summary
