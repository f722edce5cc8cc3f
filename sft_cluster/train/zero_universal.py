"""Resume a DeepSpeed ZeRO-2/3 checkpoint at another world size, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer shard per data-parallel rank, and
``DeepSpeedEngine._load_zero_checkpoint`` refuses it at any other DP size
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
size is not currently supported"). ``deepspeed.checkpoint.ds_to_universal``
rewrites the shards as one file per parameter and state (fp32 master weight,
exp_avg, exp_avg_sq, step), which a config with ``checkpoint.load_universal``
re-partitions at load for any DP size. The Trainer's own resume
(``deepspeed_load_checkpoint`` calls ``engine.load_checkpoint(dir)`` with no tag)
then works as-is: with ``load_universal`` the engine reads the tag from
``latest_universal`` instead of ``latest``; the LR scheduler (``scheduler.pt``) and
``trainer_state.json`` are the Trainer's and need no change. One fix is needed: ZeRO-3's universal
load shares one Adam ``step`` tensor between parameter groups (``untie_adam_steps``).

Checked on deepspeed 0.19.8 + transformers 5.23.0, fp32 on CPU ranks (gloo).
deepspeed is imported only when a conversion runs.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

UNIVERSAL_SUFFIX = "_universal"
LATEST_UNIVERSAL = "latest_universal"


def zero_tag(checkpoint_dir: Path) -> str:
    """The ZeRO tag (``global_stepN``) of a Trainer checkpoint folder, from its ``latest`` file.

    The Trainer writes ``latest`` next to ``global_stepN/``; without it the tag is the only
    ``global_step*`` folder that is not itself a universal one.
    """
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    tags = [
        p.name
        for p in checkpoint_dir.glob("global_step*")
        if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX)
    ]
    if len(tags) != 1:
        raise FileNotFoundError(f"{checkpoint_dir}: no 'latest' file and {len(tags)} global_step* folders")
    return tags[0]


def is_universal(checkpoint_dir: Path) -> bool:
    """Whether the folder holds a finished universal copy (``latest_universal`` is written last)."""
    marker = checkpoint_dir / LATEST_UNIVERSAL
    return marker.is_file() and (checkpoint_dir / marker.read_text().strip() / "zero").is_dir()


def to_universal(checkpoint_dir: Path, workers: int = 1) -> Path:
    """Add a universal copy of the ZeRO state to a Trainer checkpoint folder, in place; returns its folder.

    Writes ``global_stepN_universal/`` (one file per parameter and state, about the size of
    the ZeRO shards plus the model-states files) and ``latest_universal`` beside the original
    ``global_stepN/``, which stays, so the folder still resumes at its own world size without
    ``load_universal``. Idempotent: an existing universal copy is kept. Runs on CPU in one
    process (``workers=1`` avoids a process pool); collective-free, so call it on one rank only.
    """
    from deepspeed.checkpoint import ds_to_universal

    checkpoint_dir = Path(checkpoint_dir)
    tag = zero_tag(checkpoint_dir)
    source = checkpoint_dir / tag
    target = checkpoint_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    if is_universal(checkpoint_dir):
        return target
    if not any(source.glob("*_optim_states.pt")):
        raise FileNotFoundError(f"{source}: no ZeRO optimizer shards (*_optim_states.pt)")
    shutil.rmtree(target, ignore_errors=True)  # a conversion cut short
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2: a plain HF model records no UNIVERSAL_CHECKPOINT_INFO (Megatron-DeepSpeed does);
        # with no tensor/pipeline parallelism the default info (version only) is all it needs.
        inject_missing_state=True,
    )
    # Writes target/ and then checkpoint_dir/latest_universal (= target.name) last.
    ds_to_universal.main(args)
    return target


def untie_adam_steps(optimizer: Any) -> int:
    """Give every parameter group's Adam state its own ``step`` tensor; returns how many were shared.

    deepspeed 0.19.8, ZeRO-3 universal load (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``):
    one ``step`` tensor read from ``optimizer_state.pt`` is assigned to every sub-group, and torch's
    Adam increments it in place once per group per step, so with the Trainer's two groups (decay /
    no decay) the bias correction runs at twice the real step. Call after the checkpoint is loaded.
    """
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate wrapper -> DeepSpeed ZeRO optimizer -> torch optimizer
        inner = inner.optimizer
    seen: set[int] = set()
    shared = 0
    for state in inner.state.values():
        step = state.get("step")
        if not hasattr(step, "clone"):
            continue
        if id(step) in seen:
            state["step"] = step.clone()
            shared += 1
        seen.add(id(state["step"]))
    return shared


class UntieAdamSteps(TrainerCallback):
    """``untie_adam_steps`` at train begin, right after the Trainer's resume loaded the checkpoint
    (transformers 5.23: ``_inner_training_loop`` loads it, then calls ``on_train_begin``)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if kwargs.get("optimizer") is not None:
            untie_adam_steps(kwargs["optimizer"])


def load_universal(trainer: Any) -> None:
    """Make the Trainer's DeepSpeed engine load the universal copy (``checkpoint.load_universal``).

    Only for this attempt: with it the engine reads ``latest_universal`` and fails without one.
    The engine is built from this dict in ``train()``, so this must run before it.
    """
    config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
    config.setdefault("checkpoint", {})["load_universal"] = True
