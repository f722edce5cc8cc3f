"""``train.epochs`` end to end under torchrun on 2 ranks: the counted steps are trained (and size the
learning-rate schedule), the count is saved with the plan, and a resume reads it instead of counting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sft_cluster.spec import load_job, resolve_builtin
from tests.conftest import REPO, run_torchrun

JOB = REPO / "jobs" / "smoke.yaml"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cosine(job, step: int, steps: int) -> float:
    return job.train.learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))


def test_epochs_train_the_counted_steps_and_a_resume_does_not_count_again(tmp_path, isolated_env):
    lines = Path(resolve_builtin("builtin:smoke-chat.jsonl")).read_text().splitlines(keepends=True)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(lines[:120]))
    out = tmp_path / "run"
    overrides = [
        f"output_uri={out}",
        f"data.sources=[{{uri: '{data}'}}]",
        "data.eval_fraction=0",
        "train.eval_every_n_steps=null",
        "train.max_steps=null",
        "train.epochs=1",
        "train.warmup_steps=0",
        "train.micro_batch_size=1",
        "tracking=none",
    ]
    first = run_torchrun(JOB, isolated_env, *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = json.loads((out / "epochs.json").read_text())
    assert saved["plan"] == json.loads((out / "plan.json").read_text())["id"]
    rows = saved["rows_per_rank"]  # each rank's own share (tests/unit/test_epochs.py: as the stream packs it)
    assert len(rows) == 2 and min(rows) > 0
    job = load_job(JOB, overrides)
    per_step = job.train.micro_batch_size * job.train.grad_accum_steps
    steps = min(rows) // per_step
    assert steps >= 3
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["epoch"] == round(steps * per_step / min(rows), 4)
    # The cosine schedule was sized by the counted steps (the LR of step s is the schedule at s - 1).
    assert [m["learning_rate"] for m in metrics] == pytest.approx(
        [_cosine(job, s, steps) for s in range(steps)]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["steps"], summary["epochs"]) == (
        "completed",
        steps,
        metrics[-1]["epoch"],
    )

    # Two epochs now: the run resumes from its last step with the saved count, and trains on.
    before = ((out / "epochs.json").read_bytes(), (out / "epochs.json").stat().st_mtime_ns)
    second = run_torchrun(JOB, isolated_env, *overrides, "train.epochs=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "not counting again" in second.stderr and "counting the packed rows" not in second.stderr
    assert ((out / "epochs.json").read_bytes(), (out / "epochs.json").stat().st_mtime_ns) == before
    events = _jsonl(out / "events.jsonl")
    assert [e["event"] for e in events if e["event"] in ("epochs_counted", "resumed")] == [
        "epochs_counted",
        "resumed",
    ]
    total = math.floor(2 * min(rows) / per_step)
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, total + 1))
    assert metrics[-1]["learning_rate"] == pytest.approx(_cosine(job, total - 1, total))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from"]) == (total, [steps])
    assert summary["epochs"] == round(total * per_step / min(rows), 4)
