"""The MLflow / W&B trackers on their real back ends (MLflow's file store, W&B offline), no training:
the record -> metric mapping, the config, a second start continuing the same runs, a dead server,
and the claim's refusal when a package is missing."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import pytest

from sft_cluster.driver.claim import RunRefused, check_trackers
from sft_cluster.spec import load_job
from sft_cluster.tracking.rundir import run_dir_of
from sft_cluster.tracking.trackers import flat_config, numeric_metrics, open_trackers
from tests.conftest import REPO
from tests.fixtures.trackers import last_per_step, mlflow_history, tracker_environment, wandb_runs

SMOKE = REPO / "jobs" / "smoke.yaml"


def _job(tmp_path: Path, *overrides: str):
    return load_job(SMOKE, [f"output_uri={tmp_path / 'run'}", *overrides])


@pytest.fixture
def trackers_env(tmp_path: Path, monkeypatch) -> dict[str, str]:
    env = tracker_environment(tmp_path / "trackers")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_config_is_flat_and_leaves_out_credentials(tmp_path):
    job = _job(
        tmp_path,
        "storage.options={api_key: hunter2, client_kwargs: {region_name: eu}}",
        "storage.endpoint_url=https://me:hunter2@s3.internal:9000",
    )
    config = flat_config(job)
    assert config["model.name_or_path"] == "builtin:tiny-llama"
    assert config["train.learning_rate"] == 1.0e-3
    assert config["data.sources.0.uri"] == "builtin:smoke-chat.jsonl"  # a list of sections: by index
    assert config["tracking"] == '["tensorboard"]'  # a list of values: JSON
    assert config["storage.options.client_kwargs.region_name"] == "eu"
    assert config["storage.endpoint_url"] == "https://<redacted>@s3.internal:9000"
    assert "hunter2" not in map(str, config.values()) and not any("api_key" in k for k in config)


def test_numbers_but_the_step_become_metrics_and_none_is_nan():
    record = {"step": 3, "loss": 1.5, "tokens": 40, "mfu": None, "note": "x", "flag": True, "time": 9.5}
    metrics = numeric_metrics(record)
    assert math.isnan(metrics.pop("mfu"))
    assert metrics == {"loss": 1.5, "tokens": 40.0, "time": 9.5}


def test_records_reach_both_trackers_and_a_second_start_continues_the_same_runs(tmp_path, trackers_env):
    job = _job(tmp_path, "tracking=[mlflow, wandb]")
    warnings: list[str] = []
    # A resume logs step 3 again; its first record has no rate yet, which must not keep the first one's.
    first = [{"step": s, "loss": 2.0 / s, "rate": 5.0, "mfu": None, "time": 100.0 + s} for s in (1, 2, 3)]
    again = [{"step": s, "loss": 1.0 / s, "rate": s, "time": 200.0 + s} for s in (3, 4)]
    again[0]["rate"] = None
    with pytest.raises(RuntimeError), open_trackers(job, warnings.append, rank=0) as trackers:
        assert trackers is not None
        for record in first:
            trackers.log(record)
        raise RuntimeError("the attempt failed")  # ends the tracker runs as failed
    with open_trackers(job, warnings.append, rank=0) as trackers:
        assert trackers is not None
        for record in again:
            trackers.log(record)
        trackers.close("preempted")
    assert warnings == []
    run = run_dir_of(job)
    ids = run.read_json(run.trackers)
    expected = {1: 2.0, 2: 1.0, 3: 1.0 / 3, 4: 0.25}  # step 3 logged twice: the second value is the last
    mlflow = mlflow_history(trackers_env["MLFLOW_TRACKING_URI"], ids["mlflow"]["run_id"])
    assert {step: values["loss"] for step, values in mlflow.items()} == expected
    assert mlflow[1]["mfu"] is None and mlflow[3]["rate"] is None and mlflow[4]["rate"] == 4
    from mlflow import MlflowClient

    logged = MlflowClient(trackers_env["MLFLOW_TRACKING_URI"]).get_run(ids["mlflow"]["run_id"])
    assert logged.info.status == "KILLED"
    assert logged.data.params["train.learning_rate"] == "0.001"
    (wandb_run,) = wandb_runs(tmp_path / "trackers").values()
    assert wandb_run.run_id == ids["wandb"]["run_id"] and wandb_run.starts == 2
    assert wandb_run.exit_codes == [1, 75]
    history = last_per_step(wandb_run.history, {"loss", "rate"})
    assert {step: values["loss"] for step, values in history.items()} == expected
    assert history[3]["rate"] is None and history[4]["rate"] == 4
    assert wandb_run.config["model.name_or_path"] == "builtin:tiny-llama"


def test_a_dead_tracking_server_is_named_once_and_training_goes_on(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    warnings: list[str] = []
    with open_trackers(_job(tmp_path, "tracking=[mlflow]"), warnings.append, rank=0) as trackers:
        assert trackers is not None
        for step in range(1, 4):
            trackers.log({"step": step, "loss": 1.0})
        trackers.close("completed")
    assert len(warnings) == 1 and "mlflow failed" in warnings[0] and "training goes on" in warnings[0]


def test_the_claim_refuses_a_tracker_whose_package_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec reports for a missing package
    check_trackers(_job(tmp_path, "tracking=[tensorboard, mlflow]"))
    with pytest.raises(RunRefused, match=r"tracking includes wandb .* \(pip install wandb, or remove wandb"):
        check_trackers(_job(tmp_path, "tracking=[wandb]"))


def test_only_rank_zero_opens_trackers_and_only_for_mlflow_or_wandb(tmp_path):
    with open_trackers(_job(tmp_path, "tracking=[mlflow, wandb]"), print, rank=1) as trackers:
        assert trackers is None
    with open_trackers(_job(tmp_path, "tracking=[tensorboard]"), print, rank=0) as trackers:
        assert trackers is None
