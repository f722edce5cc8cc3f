"""``tracking: [mlflow, wandb]`` on a real run (the smoke job under torchrun, 2 CPU ranks) and its
resume: both trackers hold exactly what ``metrics.jsonl`` holds, per step, with the run's config,
and the resume continues the same MLflow run and W&B run. MLflow writes to a file store, W&B
offline, both under the test's folder (tests/fixtures/trackers.py reads them back)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import REPO, run_torchrun
from tests.fixtures.trackers import last_per_step, mlflow_history, tracker_environment, wandb_runs

SMOKE = REPO / "jobs" / "smoke.yaml"
STEPS = 12
JOB = [
    f"train.max_steps={STEPS}",
    "checkpoint.every_n_steps=6",
    "train.eval_every_n_steps=6",
    "tracking=[mlflow, wandb]",
]


def _metrics(run: Path) -> dict[int, dict]:
    """metrics.jsonl's values by step, as a tracker gets them: numbers (or None), the step the x axis."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        r.pop("step"): {k: v for k, v in r.items() if v is None or isinstance(v, float | int)}
        for r in records
    }


def test_trackers_get_what_metrics_jsonl_gets_and_a_resume_continues_their_runs(
    tmp_path, isolated_env, monkeypatch
):
    out, trackers = tmp_path / "run", tmp_path / "trackers"
    env = {**isolated_env, **tracker_environment(trackers)}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the store back
    first = run_torchrun(SMOKE, env, *JOB, f"output_uri={out}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ids = json.loads((out / "trackers.json").read_text())
    # The last step was logged but its commit lost (as if killed right before): the restart resumes
    # at step 6, cuts metrics.jsonl back to it and logs steps 7-12 again.
    (out / "checkpoints" / f"step-{STEPS:08d}" / "COMMITTED").unlink()
    shutil.rmtree(out / "final")
    second = run_torchrun(SMOKE, env, *JOB, f"output_uri={out}")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "tracking:" not in first.stderr + second.stderr  # no tracker failed
    assert json.loads((out / "trackers.json").read_text()) == ids
    expected = _metrics(out)
    assert sorted(expected) == list(range(1, STEPS + 1)) and "eval_loss" in expected[6]
    keys = {key for values in expected.values() for key in values}

    from mlflow import MlflowClient

    history = mlflow_history(env["MLFLOW_TRACKING_URI"], ids["mlflow"]["run_id"])
    assert history == expected
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (experiment,) = [e for e in client.search_experiments() if e.name == "sftc-test"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["model.name_or_path"] == "builtin:tiny-llama"
    assert float(run.data.params["train.learning_rate"]) == 1.0e-3
    assert len(client.get_metric_history(run.info.run_id, "loss")) == STEPS + 6  # 7-12 twice

    (wandb_run,) = wandb_runs(trackers).values()
    assert wandb_run.run_id == ids["wandb"]["run_id"] and wandb_run.starts == 2
    assert wandb_run.exit_codes == [0, 0]
    assert last_per_step(wandb_run.history, keys) == expected
    assert wandb_run.config["model.name_or_path"] == "builtin:tiny-llama"
    assert wandb_run.config["train.learning_rate"] == 1.0e-3
