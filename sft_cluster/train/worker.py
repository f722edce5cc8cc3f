"""The per-worker program: the same function under Ray Train and under torchrun.

It knows nothing about the launcher: distributed state comes from the
standard environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) or from a process
group the launcher already created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.utils.data import DataLoader
from trl import SFTConfig, SFTTrainer

from sft_cluster import storage
from sft_cluster.checkpoint import CheckpointStore
from sft_cluster.data import ShardPlan, list_sources, make_plan
from sft_cluster.data.evalset import eval_batches, eval_data, train_filter
from sft_cluster.data.stream import PackedDataset, collate_rows
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import JsonlLog, run_dir_of
from sft_cluster.train import signals
from sft_cluster.train.callbacks import ProgressCallback
from sft_cluster.train.checkpointing import CommitCallback, find_resume_step
from sft_cluster.train.dataplan import cursor_file, ensure_plan, read_cursor
from sft_cluster.train.evaluation import EvalCallback
from sft_cluster.train.model import build_model, load_tokenizer, parameter_share, save_final_model
from sft_cluster.train.progress import LogSink, ProgressSink
from sft_cluster.train.strategy import (
    StrategyPlan,
    plan_strategy,
    prepare_process,
    prepare_trainer,
    resolve_precision,
)


class _RecordingCollator:
    """Wraps the collator to fingerprint every row this rank trains on."""

    def __init__(self, inner):
        self.inner = inner
        self.row_digests: list[str] = []

    def __call__(self, features):
        for row in features:
            digest = hashlib.sha1(row["input_ids"].numpy().tobytes()).hexdigest()[:16]
            self.row_digests.append(digest)
        return self.inner(features)


def _sft_config(
    job: JobSpec, output_dir: str, precision: str, on_gpu: bool, strategy: StrategyPlan
) -> SFTConfig:
    train = job.train
    return SFTConfig(
        **strategy.trainer_args,
        output_dir=output_dir,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        logging_steps=train.logging_steps,
        # Without every_n_steps only the final step is saved (and preemption saves).
        save_strategy="steps",
        save_steps=job.checkpoint.every_n_steps or train.max_steps,
        report_to=list(job.tracking),
        disable_tqdm=True,
        log_level="warning",
        # Without use_cpu a CPU rank trains alone even inside a process group.
        use_cpu=not on_gpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        # Rows come packed and labelled from our stream (sft_cluster.data.stream).
        dataset_kwargs={"skip_prepare_dataset": True},
        # Resume restores the stream's own cursor; HF's batch skip would skip on top of it.
        ignore_data_skip=True,
    )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _StreamingSFTTrainer(SFTTrainer):
    """Feeds this rank's packed rows as they are: no re-tokenizing, no re-sharding, no batch skipping.

    The stream is already this rank's share (the plan split it) and restarts
    from its own cursor, so accelerate's dataloader wrapping (which would
    dispatch or shard it again) and the Trainer's skip on resume stay out.
    """

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=0,
            # Its own generator: creating the iterator must not draw from the restored global RNG.
            generator=torch.Generator().manual_seed(self.args.seed),
        )


def _plan_from_rank0(rank: int, make: Callable[[], ShardPlan]) -> ShardPlan:
    """Rank 0 lists and plans (once for the world); every rank gets the same plan."""
    text = [make().to_json() if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(text, src=0)
    return ShardPlan.from_json(text[0])


def _training_plan(job: JobSpec, world_size: int, make: bool, sink: ProgressSink) -> ShardPlan:
    """The run's saved plan, or (when no driver made one) a new one."""
    if make:
        return ensure_plan(job, world_size, lambda message: sink.emit({"kind": "notice", "message": message}))
    run = run_dir_of(job)
    return ShardPlan.from_json(storage.read_text(run.plan, run.options))


def _eval_callback(job: JobSpec, rank: int, world_size: int, data_plan: ShardPlan, tokenizer) -> EvalCallback:
    """Evaluation on ``data.eval`` (planned at the first evaluation) or the held-out training records."""
    data = job.data

    def batches() -> list[dict[str, torch.Tensor]]:
        plan = data_plan
        if data.eval:
            held_out = eval_data(data)
            plan = _plan_from_rank0(
                rank,
                lambda: make_plan(held_out, list_sources(held_out, job.storage), world_size, job.train.seed),
            )
        return eval_batches(plan, rank, data, job.storage, tokenizer, job.train.micro_batch_size)

    return EvalCallback(batches, job.train.eval_every_n_steps)


def run_worker(
    job: JobSpec, sink: ProgressSink | None = None, verify_fast: bool = False, make_plan: bool = True
) -> dict[str, Any]:
    """Train ``job`` on this rank, resuming from the newest committed checkpoint.

    Rank 0 writes metrics, events and the final model. Returns this rank's
    report; ``report["preempted"]`` is true when a stop request ended training
    early, right after a committed checkpoint. ``make_plan=False``: a driver
    already wrote the run's data plan.
    """
    started = time.time()
    sink = sink or LogSink()
    signals.install(job.checkpoint.preemption_signals)  # a no-op off the main thread
    rank, _ = _world()
    on_gpu = job.resources.gpus_per_worker > 0 and torch.cuda.is_available()
    precision = resolve_precision(job, on_gpu and torch.cuda.is_bf16_supported())
    run = run_dir_of(job)
    staging = Path(tempfile.mkdtemp(prefix=f"sftc-{job.name}-rank{rank}-"))
    if rank == 0 and "tensorboard" in job.tracking:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(staging / "tensorboard")

    tokenizer = load_tokenizer(job.model)
    strategy = plan_strategy(job, _world()[1], precision, on_gpu)
    prepare_process(strategy, on_gpu)
    args = _sft_config(job, str(staging / "trainer"), precision, on_gpu, strategy)
    _ = args.device  # sets up the distributed state
    prepare_trainer(strategy, on_gpu)
    # After the SFTConfig: under ZeRO-3 the model is partitioned as it is built.
    model = build_model(job.model, job.train.seed)
    rank, world_size = _world()
    if rank == 0:
        run.write_json(run.strategy, strategy.record())
    data_plan = _plan_from_rank0(rank, lambda: _training_plan(job, world_size, make_plan, sink))
    store = CheckpointStore(run.uri, run.options)
    resume_step = resume_dir = cursor = None
    if job.checkpoint.resume == "auto":
        resume_step = find_resume_step(
            store, rank, fast=verify_fast, on_skip=lambda m: sink.emit({"kind": "notice", "message": m})
        )
    if resume_step is not None:
        resume_dir = store.download(resume_step, staging / "resume")
        cursor = read_cursor(resume_dir, rank)
    train_dataset = PackedDataset(
        data_plan, rank, job.data, job.storage, tokenizer, state=cursor, keep=train_filter(job.data)
    )
    rows_per_step = job.train.micro_batch_size * job.train.grad_accum_steps

    def save_cursor(checkpoint: Path, step: int) -> None:
        path = checkpoint / cursor_file(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(train_dataset.state_after(step * rows_per_step)))

    metrics = JsonlLog(run.metrics, run.options) if rank == 0 else None
    if rank == 0 and resume_step is not None:
        metrics.truncate_after(resume_step)
        events = JsonlLog(run.events, run.options)
        events.append({"event": "resumed", "step": resume_step, "time": time.time()})
        events.close()
    evaluator = None
    if job.train.eval_every_n_steps:
        evaluator = _eval_callback(job, rank, world_size, data_plan, tokenizer)
    progress = ProgressCallback(
        metrics, sink, job.train.max_steps, eval_loss=lambda: evaluator.latest if evaluator else None
    )
    committer = CommitCallback(
        store,
        job.checkpoint,
        rank,
        world_size,
        on_commit=lambda step: sink.emit({"kind": "checkpoint", "step": step}),
        stage_extra=save_cursor,
    )
    recorder = _RecordingCollator(collate_rows)
    trainer = _StreamingSFTTrainer(
        model=model,
        args=args,
        # TRL accepts only `datasets` types (and peeks at a sample): the stream goes in below.
        train_dataset=datasets.Dataset.from_list([{"input_ids": [0], "labels": [-100]}]),
        data_collator=recorder,
        processing_class=tokenizer,
        callbacks=[c for c in (evaluator, progress, committer) if c is not None],
        peft_config=LoraConfig(**strategy.lora) if strategy.lora else None,
    )
    trainer.train_dataset = train_dataset
    if evaluator is not None:
        evaluator.trainer = trainer
    sink.emit({"kind": "start", "rank": rank, "world_size": world_size, "resumed_from": resume_step})
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    committer.finish()
    preempted = committer.stopped_for_preemption
    if preempted:
        sink.emit({"kind": "preempted", "step": trainer.state.global_step})
    else:
        final_local = staging / "final"
        save_final_model(trainer, job, final_local)
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(str(final_local))
            storage.upload_dir(final_local, run.final, run.options)
    if rank == 0 and "tensorboard" in job.tracking:
        storage.upload_dir(staging / "tensorboard", run.tensorboard, run.options)
    if metrics is not None:
        metrics.close()
    report = _report(trainer, recorder, rank, world_size, started, progress)
    report["preempted"] = preempted
    report["data"] = {
        "packing_efficiency": train_dataset.rows.packing_efficiency,
        "sources": [dataclasses.asdict(c) for c in train_dataset.rows.samples.counters],
    }
    run.write_json(run.worker_report(rank), report)
    shutil.rmtree(staging, ignore_errors=True)
    return report


def _report(
    trainer,
    recorder: _RecordingCollator,
    rank: int,
    world_size: int,
    started: float,
    progress: ProgressCallback,
) -> dict[str, Any]:
    """What this rank did: topology and fingerprints, for tests and post-mortems."""
    return {
        "rank": rank,
        "world_size": world_size,
        "hostname": socket.gethostname(),
        # Slurm's node name tells fake (or containerised) nodes on one host apart.
        "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "pid": os.getpid(),
        "distributed_type": trainer.accelerator.distributed_type.value,
        "model_wrapper": type(trainer.model_wrapped).__name__,
        "model_class": type(trainer.model).__name__,
        "parameter_share": parameter_share(trainer.model),
        "device": str(trainer.args.device),
        "steps": trainer.state.global_step,
        "rows_seen": len(recorder.row_digests),
        "row_digests": recorder.row_digests,
        "started_at": started,
        "first_step_at": progress.first_step_time,
        "finished_at": time.time(),
    }
