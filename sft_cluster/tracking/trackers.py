"""MLflow and W&B runs fed with exactly what ``metrics.jsonl`` gets, plus the run's config.

Rank 0 opens them; a background thread talks to the services, so a slow or dead tracking
server never holds a step (MLflow's client retries for minutes). A tracker that fails is
named once and dropped: training goes on and ``metrics.jsonl`` stays the record. The tracker
runs' ids are saved in the run directory (``RunDir.trackers``), so every restart and resume
of the run continues the same MLflow run and W&B run. The steps a resume trains again are
logged again: both services keep each value with its step, and the last one logged for a
step is the one ``metrics.jsonl`` holds. mlflow and wandb are imported only when enabled.
Configuration is theirs: ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``WANDB_PROJECT``,
``WANDB_MODE``, ``WANDB_DIR``, ``WANDB_API_KEY``, ...
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from sft_cluster import storage
from sft_cluster.spec import JobSpec
from sft_cluster.spec.cluster import CREDENTIAL_VAR, redact_text
from sft_cluster.tracking.rundir import RunDir, run_dir_of

# The services we feed ourselves (tensorboard is the Trainer's), with the package that provides each.
PACKAGES = {"mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}
# How the attempt ended -> (MLflow run status, W&B exit code).
_OUTCOMES = {"completed": ("FINISHED", 0), "preempted": ("KILLED", 75), "failed": ("FAILED", 1)}
CLOSE_WAIT_S = 60.0  # the end of a run waits this long at most for the trackers to catch up


def missing_packages(job: JobSpec) -> list[str]:
    """One line per tracker in ``tracking`` whose package cannot be imported here."""
    return [
        f"tracking includes {name} but the {name} package is not installed where this run starts "
        f"(pip install {PACKAGES[name]}, or remove {name} from tracking)"
        for name in PACKAGES
        if name in job.tracking and importlib.util.find_spec(name) is None
    ]


def flat_config(job: JobSpec) -> dict[str, Any]:
    """The resolved job as ``section.key`` -> value (lists of sections by index, other lists as JSON).

    The spec refuses credentials in storage options; a key named like one is left out anyway, and a
    URL's ``user:password@`` is redacted (an ``endpoint_url``, a source's URI)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not CREDENTIAL_VAR.search(str(key)):
                    walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        else:
            value = json.dumps(value) if isinstance(value, list) else value
            flat[prefix] = redact_text(value) if isinstance(value, str) else value

    walk("", job.model_dump(mode="json"))
    return flat


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The values of a metrics record a tracker can plot: numbers, but ``step`` (the x axis). None
    (not measured, e.g. the rates of a start's first record) is NaN: a step a resume logs again
    must not keep the earlier attempt's value there."""
    return {
        key: math.nan if value is None else float(value)
        for key, value in record.items()
        if key != "step" and (value is None or isinstance(value, int | float) and not isinstance(value, bool))
    }


class _Sink(Protocol):
    @property
    def saved(self) -> dict[str, Any]: ...

    def log(self, step: int, metrics: dict[str, float], seconds: float) -> None: ...

    def close(self, outcome: str) -> None: ...


class MlflowSink:
    """One MLflow run: the config as params, every record's numbers as metrics at its step."""

    def __init__(self, job: JobSpec, config: dict[str, Any], saved: dict[str, Any] | None):
        import mlflow
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.client = mlflow.MlflowClient()
        self.uri = mlflow.get_tracking_uri()
        logged: dict[str, str] = {}
        if saved and saved.get("tracking_uri") == self.uri:
            self.run_id = saved["run_id"]
            logged = self.client.get_run(self.run_id).data.params
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or job.name
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(
                experiment_id, run_name=job.name, tags={"output_uri": redact_text(str(job.output_uri))}
            )
            self.run_id = run.info.run_id
        # MLflow params cannot change: a resume adds the keys the run lacks and keeps the first values.
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in config.items() if k not in logged]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    @property
    def saved(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        from mlflow.entities import Metric

        stamp = int(seconds * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

    def close(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, status=_OUTCOMES[outcome][0])


class WandbSink:
    """One W&B run: the config, and every record's numbers against our ``step`` (W&B's own step
    counts calls, so the steps a resume trains again are kept, not dropped as out of order)."""

    def __init__(self, job: JobSpec, config: dict[str, Any], saved: dict[str, Any] | None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or job.name,
            name=job.name,
            id=saved["run_id"] if saved else None,
            resume="allow",
            config=config,
            allow_val_change=True,
            settings=wandb.Settings(console="off"),  # our console output stays ours
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @property
    def saved(self) -> dict[str, Any]:
        return {"run_id": self.run.id, "project": self.run.project}

    def log(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        self.run.log({"step": step, **metrics})

    def close(self, outcome: str) -> None:
        if outcome == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=_OUTCOMES[outcome][1])


_SINKS: dict[str, Callable[[JobSpec, dict[str, Any], dict[str, Any] | None], _Sink]] = {
    "mlflow": MlflowSink,
    "wandb": WandbSink,
}


class Trackers:
    """Rank 0's tracker runs: ``log`` each metrics record, ``close`` with how the attempt ended.

    Neither call waits on a service, but ``close``, for at most ``CLOSE_WAIT_S``."""

    def __init__(self, job: JobSpec, names: list[str], warn: Callable[[str], None]):
        self._warn = warn
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(
            target=self._serve, args=(job, run_dir_of(job), names), name="sftc-trackers", daemon=True
        )
        self._thread.start()

    def log(self, record: dict[str, Any]) -> None:
        self._queue.put(("log", record))

    def close(self, outcome: str) -> None:
        """End the tracker runs as ``completed``, ``preempted`` or ``failed``; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(("close", outcome))
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            self._warn(f"tracking: gave up waiting for the trackers after {CLOSE_WAIT_S:.0f} s")

    def _serve(self, job: JobSpec, run: RunDir, names: list[str]) -> None:
        sinks = self._open(job, run, names)
        while True:
            kind, item = self._queue.get()
            for name, sink in list(sinks.items()):
                try:
                    if kind == "log":
                        sink.log(item.get("step", 0), numeric_metrics(item), item.get("time", 0.0))
                    else:
                        sink.close(item)
                except Exception as exc:  # a tracker never ends training
                    del sinks[name]
                    self._fail(name, exc)
            if kind == "close":
                return

    def _open(self, job: JobSpec, run: RunDir, names: list[str]) -> dict[str, _Sink]:
        """Each tracker's run: the one saved in the run directory, or a new one (then saved)."""
        saved = run.read_json(run.trackers) if storage.exists(run.trackers, run.options) else {}
        config = flat_config(job)
        sinks: dict[str, _Sink] = {}
        for name in names:
            try:
                sinks[name] = _SINKS[name](job, config, saved.get(name))
            except Exception as exc:
                self._fail(name, exc)
        ids = {**saved, **{name: sink.saved for name, sink in sinks.items()}}
        if ids != saved:
            run.write_json(run.trackers, ids)
        return sinks

    def _fail(self, name: str, exc: Exception) -> None:
        self._warn(
            f"warning: tracking: {name} failed ({type(exc).__name__}: {exc}); it gets no more of "
            "this attempt's metrics, training goes on and metrics.jsonl keeps every record"
        )


@contextmanager
def open_trackers(job: JobSpec, warn: Callable[[str], None], rank: int) -> Iterator[Trackers | None]:
    """The MLflow / W&B runs ``job.tracking`` asks for, on rank 0 (elsewhere, or asked for none:
    None). An exception ends them as failed; otherwise the caller ends them (``Trackers.close``)."""
    names = [name for name in job.tracking if name in _SINKS]
    trackers = Trackers(job, names, warn) if rank == 0 and names else None
    try:
        yield trackers
    except BaseException:
        if trackers is not None:
            trackers.close("failed")
        raise
