"""Model FLOPs per token and the dense peak of known GPUs: MFU in the run's metrics and in bench/gpu.py.

MFU = FLOPs per token x tokens/s per device / peak FLOP/s of the device.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Gated MLPs (gate, up, down) are the rule today (Llama, Mistral, Qwen, Gemma, Phi-3, ...): these
# model types have two MLP matmuls (up, down) instead.
UNGATED_MLP = frozenset(
    {"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "phi", "opt", "falcon", "starcoder2", "bloom"}
)
# Attributes through which a config declares routed experts (Mixtral, Qwen-MoE, DeepSeek, ...).
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention"})

# (fragment of torch.cuda.get_device_name(), bf16/fp16 dense, tf32 dense) FLOP/s, from the vendor
# datasheets without sparsity. The first fragment found in the name wins: specific names come first
# (a GH200 is an H200 here; "NVIDIA H100 80GB HBM3" is the SXM part).
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 NVL", 835e12, 418e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),
    ("H200 NVL", 835e12, 418e12),
    ("H200", 989e12, 495e12),
    ("B200", 2250e12, 1125e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
)


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float | None:
    """Training FLOPs (forward + backward = 3 x forward) per token of a dense decoder at ``seq_len``.

    6 x the weights of every matmul (q, k, v, o with grouped KV heads; the MLP's gate, up and
    down, or up and down for ``UNGATED_MLP``; the LM head, also when tied to the embeddings, since
    it is a matmul all the same) + 12 x layers x heads x head_dim x seq_len for attention's score
    and value matmuls: PaLM's and torchtitan's convention, which counts the whole square (no
    causal halving, sliding windows counted as full), as bench/gpu.py always has. Biases, norms and
    the embedding lookup are left out. Under LoRA the frozen weights get no weight gradient, so this
    counts more than is computed. None for mixture-of-experts and non-attention (SSM, linear
    attention) layers: not counted here, and their MFU is then left out.
    """
    text = config.get_text_config()
    if any(getattr(text, name, None) for name in EXPERT_COUNTS):
        return None
    if not ATTENTION_LAYERS.issuperset(getattr(text, "layer_types", None) or ()):
        return None
    hidden, layers, heads = text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    # GPT-2 names it n_inner, and None there means 4 x hidden.
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o: heads; k and v: kv heads
    mlp = (2 if text.model_type in UNGATED_MLP else 3) * hidden * intermediate
    weights = layers * (attention + mlp) + hidden * text.vocab_size
    return 6.0 * weights + 12.0 * layers * heads * head_dim * seq_len


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU for ``precision`` (bf16, fp16, fp32); None for others, the CPU.

    fp32 runs are held to TF32's tensor-core peak, the fastest an fp32 matmul runs on these parts
    (the worker asks only with TF32 on: with it off, torch's default, MFU is left out).
    """
    for fragment, half, tf32 in PEAKS:
        if fragment in device_name:
            return half if precision in ("bf16", "fp16") else tf32
    return None
