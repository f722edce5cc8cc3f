"""The per-worker program: the same function under Ray Train and under torchrun.

It knows nothing about the launcher: distributed state comes from the
standard environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) or from a process
group the launcher already created.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sft_cluster import storage
from sft_cluster.checkpoint import CheckpointStore
from sft_cluster.data import load_conversations
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import JsonlLog, run_dir_of
from sft_cluster.train import signals
from sft_cluster.train.callbacks import ProgressCallback
from sft_cluster.train.checkpointing import CommitCallback, find_resume_step
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
        batch = self.inner(features)
        for row in batch["input_ids"]:
            digest = hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16]
            self.row_digests.append(digest)
        return batch


def _sft_config(job: JobSpec, output_dir: str, precision: str, on_gpu: bool, plan: StrategyPlan) -> SFTConfig:
    train, data = job.train, job.data
    return SFTConfig(
        **plan.trainer_args,
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
        max_length=data.max_seq_len,
        packing=data.packing,
        assistant_only_loss=data.assistant_only_loss,
    )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_worker(job: JobSpec, sink: ProgressSink | None = None, verify_fast: bool = False) -> dict[str, Any]:
    """Train ``job`` on this rank, resuming from the newest committed checkpoint.

    Rank 0 writes metrics, events and the final model. Returns this rank's
    report; ``report["preempted"]`` is true when a stop request ended training
    early, right after a committed checkpoint.
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
    conversations = load_conversations(job.data, job.storage)
    train_dataset = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    plan = plan_strategy(job, _world()[1], precision, on_gpu)
    prepare_process(plan, on_gpu)
    args = _sft_config(job, str(staging / "trainer"), precision, on_gpu, plan)
    _ = args.device  # sets up the distributed state
    prepare_trainer(plan, on_gpu)
    # After the SFTConfig: under ZeRO-3 the model is partitioned as it is built.
    model = build_model(job.model, job.train.seed)
    rank, world_size = _world()
    if rank == 0:
        run.write_json(run.strategy, plan.record())
    store = CheckpointStore(run.uri, run.options)
    resume_step = None
    if job.checkpoint.resume == "auto":
        resume_step = find_resume_step(
            store, rank, fast=verify_fast, on_skip=lambda m: sink.emit({"kind": "notice", "message": m})
        )
    metrics = JsonlLog(run.metrics, run.options) if rank == 0 else None
    if rank == 0 and resume_step is not None:
        metrics.truncate_after(resume_step)
        events = JsonlLog(run.events, run.options)
        events.append({"event": "resumed", "step": resume_step, "time": time.time()})
        events.close()
    progress = ProgressCallback(metrics, sink, job.train.max_steps)
    committer = CommitCallback(
        store,
        job.checkpoint,
        rank,
        world_size,
        on_commit=lambda step: sink.emit({"kind": "checkpoint", "step": step}),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[progress, committer],
        peft_config=LoraConfig(**plan.lora) if plan.lora else None,
    )
    recorder = _RecordingCollator(trainer.data_collator)
    trainer.data_collator = recorder
    sink.emit({"kind": "start", "rank": rank, "world_size": world_size, "resumed_from": resume_step})

    resume_dir = None
    if resume_step is not None:
        resume_dir = str(store.download(resume_step, staging / "resume"))
    trainer.train(resume_from_checkpoint=resume_dir)
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
