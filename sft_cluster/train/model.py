"""Tokenizer and model from the job's ``model`` section."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sft_cluster.spec import ModelSpec, resolve_builtin


def _resolve(name: str) -> str:
    return resolve_builtin(name) if name.startswith("builtin:") else name


def load_tokenizer(model: ModelSpec) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        _resolve(model.tokenizer or model.name_or_path), trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(model: ModelSpec, seed: int) -> transformers.PreTrainedModel:
    """Load weights, or initialise them from the config with ``seed`` (same on every rank).

    Weights are fp32 (the master copy); mixed precision autocasts the compute.
    """
    dtype = torch.float32
    path = _resolve(model.name_or_path)
    common = {"trust_remote_code": model.trust_remote_code}
    if model.from_config:
        config = AutoConfig.from_pretrained(path, **common)
        config._attn_implementation = model.attn_implementation
        transformers.set_seed(seed)
        built = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        built = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=model.attn_implementation, **common
        )
    # Packed rows carry position ids; without a KV cache transformers keeps
    # attention inside each packed sequence.
    built.config.use_cache = False
    return built
