"""Model FLOPs per token against hand counts and the matmuls of real models, the peak table, and MFU
in the records, the summary and the display (the GPU path with a fake peak)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    GPT2Config,
    GPTNeoXConfig,
    Lfm2Config,
    LlamaConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
)
from transformers.pytorch_utils import Conv1D

from sft_cluster.console import ProgressDisplay
from sft_cluster.tracking.summary import steady_mean
from sft_cluster.train import callbacks
from sft_cluster.train.callbacks import ProgressCallback
from sft_cluster.train.flops import flops_per_token, peak_flops

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}


def test_llama_3_2_1b_by_hand():
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    q_o = 2 * 2048 * 32 * 64  # 32 query heads of 64
    k_v = 2 * 2048 * 8 * 64  # 8 KV heads of 64
    mlp = 3 * 2048 * 8192  # gate, up, down
    lm_head = 2048 * 128256  # tied to the embeddings, a matmul all the same
    weights = 16 * (q_o + k_v + mlp) + lm_head
    assert weights == 1_235_746_816  # Llama-3.2-1B's 1,235,814,400 parameters less its 33 norms of 2048
    attention = 12 * 16 * 32 * 64 * 4096
    assert flops_per_token(config, 4096) == 6 * weights + attention == 9_025_093_632
    # What bench/gpu.py counted before (6 x parameters less the embedding: no LM head, norms in).
    assert flops_per_token(config, 4096) / (6 * (1_235_814_400 - 2048 * 128256) + attention) == pytest.approx(
        1.2115, abs=1e-4
    )


def test_small_tied_config_by_hand():
    config = LlamaConfig(
        **SMALL, intermediate_size=128, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True
    )
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q, o; k, v (2 KV heads of 16); gate, up, down
    assert flops_per_token(config, 256) == 6 * (2 * per_layer + 64 * 100) + 12 * 2 * 4 * 16 * 256 == 873_984


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True),
        Qwen2Config(**SMALL, intermediate_size=96, num_key_value_heads=1, tie_word_embeddings=False),
        Phi3Config(
            **SMALL, intermediate_size=128, num_key_value_heads=2, pad_token_id=0
        ),  # fused qkv, gate_up
        GPTNeoXConfig(**SMALL, intermediate_size=256),  # ungated, fused qkv
        GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100),  # ungated, Conv1D, n_inner None
    ],
    ids=lambda config: config.model_type,
)
def test_the_formula_counts_every_matmul_of_the_model(config):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Each module once: a tied LM head is a module of its own sharing the embedding's weight.
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear | Conv1D))
    attention = 12 * 2 * 4 * 16 * 128
    assert flops_per_token(config, 128) == 6 * weights + attention


def test_a_multimodal_config_is_counted_by_its_text_model():
    text = {**SMALL, "intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 32}
    config = Gemma3Config(text_config=text)
    assert flops_per_token(config, 64) == flops_per_token(config.get_text_config(), 64)
    assert flops_per_token(config, 64) == 6 * (2 * (2 * 64 * 128 + 2 * 64 * 64 + 3 * 64 * 128) + 64 * 100) + (
        12 * 2 * 4 * 32 * 64
    )


def test_experts_and_non_attention_layers_are_not_counted():
    assert flops_per_token(MixtralConfig(), 4096) is None
    assert flops_per_token(Lfm2Config(full_attn_idxs=[2, 5]), 4096) is None  # convolution layers besides


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 495e12),  # TF32
        ("NVIDIA H100 PCIe", "fp16", 756e12),
        ("NVIDIA H100 NVL", "bf16", 835e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA GH200 480GB", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100 80GB PCIe", "fp32", 156e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("Tesla V100-SXM2-16GB", "fp16", None),
        ("cpu", "fp32", None),
    ],
)
def test_peaks_of_known_devices(name, precision, peak):
    assert peak_flops(name, precision) == peak


class ListSink:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


def _records(monkeypatch, **kwargs) -> list[dict]:
    """Three logs, 2 s apart, of a 2-rank run that trains 8,000 tokens per log over both ranks."""
    sink = ListSink()
    progress = ProgressCallback(None, sink, max_steps=3, world_size=2, **kwargs)
    for step in (1, 2, 3):
        monkeypatch.setattr(callbacks.time, "time", lambda step=step: 100.0 + 2 * step)
        state = SimpleNamespace(is_world_process_zero=True, global_step=step)
        progress.on_log(None, state, None, logs={"loss": 1.0, "num_tokens": 8000.0 * step})
    return [event for event in sink.events if event["kind"] == "step"]


def test_records_carry_mfu_with_a_known_peak(monkeypatch):
    records = _records(monkeypatch, flops_per_token=9e9, peak_flops=989e12)
    assert records[0]["tokens_per_second_per_device"] is None and records[0]["mfu"] is None
    assert records[-1]["tokens_per_second"] == 4000.0
    assert records[-1]["tokens_per_second_per_device"] == 2000.0
    assert records[-1]["mfu"] == pytest.approx(9e9 * 2000.0 / 989e12)


def test_records_on_cpu_have_no_mfu(monkeypatch):
    for kwargs in (
        {"flops_per_token": 9e9, "peak_flops": None},
        {"flops_per_token": None, "peak_flops": 989e12},
    ):
        records = _records(monkeypatch, **kwargs)
        assert all("mfu" not in r for r in records)
        assert records[-1]["tokens_per_second_per_device"] == 2000.0


def test_summary_means_skip_the_first_tenth_of_the_steps():
    records = [{"step": s, "mfu": 0.1 if s <= 2 else 0.4} for s in range(1, 21)]
    assert steady_mean(records, "mfu") == pytest.approx(0.4)  # steps 1-2 (10% of 20) left out
    assert steady_mean(records, "tokens_per_second_per_device") is None
    assert steady_mean([], "mfu") is None


def test_the_display_shows_mfu_where_the_record_has_it():
    console = Console(record=True, force_terminal=False, width=120)
    with ProgressDisplay(console, 10, log_every_seconds=0) as display:
        display.handle(
            [{"kind": "step", "step": 2, "loss": 1.5, "tokens_per_second": 4000.0, "mfu": 0.41234}]
        )
        display.handle([{"kind": "step", "step": 3, "loss": 1.5, "tokens_per_second": 4000.0}])
    lines = console.export_text().splitlines()
    assert lines[0].endswith("loss 1.5000  4,000 tok/s  MFU 41.2%")
    assert lines[1].endswith("loss 1.5000  4,000 tok/s")
