"""The data plan across a resume, under plain torchrun: reused when the bucket changed (with a
warning), refused for another seed (the cursors belong to the plan). Another world size re-plans:
tests/unit/test_data_replan.py and test_strategies.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sft_cluster.spec import resolve_builtin
from sft_cluster.tracking.rundir import RunDir
from tests.conftest import REPO, max_weight_diff, run_torchrun

JOB = REPO / "jobs" / "smoke.yaml"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_reuses_the_plan_warns_on_a_changed_listing_and_refuses_another_seed(tmp_path, isolated_env):
    lines = Path(resolve_builtin("builtin:smoke-chat.jsonl")).read_text().splitlines(keepends=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.jsonl").write_text("".join(lines[:1000]))
    (data / "part-1.jsonl").write_text("".join(lines[1000:]))
    out = tmp_path / "run"
    overrides = [
        f"output_uri={out}",
        f"data.sources=[{{uri: '{data}/part-*.jsonl'}}]",
        "train.max_steps=20",
        "checkpoint.every_n_steps=10",
        "tracking=none",
    ]
    first = run_torchrun(JOB, isolated_env, *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    plan = (out / "plan.json").read_text()
    objects = RunDir(str(out)).load_plan().sources[0].objects
    assert [o.uri.rsplit("/", 1)[1] for o in objects] == [
        "part-0.jsonl",
        "part-1.jsonl",
    ]
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)

    # A new object arrives in the bucket; the run resumes from step 10 with its saved plan.
    (data / "part-2.jsonl").write_text("".join(lines[:50]))
    shutil.rmtree(out / "checkpoints" / "step-00000020")
    resumed = run_torchrun(JOB, isolated_env, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 object(s) added since the data plan was made, not read by this run" in resumed.stderr
    assert "part-2.jsonl" in resumed.stderr
    assert (out / "plan.json").read_text() == plan
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == [10]
    # The cursor restarted each rank exactly where step 10 left it.
    assert _losses(out) == _losses(reference)
    assert max_weight_diff(out, reference) == 0.0

    # Another seed cannot use the saved cursors: a clear error, nothing changed.
    shutil.rmtree(out / "checkpoints" / "step-00000020")
    other = run_torchrun(JOB, isolated_env, *overrides, "train.seed=7")
    assert other.returncode == 2, other.stderr[-3000:]
    assert "the run was planned with train.seed=42, not 7" in other.stderr
    assert "Traceback" not in other.stderr
    assert (out / "checkpoints" / "step-00000010" / "COMMITTED").exists()
    assert (out / "plan.json").read_text() == plan
