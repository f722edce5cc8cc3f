"""The per-worker program: the same function under Ray Train and under torchrun.

It knows nothing about the launcher: distributed state comes from the
standard environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) or from a process
group the launcher already created.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import LoraConfig
from torch.utils.data import DataLoader
from trl import SFTConfig, SFTTrainer

from sft_cluster import storage
from sft_cluster.checkpoint import CheckpointStore
from sft_cluster.data import DataError, ShardPlan, list_sources, make_plan
from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.evalset import eval_batches, eval_data, train_filter
from sft_cluster.data.stream import PackedDataset, collate_rows
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import JsonlLog, run_dir_of
from sft_cluster.train import collectives, signals, staging
from sft_cluster.train.callbacks import ProgressCallback
from sft_cluster.train.checkpointing import CommitCallback, fetch_checkpoint, find_resume_step
from sft_cluster.train.dataplan import cursor_file, read_cursor
from sft_cluster.train.evaluation import EvalCallback
from sft_cluster.train.model import build_model, load_chat, save_final_model
from sft_cluster.train.progress import LogSink, ProgressSink
from sft_cluster.train.report import RecordingCollator, worker_report
from sft_cluster.train.runstart import (
    RunComplete,
    RunRefused,
    claim_run,
    cursor_settings,
    template_fingerprint,
)
from sft_cluster.train.steps import TrainSteps, resolve_steps
from sft_cluster.train.strategy import (
    StrategyPlan,
    bf16_capable,
    gpu_worker,
    plan_strategy,
    prepare_process,
    prepare_trainer,
    resolve_precision,
)


def _sft_config(
    job: JobSpec, output_dir: str, precision: str, on_gpu: bool, strategy: StrategyPlan
) -> SFTConfig:
    train = job.train
    return SFTConfig(
        **strategy.trainer_args,
        output_dir=output_dir,
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        logging_steps=train.logging_steps,
        save_strategy="steps",  # every save_steps, set with max_steps by _set_steps
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


def _set_steps(args: SFTConfig, job: JobSpec, max_steps: int) -> None:
    """The run's step count, once known: ``train.epochs`` is counted after the claim, which needs the
    process group that the SFTConfig sets up. The Trainer reads both fields only in ``train()``, where
    ``max_steps`` sizes the learning-rate schedule (and DeepSpeed's)."""
    args.max_steps = max_steps
    # Without every_n_steps only the final step is saved (and preemption saves).
    args.save_steps = job.checkpoint.every_n_steps or max_steps


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

    def _run_epoch(self, *args, **kwargs):
        # Resumed at its last step (final/ missing): nothing is left to train; HF would run one more.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)


def _plan_from_rank0(rank: int, make: Callable[[], ShardPlan]) -> ShardPlan:
    """Rank 0 lists and plans (once for the world); every rank gets the same plan."""
    return ShardPlan.from_json(collectives.broadcast_from_rank0(make().to_json() if rank == 0 else None))


_OUTCOMES = {"refused": RunRefused, "complete": RunComplete, "data": DataError}


def _claimed_plan(job: JobSpec, rank: int, world_size: int, claim: bool, sink: ProgressSink) -> ShardPlan:
    """The run's plan. ``claim``: no driver claimed the run (torchrun), so rank 0 does it here;
    a refusal reaches every rank, which raises it too."""
    outcome: tuple[str, str] | None = None
    if rank == 0:
        run = run_dir_of(job)
        try:
            if claim:
                notify = lambda message: sink.emit({"kind": "notice", "message": message})  # noqa: E731
                # torchrun's GROUP_WORLD_SIZE: how many nodes (agents) run this job's ranks.
                nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
                plan = claim_run(job, world_size, notify, nodes=nodes).plan
            else:
                plan = ShardPlan.from_json(storage.read_text(run.plan, run.options))
            outcome = ("plan", plan.to_json())
        except (RunRefused, RunComplete, DataError) as exc:
            kind = next(k for k, cls in _OUTCOMES.items() if isinstance(exc, cls))
            outcome = (kind, str(exc))
    kind, text = collectives.broadcast_from_rank0(outcome)
    if kind != "plan":
        raise _OUTCOMES[kind](text)
    return ShardPlan.from_json(text)


def _eval_callback(
    job: JobSpec, rank: int, world_size: int, data_plan: ShardPlan, encoder: ChatEncoder
) -> EvalCallback:
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
        return eval_batches(plan, rank, data, job.storage, encoder, job.train.micro_batch_size)

    run = run_dir_of(job)

    def record(event: dict[str, Any]) -> None:
        if rank == 0:
            events = JsonlLog(run.events, run.options)
            events.append(event)
            events.close()

    return EvalCallback(batches, job.train.eval_every_n_steps, on_event=record)


def run_worker(
    job: JobSpec, sink: ProgressSink | None = None, verify_fast: bool = False, make_plan: bool = True
) -> dict[str, Any]:
    """Train ``job`` on this rank, resuming from the newest committed checkpoint of the run.

    Rank 0 writes metrics, events and the final model. Returns this rank's
    report; ``report["preempted"]`` is true when a stop request ended training
    early, right after a committed checkpoint. ``make_plan=False``: a driver
    already claimed the run and wrote its data plan. Raises RunRefused or
    RunComplete (on every rank) when rank 0's claim says so.
    """
    started = time.time()
    signals.install(job.checkpoint.preemption_signals)  # a no-op off the main thread
    staging.sweep()  # folders of attempts that were killed on this node
    with staging.staging(f"{job.name}-rank{collectives.rank_and_world()[0]}") as stage:
        return _train(job, sink or LogSink(), verify_fast, make_plan, stage, started)


def _say_template_choices(job: JobSpec, encoder: ChatEncoder, model, sink: ProgressSink) -> None:
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
        sink.emit({"kind": "notice", "message": message})


def _resume_point(
    store: CheckpointStore, rank: int, verify_fast: bool, sink: ProgressSink
) -> tuple[int | None, Path | None]:
    """(step, folder) of the newest verified commit of this run, fetched for this rank; or Nones."""
    found = find_resume_step(
        store, rank, fast=verify_fast, on_skip=lambda m: sink.emit({"kind": "notice", "message": m})
    )
    if found is None:
        return None, None
    step, token = found
    folder, fetched = fetch_checkpoint(store, step, token, rank)
    if fetched is not None:
        sizes = store.read_manifest(step).files
        size = sum(int(sizes[rel]["size"]) for rel in fetched)
        sink.emit(
            {
                "kind": "notice",
                "message": f"rank {rank} fetched {len(fetched)} files ({size:,} bytes) of step {step}",
            }
        )
    return step, folder


def _train(
    job: JobSpec, sink: ProgressSink, verify_fast: bool, make_plan: bool, stage: Path, started: float
) -> dict[str, Any]:
    rank, _ = collectives.rank_and_world()
    on_gpu = gpu_worker(job)
    precision = resolve_precision(job, on_gpu and bf16_capable())
    run = run_dir_of(job)
    if rank == 0 and "tensorboard" in job.tracking:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(stage / "tensorboard")

    encoder = load_chat(job)
    strategy = plan_strategy(job, collectives.rank_and_world()[1], precision, on_gpu)
    prepare_process(strategy, on_gpu)
    args = _sft_config(job, str(stage / "trainer"), precision, on_gpu, strategy)
    _ = args.device  # sets up the distributed state
    prepare_trainer(strategy, on_gpu)
    rank, world_size = collectives.rank_and_world()
    data_plan = _claimed_plan(job, rank, world_size, make_plan, sink)
    # train.epochs: every rank counts its share of the plan (saved for restarts), before the model is built.
    steps = resolve_steps(
        job,
        data_plan,
        encoder,
        cursor_settings(job, template_fingerprint(encoder.template)),
        notify=lambda message: sink.emit({"kind": "notice", "message": message}),
    )
    _set_steps(args, job, steps.max_steps)
    # After the SFTConfig: under ZeRO-3 the model is partitioned as it is built.
    model = build_model(job.model, job.train.seed, len(encoder.tokenizer))
    if rank == 0:
        _say_template_choices(job, encoder, model, sink)
    if rank == 0:
        run.write_json(run.strategy, strategy.record())
    store = CheckpointStore(run.uri, run.options)
    # Whatever checkpoint.resume says: the claim refused other runs' commits, so these are ours.
    resume_step, resume_dir = _resume_point(store, rank, verify_fast, sink)
    try:
        return _fit(
            job,
            sink,
            args,
            model,
            encoder,
            strategy,
            data_plan,
            steps,
            store,
            resume_step,
            resume_dir,
            stage,
            started,
            verify_fast,
        )
    finally:
        if resume_dir is not None and resume_dir.name.startswith(staging.PREFIX):
            shutil.rmtree(resume_dir, ignore_errors=True)


def _fit(
    job: JobSpec,
    sink: ProgressSink,
    args: SFTConfig,
    model,
    encoder: ChatEncoder,
    strategy: StrategyPlan,
    data_plan: ShardPlan,
    steps: TrainSteps,
    store: CheckpointStore,
    resume_step: int | None,
    resume_dir: Path | None,
    stage: Path,
    started: float,
    verify_fast: bool,
) -> dict[str, Any]:
    rank, world_size = collectives.rank_and_world()
    run = run_dir_of(job)
    cursor = read_cursor(resume_dir, rank) if resume_dir is not None else None
    train_dataset = PackedDataset(
        data_plan, rank, job.data, job.storage, encoder, state=cursor, keep=train_filter(job.data)
    )
    rows_per_step = job.train.micro_batch_size * job.train.grad_accum_steps

    def save_cursor(checkpoint: Path, step: int) -> None:
        path = checkpoint / cursor_file(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(train_dataset.state_after(step * rows_per_step)))

    metrics = JsonlLog(run.metrics, run.options) if rank == 0 else None
    if metrics is not None:
        # Steps past the resumed one (all of them on a fresh start) are trained, and logged, again.
        metrics.truncate_after(resume_step or 0)
        if resume_step is not None:
            events = JsonlLog(run.events, run.options)
            events.append({"event": "resumed", "step": resume_step, "time": time.time()})
            events.close()
    evaluator = None
    if job.train.eval_every_n_steps:
        evaluator = _eval_callback(job, rank, world_size, data_plan, encoder)
    progress = ProgressCallback(
        metrics,
        sink,
        steps.max_steps,
        eval_loss=lambda: evaluator.latest if evaluator else None,
        epoch_of=steps.epoch,
    )
    committer = CommitCallback(
        store,
        job.checkpoint,
        rank,
        world_size,
        on_commit=lambda step: sink.emit({"kind": "checkpoint", "step": step}),
        stage_extra=save_cursor,
        # Metrics are durable at least up to every commit, also on object storage.
        before_commit=(lambda step: metrics.sync()) if metrics is not None else None,
        metadata={"cursor_settings": cursor_settings(job, template_fingerprint(encoder.template))},
        verify_fast=verify_fast,
    )
    recorder = RecordingCollator(collate_rows)
    trainer = _StreamingSFTTrainer(
        model=model,
        args=args,
        # TRL accepts only `datasets` types (and peeks at a sample): the stream goes in below.
        train_dataset=datasets.Dataset.from_list([{"input_ids": [0], "labels": [-100]}]),
        data_collator=recorder,
        processing_class=encoder.tokenizer,
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
        final_local = stage / "final"
        save_final_model(trainer, job, encoder, final_local)
        if trainer.accelerator.is_main_process:
            storage.upload_dir(final_local, run.final, run.options)
    if rank == 0 and "tensorboard" in job.tracking:
        storage.upload_dir(stage / "tensorboard", run.tensorboard, run.options)
    if metrics is not None:
        metrics.close()
    report = worker_report(trainer, recorder, rank, world_size, started, progress)
    report["preempted"] = preempted
    report["data"] = {
        "packing_efficiency": train_dataset.rows.packing_efficiency,
        "sources": [dataclasses.asdict(c) for c in train_dataset.rows.samples.counters],
    }
    run.write_json(run.worker_report(rank), report)
    return report
