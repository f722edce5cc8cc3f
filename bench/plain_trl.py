"""Baseline for bench/overhead.py: the smoke job as a plain TRL script.

Run under ``torchrun --nproc_per_node 2``. Same tokenizer, model config, seed,
data, batch and steps as ``jobs/smoke.yaml``; no sft-cluster code in the loop.
Writes one JSON line per step (time, tokens) to the file given as argv[1].
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist
import transformers
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

ASSETS = Path(__file__).resolve().parents[1] / "sft_cluster" / "assets"


class Timeline(TrainerCallback):
    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            with open(self.path, "a") as handle:
                record = {"step": state.global_step, "time": time.time(), "tokens": logs["num_tokens"]}
                handle.write(json.dumps(record) + "\n")


def main() -> None:
    max_steps = int(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    rows = [json.loads(line) for line in (ASSETS / "smoke-chat.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    args = SFTConfig(
        output_dir="/tmp/plain-trl-bench",
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        seed=42,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        max_length=256,
        packing=True,
        assistant_only_loss=True,
    )
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    transformers.set_seed(42)
    model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Timeline(sys.argv[1])],
    )
    trainer.train()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
