"""The run directory: every path in it is named here, and read or written through ``RunDir``.

Layout under ``output_uri``::

    job.yaml         the resolved job, overrides applied (what ``sft-cluster resume`` reads)
    run.json         the run that owns the directory, and what its data cursors depend on
    plan.json        the data plan every restart and resume reads (its header: sft_cluster.data.plan_files)
    plans/           every plan the run used, by id: <id>.json (header) and <id>.body (a section per rank)
    epochs.json      train.epochs: the rows of one epoch per rank, counted once for the plan
    strategy.json    the generated accelerate/DeepSpeed settings, for the record
    control/stop     a stop request (``sft-cluster stop``) the driver polls
    metrics.jsonl    one JSON object per logged step
    events.jsonl     what happened to the run: resumes (with the step), evaluations
    checkpoints/     step-NNNNNNNN/ folders, committed ones carry COMMITTED (``CheckpointStore``)
    summary.json     outcome of the run
    loss.png         the loss curve
    final/           Hugging Face model + tokenizer
    workers/         one JSON per rank: topology and what that rank saw
    hangs/           attempt-K/rank-N.txt: every rank's Python stacks when the watchdog found a hang;
                     attempt-K/node-N.json: the hang torchrun node N's watcher found
    tensorboard/     event files when ``tracking`` includes tensorboard
    trackers.json    the MLflow / W&B runs every restart and resume of the run continues
    ray-train/       Ray Train's own storage_path (Ray executor)
    slurm/           the sbatch script, its job.yaml, logs and stop requests (a local output_uri)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sft_cluster import storage
from sft_cluster.checkpoint import CheckpointStore
from sft_cluster.data.plan import ShardPlan
from sft_cluster.data.plan_files import decode
from sft_cluster.spec import JobSpec

# Set by a launcher whose restarts rerun the whole program (a requeued Slurm job, a Ray Job's
# submission id), so a restart is recognised as the same run; otherwise each start is a new run.
RUN_ID_ENV = "SFT_CLUSTER_RUN_ID"


@dataclass(frozen=True)
class RunDir:
    """A run directory at ``uri`` (any fsspec URI) with its storage options."""

    uri: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def job_yaml(self) -> str:
        return storage.join(self.uri, "job.yaml")

    @property
    def metrics(self) -> str:
        return storage.join(self.uri, "metrics.jsonl")

    @property
    def events(self) -> str:
        return storage.join(self.uri, "events.jsonl")

    @property
    def summary(self) -> str:
        return storage.join(self.uri, "summary.json")

    @property
    def loss_png(self) -> str:
        return storage.join(self.uri, "loss.png")

    @property
    def plan(self) -> str:
        """The data plan every restart and resume of the run reads (see sft_cluster.data.plan)."""
        return storage.join(self.uri, "plan.json")

    def plan_by_id(self, plan_id: str) -> str:
        """Every plan the run used, by id: a commit's cursors name theirs, which a re-plan replaced."""
        return storage.join(self.uri, "plans", f"{plan_id}.json")

    def plan_body(self, plan_id: str) -> str:
        """The sections of plan ``plan_id`` (one per rank), which its header indexes."""
        return storage.join(self.uri, "plans", f"{plan_id}.body")

    def save_plan(self, plan: ShardPlan) -> None:
        """The body, its header by id, then ``plan.json``: no header is found without its body."""
        encoded = plan.encoded
        storage.write_bytes(self.plan_body(encoded.id), encoded.body, self.options)
        storage.write_text(self.plan_by_id(encoded.id), encoded.header, self.options)
        storage.write_text(self.plan, encoded.header, self.options)

    def load_plan(self, header: str | None = None, rank: int | None = None, body: bool = True) -> ShardPlan:
        """The plan ``header`` (default: ``plan.json``'s) names: whole, ``rank``'s own view (a
        ranged read of its section), or with ``body=False`` the header alone."""
        text = storage.read_text(self.plan, self.options) if header is None else header
        plan_id = json.loads(text).get("id", "")
        uri = self.plan_body(plan_id)
        read = (lambda start, end: storage.read_range(uri, start, end, self.options)) if body else None
        return decode(text, read, rank)

    @property
    def epoch_count(self) -> str:
        """``train.epochs``: the rows each rank packs one epoch into, counted once per plan."""
        return storage.join(self.uri, "epochs.json")

    @property
    def strategy(self) -> str:
        """The generated accelerate/DeepSpeed settings, for the record."""
        return storage.join(self.uri, "strategy.json")

    @property
    def owner(self) -> str:
        """``run.json``: which run owns this directory and the settings its data cursors depend on."""
        return storage.join(self.uri, "run.json")

    @property
    def stop_request(self) -> str:
        """``control/stop``: JSON ``{"run_id": ...}``; the driver of that run checkpoints and ends."""
        return storage.join(self.uri, "control", "stop")

    @property
    def final(self) -> str:
        return storage.join(self.uri, "final")

    @property
    def tensorboard(self) -> str:
        return storage.join(self.uri, "tensorboard")

    @property
    def trackers(self) -> str:
        """``trackers.json``: the ids of the run's MLflow / W&B runs (``sft_cluster.tracking.trackers``)."""
        return storage.join(self.uri, "trackers.json")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.uri, "checkpoints")

    def checkpoint_store(self) -> CheckpointStore:
        return CheckpointStore(self.checkpoints, self.options)

    @property
    def ray_train(self) -> str:
        """Ray Train's ``storage_path``: where every node reaches the run, unlike a node's /tmp."""
        return storage.join(self.uri, "ray-train")

    @property
    def slurm(self) -> str:
        """The Slurm launcher's folder (a local output_uri): script, job YAML, logs, stop requests."""
        return storage.join(self.uri, "slurm")

    @property
    def workers(self) -> str:
        return storage.join(self.uri, "workers")

    def worker_report(self, rank: int) -> str:
        return storage.join(self.workers, f"rank-{rank:05d}.json")

    @property
    def hangs(self) -> str:
        return storage.join(self.uri, "hangs")

    def hang_stacks(self, attempt: int, rank: int) -> str:
        """Rank ``rank``'s Python stacks (py-spy) when worker group ``attempt`` hung."""
        return storage.join(self.hangs, f"attempt-{attempt}", f"rank-{rank}.txt")

    def node_hang(self, attempt: int, node_rank: int) -> str:
        """The ``hang`` event torchrun node ``node_rank``'s watcher recorded for worker group ``attempt``."""
        return storage.join(self.hangs, f"attempt-{attempt}", f"node-{node_rank}.json")

    def write_json(self, uri: str, data: dict[str, Any]) -> None:
        storage.write_text(uri, json.dumps(data, indent=2, sort_keys=True) + "\n", self.options)

    def read_json(self, uri: str) -> dict[str, Any]:
        return json.loads(storage.read_text(uri, self.options))

    def clear_worker_reports(self) -> None:
        """Reports of an earlier attempt must not speak for this one."""
        fs, path = storage.filesystem(self.workers, self.options)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def worker_reports(self) -> list[dict[str, Any]]:
        """Every rank's report, ordered by rank."""
        fs, path = storage.filesystem(self.workers, self.options)
        if not fs.exists(path):
            return []
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
        return [json.loads(fs.cat_file(p)) for p in files]


def run_dir_of(job: JobSpec) -> RunDir:
    """The run directory of ``job``, with the storage options its URI needs."""
    options = storage.storage_options_for(job.output_uri, job.storage.endpoint_url, job.storage.options)
    return RunDir(job.output_uri, options)
