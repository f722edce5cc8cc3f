"""The per-worker program: the same function under Ray Train and under torchrun.

It knows nothing about the launcher: distributed state comes from the
standard environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) or from a process
group the launcher already created, and the run was prepared (claimed, its
data plan written) by the driver before any worker started. ``run_worker``
is four steps: build the components, restore the newest commit, train, finish.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig

from sft_cluster import storage
from sft_cluster.checkpoint import CheckpointStore
from sft_cluster.data import ShardPlan
from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.evalset import eval_batches, train_filter
from sft_cluster.data.stream import PackedDataset, collate_rows
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import JsonlLog, run_dir_of
from sft_cluster.tracking.trackers import Trackers, open_trackers
from sft_cluster.train import collectives, compat, flops, signals, staging, zero_universal
from sft_cluster.train.callbacks import ProgressCallback
from sft_cluster.train.checkpointing import CommitCallback, fetch_checkpoint, find_resume_step, restore_states
from sft_cluster.train.evaluation import EvalCallback
from sft_cluster.train.export import save_final_model
from sft_cluster.train.heartbeat import Heartbeat
from sft_cluster.train.interval import AutoInterval
from sft_cluster.train.model import build_model, load_chat
from sft_cluster.train.plans import eval_plan, prepared_plan
from sft_cluster.train.progress import LogSink, ProgressSink
from sft_cluster.train.report import RecordingCollator, worker_report
from sft_cluster.train.settings import DATA_CURSOR, cursor_settings, template_fingerprint
from sft_cluster.train.steps import TrainSteps, resolve_steps
from sft_cluster.train.strategy import (
    StrategyPlan,
    bf16_capable,
    builds_weights,
    gpu_worker,
    plan_strategy,
    prepare_process,
    prepare_trainer,
    resolve_precision,
)
from sft_cluster.train.trainer import (
    StepCursor,
    StreamingSFTTrainer,
    set_steps,
    sft_config,
    streaming_trainer,
)


@dataclass
class Components:
    """What one rank trains with, built before training (``build_components``)."""

    job: JobSpec
    sink: ProgressSink
    stage: Path  # this attempt's node-local staging folder
    verify_fast: bool
    rank: int
    world_size: int
    encoder: ChatEncoder
    strategy: StrategyPlan
    args: SFTConfig
    plan: ShardPlan
    steps: TrainSteps
    model: Any
    dataset: PackedDataset
    states: dict[str, StepCursor]  # saved in every checkpoint, restored at a resume
    cursor_settings: dict[str, Any]  # what the saved cursors mean something only with
    store: CheckpointStore


@dataclass
class Resume:
    """Where this attempt starts: the resumed step and its local folder (None, None: from scratch);
    ``universal``: a ZeRO checkpoint of another world size, converted to DeepSpeed's universal one."""

    step: int | None
    folder: Path | None
    universal: bool = False


@dataclass
class Training:
    """A finished ``trainer.train()`` and what the report reads from its callbacks."""

    trainer: StreamingSFTTrainer
    committer: CommitCallback
    progress: ProgressCallback
    recorder: RecordingCollator
    metrics: JsonlLog | None
    trackers: Trackers | None


def run_worker(job: JobSpec, sink: ProgressSink | None = None, verify_fast: bool = False) -> dict[str, Any]:
    """Train ``job`` on this rank, resuming from the newest committed checkpoint of the run.

    Rank 0 writes metrics, events and the final model. Returns this rank's
    report; ``report["preempted"]`` is true when a stop request ended training
    early, right after a committed checkpoint. Raises DataError (on every rank)
    when the run's data plan is missing: the driver prepares it.
    """
    started = time.time()
    signals.install(job.checkpoint.preemption_signals)  # a no-op off the main thread
    staging.sweep()  # folders of attempts that were killed on this node
    with staging.staging(f"{job.name}-rank{collectives.rank_and_world()[0]}") as stage:
        parts = build_components(job, sink or LogSink(), stage, verify_fast)
        with restore(parts) as resume, open_trackers(job, _notifier(parts.sink), parts.rank) as trackers:
            return finish(parts, train(parts, resume, trackers), started)  # finish ends the trackers


def build_components(job: JobSpec, sink: ProgressSink, stage: Path, verify_fast: bool) -> Components:
    """The process set up for training, then the plan, the step count, the model and the data stream."""
    encoder, strategy, args = _set_up_process(job, stage)
    rank, world_size = collectives.rank_and_world()
    plan = prepared_plan(job, rank)
    # train.epochs: every rank counts its share of the plan (saved for restarts), before the model is built.
    rows_per_step = job.train.micro_batch_size * job.train.grad_accum_steps
    settings = cursor_settings(job, template_fingerprint(encoder.template), rows_per_step * world_size)
    notify = _notifier(sink)
    steps = resolve_steps(job, plan, encoder, settings, notify=notify)
    set_steps(args, job, steps.max_steps)
    # After the SFTConfig: under ZeRO-3 the model is partitioned as it is built; under FSDP2 only
    # rank 0 holds weights, and preparing the model scatters them into every rank's shards.
    model = build_model(job.model, job.train.seed, len(encoder.tokenizer), builds_weights(strategy, rank))
    run = run_dir_of(job)
    if rank == 0:
        _say_template_choices(job, encoder, model, notify)
        run.write_json(run.strategy, strategy.record())
    dataset = PackedDataset(
        plan,
        rank,
        job.data,
        job.storage,
        encoder,
        keep=train_filter(job.data),
    )
    return Components(
        job=job,
        sink=sink,
        stage=stage,
        verify_fast=verify_fast,
        rank=rank,
        world_size=world_size,
        encoder=encoder,
        strategy=strategy,
        args=args,
        plan=plan,
        steps=steps,
        model=model,
        dataset=dataset,
        states={DATA_CURSOR: StepCursor(dataset, rows_per_step, plan.base_step)},
        cursor_settings=settings,
        store=run.checkpoint_store(),
    )


def _set_up_process(job: JobSpec, stage: Path) -> tuple[ChatEncoder, StrategyPlan, SFTConfig]:
    """Precision, tokenizer, strategy and the Trainer's arguments, which set up the process group."""
    rank, world_size = collectives.rank_and_world()
    collectives.set_timeout(job.watchdog.collective_timeout_s)
    on_gpu = gpu_worker(job)
    precision = resolve_precision(job, on_gpu and bf16_capable())
    if rank == 0 and "tensorboard" in job.tracking:
        compat.set_tensorboard_dir(stage / "tensorboard")
    encoder = load_chat(job)
    strategy = plan_strategy(job, world_size, precision, on_gpu)
    prepare_process(strategy, on_gpu)
    args = sft_config(job, str(stage / "trainer"), precision, on_gpu, strategy)
    compat.set_up_devices(args)
    prepare_trainer(strategy, on_gpu)
    return encoder, strategy, args


def _notifier(sink: ProgressSink) -> Callable[[str], None]:
    """How this rank tells the user something: a notice event."""
    return lambda message: sink.emit({"kind": "notice", "message": message})


def _say_template_choices(job: JobSpec, encoder: ChatEncoder, model, notify: Callable[[str], None]) -> None:
    """Tell the user, once per run start, what was changed or chosen for the chat template."""
    notices = [encoder.notice] if encoder.notice else []
    added = encoder.tokenizer.added_by_template
    if added:
        rows = model.config.get_text_config().vocab_size
        notices.append(
            f"model.chat_template = {job.model.chat_template}: added the special tokens {', '.join(added)} "
            f"to the tokenizer, and the model's embeddings now have {rows} rows"
        )
    for message in notices:
        notify(message)


@contextmanager
def restore(parts: Components) -> Iterator[Resume]:
    """The newest verified commit of the run, fetched for this rank, with this rank's states loaded
    from it; a fetched folder is removed on the way out.

    Whatever checkpoint.resume says: the driver's claim refused other runs' commits, so these are ours.
    """
    step, folder, universal = _resume_point(parts)
    # A plan re-planned at this very step starts every new rank's cursor afresh (sft_cluster.data.replan).
    replanned = bool(parts.plan.history) and step == parts.plan.base_step
    try:
        if folder is not None and not replanned:
            restore_states(folder, parts.states, parts.rank)
        yield Resume(step, folder, universal)
    finally:
        if folder is not None and folder.name.startswith(staging.PREFIX):
            shutil.rmtree(folder, ignore_errors=True)


def _resume_point(parts: Components) -> tuple[int | None, Path | None, bool]:
    """(step, folder, universal) of the newest verified commit of this run, fetched for this rank;
    or Nones. A ZeRO checkpoint of another world size is converted on each node (``universal``)."""
    store, rank, notify = parts.store, parts.rank, _notifier(parts.sink)
    found = find_resume_step(store, rank, fast=parts.verify_fast, on_skip=notify)
    if found is None:
        return None, None, False
    step, token = found
    manifest = store.read_manifest(step)
    written_by = int(manifest.metadata.get("world_size", parts.world_size))
    universal = parts.strategy.kind == "deepspeed" and written_by != parts.world_size

    def convert(folder: Path) -> None:
        started = time.monotonic()
        zero_universal.to_universal(folder)
        notify(
            f"rank {rank}: converted the ZeRO checkpoint of step {step} ({written_by} workers) to "
            f"DeepSpeed's universal one for {parts.world_size} in {time.monotonic() - started:.1f} s"
        )

    folder, fetched = fetch_checkpoint(
        store,
        step,
        token,
        rank,
        every_rank=written_by if universal else None,
        on_node=convert if universal else None,
    )
    if fetched is not None:
        size = sum(int(manifest.files[rel]["size"]) for rel in fetched)
        notify(f"rank {rank} fetched {len(fetched)} files ({size:,} bytes) of step {step}")
    return step, folder, universal


def train(parts: Components, resume: Resume, trackers: Trackers | None) -> Training:
    """Train from ``resume`` to the run's last step, or until a stop request (right after a commit);
    ``trackers`` get every metrics record."""
    job, sink, rank = parts.job, parts.sink, parts.rank
    metrics = _metrics_log(parts, resume.step, trackers)
    evaluator = _eval_callback(parts) if job.train.eval_every_n_steps else None
    beats = Heartbeat(sink, rank, evaluator) if job.watchdog.enabled else None  # last: see Heartbeat
    progress = ProgressCallback(
        metrics,
        sink,
        parts.steps.max_steps,
        eval_loss=lambda: evaluator.latest if evaluator else None,
        epoch_of=parts.steps.epoch,
        data_wait=lambda: parts.dataset.wait_s,
        world_size=parts.world_size,
        flops_per_token=flops.flops_per_token(parts.model.config, job.data.max_seq_len),
        peak_flops=_device_peak(parts.args),
    )
    committer = CommitCallback(
        parts.store,
        job.checkpoint,
        rank,
        parts.world_size,
        on_commit=lambda step: sink.emit({"kind": "checkpoint", "step": step}),
        states=parts.states,
        # Metrics are durable at least up to every commit, also on object storage.
        before_commit=(lambda step: metrics.sync()) if metrics is not None else None,
        metadata={"cursor_settings": parts.cursor_settings},
        verify_fast=parts.verify_fast,
    )
    recorder = RecordingCollator(collate_rows)
    interval = _auto_interval(parts) if job.checkpoint.every_n_steps == "auto" else None
    callbacks = [c for c in (evaluator, progress, committer, interval, beats) if c is not None]
    callbacks += list(parts.states.values())
    trainer = streaming_trainer(
        parts.model, parts.args, parts.dataset, recorder, parts.encoder, parts.strategy, callbacks
    )
    if evaluator is not None:
        evaluator.trainer = trainer
    if resume.universal:
        zero_universal.load_universal(trainer)
        trainer.add_callback(zero_universal.UntieAdamSteps())
    sink.emit({"kind": "start", "rank": rank, "world_size": parts.world_size, "resumed_from": resume.step})
    trainer.train(resume_from_checkpoint=str(resume.folder) if resume.folder else None)
    committer.finish()
    return Training(trainer, committer, progress, recorder, metrics, trackers)


def _auto_interval(parts: Components) -> AutoInterval:
    """``checkpoint.every_n_steps: auto``: warm-up is 5% of the steps (3 to 50), then one measuring save."""
    warm_up = min(50, parts.steps.max_steps // 20)
    notify = _notifier(parts.sink) if parts.rank == 0 else (lambda message: None)
    return AutoInterval(parts.job.checkpoint.mttf_hours, warm_up, notify)


def _device_peak(args: SFTConfig) -> float | None:
    """Dense peak FLOP/s of this rank's device at the precision the Trainer computes in: None on the
    CPU, and for fp32 with TF32 off (torch's default), where no tensor-core peak applies."""
    if args.device.type != "cuda":
        return None
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    if precision == "fp32" and torch.get_float32_matmul_precision() == "highest":
        return None
    return flops.peak_flops(torch.cuda.get_device_name(args.device), precision)


def _metrics_log(parts: Components, resume_step: int | None, trackers: Trackers | None) -> JsonlLog | None:
    """Rank 0's ``metrics.jsonl``, cut back to the resumed step (the steps past it are trained again),
    each record appended also sent to the ``trackers``."""
    if parts.rank != 0:
        return None
    run = run_dir_of(parts.job)
    metrics = JsonlLog(run.metrics, run.options, on_append=trackers.log if trackers is not None else None)
    lost = metrics.truncate_after(resume_step or 0)
    if resume_step is not None:
        event = {"event": "resumed", "step": resume_step, "time": time.time()}
        if lost:  # the goodput report counts them as work lost, up to the failure
            event.update(lost_steps=len(lost), failed_at=max(r["time"] for r in lost))
        _record_event(parts, event)
    return metrics


def _record_event(parts: Components, event: dict[str, Any]) -> None:
    """One line of the run's ``events.jsonl`` (rank 0 only)."""
    if parts.rank == 0:
        run = run_dir_of(parts.job)
        events = JsonlLog(run.events, run.options)
        events.append(event)
        events.close()


def _eval_callback(parts: Components) -> EvalCallback:
    """Evaluation on ``data.eval`` (planned at the first evaluation) or the held-out training records."""
    job, rank = parts.job, parts.rank
    data = job.data

    def batches() -> list[dict[str, torch.Tensor]]:
        plan = eval_plan(job, rank, parts.world_size) if data.eval else parts.plan
        return eval_batches(plan, rank, data, job.storage, parts.encoder, job.train.micro_batch_size)

    return EvalCallback(
        batches, job.train.eval_every_n_steps, on_event=lambda event: _record_event(parts, event)
    )


def finish(parts: Components, training: Training, started: float) -> dict[str, Any]:
    """Save and upload the final model (unless stopped early), upload TensorBoard logs, close the
    metrics and end the tracker runs, and write this rank's report."""
    job, rank, trainer = parts.job, parts.rank, training.trainer
    run = run_dir_of(job)
    preempted = training.committer.stopped_for_preemption
    if preempted:
        parts.sink.emit({"kind": "preempted", "step": trainer.state.global_step})
    else:
        final_local = parts.stage / "final"
        save_final_model(trainer, job, parts.encoder, final_local)
        if trainer.accelerator.is_main_process:
            storage.upload_dir(final_local, run.final, run.options)
    if rank == 0 and "tensorboard" in job.tracking:
        storage.upload_dir(parts.stage / "tensorboard", run.tensorboard, run.options)
    if training.metrics is not None:
        training.metrics.close()
    if training.trackers is not None:
        training.trackers.close("preempted" if preempted else "completed")
    report = worker_report(trainer, training.recorder, rank, parts.world_size, started, training.progress)
    report["preempted"] = preempted
    parts.dataset.close()  # the prefetch thread stops before its counters are read
    report["data"] = {
        "wait_s": round(parts.dataset.wait_s, 3),
        "packing_efficiency": parts.dataset.rows.packing_efficiency,
        "sources": [dataclasses.asdict(c) for c in parts.dataset.rows.samples.counters],
    }
    run.write_json(run.worker_report(rank), report)
    return report
