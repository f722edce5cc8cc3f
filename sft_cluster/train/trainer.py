"""The Trainer a rank trains with: its arguments from the job, the stream fed as it is, and the
data cursor as of the Trainer's steps."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.stream import PackedDataset
from sft_cluster.spec import JobSpec
from sft_cluster.train import compat
from sft_cluster.train.checkpointing import CommitCallback
from sft_cluster.train.snapshot import DeferredWrites
from sft_cluster.train.strategy import StrategyPlan


def sft_config(
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
        save_strategy="steps",  # every save_steps, set with max_steps by set_steps
        report_to=[t for t in job.tracking if t == "tensorboard"],  # MLflow, W&B: tracking.trackers
        disable_tqdm=True,
        log_level="warning",
        # Without use_cpu a CPU rank trains alone even inside a process group.
        use_cpu=not on_gpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        ddp_timeout=int(job.watchdog.collective_timeout_s),  # the hang watchdog fires first
        # Rows come packed and labelled from our stream (sft_cluster.data.stream).
        dataset_kwargs={"skip_prepare_dataset": True},
        # Resume restores the stream's own cursor; HF's batch skip would skip on top of it.
        ignore_data_skip=True,
    )


def set_steps(args: SFTConfig, job: JobSpec, max_steps: int) -> None:
    """The run's step count, once known: ``train.epochs`` is counted over the plan, which every rank
    gets over the process group that the SFTConfig sets up. The Trainer reads both fields only in
    ``train()``, where ``max_steps`` sizes the learning-rate schedule (and DeepSpeed's)."""
    args.max_steps = max_steps
    # Without every_n_steps only the final step is saved (and preemption saves); with auto,
    # sft_cluster.train.interval asks for the others.
    every = job.checkpoint.every_n_steps
    args.save_steps = every if isinstance(every, int) else max_steps


class StreamingSFTTrainer(compat.DeferredCheckpointWrites, compat.StopAtMaxSteps, SFTTrainer):
    """Feeds this rank's packed rows as they are: no re-tokenizing, no re-sharding, no batch skipping.

    The stream is already this rank's share (the plan split it) and restarts
    from its own cursor, so accelerate's dataloader wrapping (which would
    dispatch or shard it again) and the Trainer's skip on resume stay out.
    With async uploads, a checkpoint's weights and optimizer state are written
    after the step, by the commit callback's upload thread.
    """

    def deferred_writes(self) -> DeferredWrites | None:
        committer = next((c for c in self.callback_handler.callbacks if isinstance(c, CommitCallback)), None)
        return committer.defer_writes() if committer is not None else None

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=0,
            generator=compat.loader_generator(self.args.seed),
        )


def streaming_trainer(
    model: Any,
    args: SFTConfig,
    dataset: PackedDataset,
    collator: Any,
    encoder: ChatEncoder,
    strategy: StrategyPlan,
    callbacks: list[TrainerCallback],
) -> StreamingSFTTrainer:
    """The Trainer over ``dataset`` (with LoRA when the strategy has it)."""
    trainer = StreamingSFTTrainer(
        model=model,
        args=args,
        train_dataset=compat.placeholder_dataset(),
        data_collator=collator,
        processing_class=encoder.tokenizer,
        callbacks=callbacks,
        peft_config=LoraConfig(**strategy.lora) if strategy.lora else None,
    )
    trainer.train_dataset = dataset
    return trainer


class StepCursor(TrainerCallback):
    """This rank's data cursor as of the Trainer's last step: the Stateful the commit callback saves.

    The DataLoader reads ahead of the optimizer, so the stream itself may be
    past the step; the cursor saved at step N is the stream's
    ``state_after((N - base_step) x micro_batch_size x grad_accum_steps)``, the
    rows N steps consumed since the plan began (a re-planned one at ``base_step``).
    It learns the step as one of the Trainer's callbacks (every ``on_step_end``
    comes before that step's ``on_save``), and lets the stream forget the windows
    before it then, so the stream keeps only the rows in flight; loading a state
    restarts the stream there.
    """

    def __init__(self, dataset: PackedDataset, rows_per_step: int, base_step: int = 0):
        self.dataset = dataset
        self.rows_per_step = rows_per_step
        self.base_step = base_step
        self.step: int | None = None

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.step = state.global_step
        self.dataset.forget(self._rows())

    def _rows(self) -> int:
        if self.step is None:
            raise RuntimeError("StepCursor saved before any step: it must be one of the Trainer's callbacks")
        return (self.step - self.base_step) * self.rows_per_step

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_after(self._rows())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state_dict)
