"""Tokenizer and model from the job's ``model`` section."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import is_flash_attn_2_available

from sft_cluster.data.chat import ChatEncoder
from sft_cluster.spec import JobSpec, ModelSpec, resolve_builtin
from sft_cluster.spec.templates import read_template
from sft_cluster.train import compat

log = logging.getLogger("sft_cluster.train")


def _resolve(name: str) -> str:
    return resolve_builtin(name) if name.startswith("builtin:") else name


# The special tokens a built-in template needs in the vocabulary (added when the tokenizer lacks them).
_TEMPLATE_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"]}


def load_tokenizer(model: ModelSpec) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with ``model.chat_template`` (and the special tokens it needs) if set.

    ``tokenizer.added_by_template`` lists the tokens added, so the embeddings can grow to match.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        _resolve(model.tokenizer or model.name_or_path), trust_remote_code=model.trust_remote_code
    )
    added: list[str] = []
    if model.chat_template:
        tokenizer.chat_template = read_template(model.chat_template)
        vocab = tokenizer.get_vocab()
        added = [t for t in _TEMPLATE_TOKENS.get(model.chat_template, []) if t not in vocab]
        if added:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": added}, replace_extra_special_tokens=False
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.added_by_template = added
    return tokenizer


def load_chat(job: JobSpec) -> ChatEncoder:
    """How this job turns conversations into tokens and trained masks (raises TemplateRefused)."""
    return ChatEncoder(load_tokenizer(job.model), job.model.name_or_path, job.data.assistant_only_loss)


def attention_implementation(requested: str) -> str:
    """``flash_attention_2`` where the flash_attn package and a CUDA GPU are there, else ``sdpa``.

    A fallback with a warning rather than an error: the run is the same apart
    from speed, and a failing Ray worker would be restarted ``max_failures``
    times for nothing. Without this, a model built from a config would fail
    only at its first forward, and transformers may try the Hub's kernels
    (unreachable from most cluster nodes).
    """
    if requested != "flash_attention_2" or is_flash_attn_2_available():
        return requested
    log.warning(
        "model.attn_implementation = flash_attention_2, but the flash_attn package (>= 2.3.3) or a "
        "CUDA GPU is missing on this worker: training with sdpa instead (pip install flash-attn)"
    )
    return "sdpa"


def build_model(model: ModelSpec, seed: int, vocab_size: int | None = None) -> transformers.PreTrainedModel:
    """Load weights, or initialise them from the config with ``seed`` (same on every rank).

    Weights are fp32 (the master copy); mixed precision autocasts the compute.
    ``vocab_size`` (the tokenizer's length) larger than the embeddings grows
    them (to a multiple of 64), with ``seed``: tokens a template added.
    """
    dtype = torch.float32
    path = _resolve(model.name_or_path)
    common = {"trust_remote_code": model.trust_remote_code}
    attention = attention_implementation(model.attn_implementation)
    if model.from_config:
        config = AutoConfig.from_pretrained(path, **common)
        compat.set_attention(config, attention)
        transformers.set_seed(seed)
        # Whole, then partitioned when the Trainer prepares it; loaded weights keep zero.Init.
        with compat.without_zero3_init():
            built = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        built = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attention, **common
        )
    # Packed rows carry position ids; without a KV cache transformers keeps
    # attention inside each packed sequence.
    built.config.use_cache = False
    if vocab_size is not None and vocab_size > built.get_input_embeddings().weight.shape[0]:
        transformers.set_seed(seed)
        built.resize_token_embeddings(vocab_size, pad_to_multiple_of=64)
    return built


def generation_config_for(model: transformers.PreTrainedModel, encoder: ChatEncoder):
    """The model's generation config with EOS ending an assistant turn, so ``generate`` stops there."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    tokenizer = encoder.tokenizer
    wanted = [
        *eos,
        *encoder.end_of_turn_ids,
        *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
    ]
    config.eos_token_id = list(dict.fromkeys(wanted))
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def parameter_share(model: torch.nn.Module) -> float:
    """The fraction of the model's parameters this rank holds (1.0 unless sharded).

    FSDP2 parameters are DTensors (``to_local`` is this rank's shard); ZeRO-3
    parameters keep their partition in ``ds_tensor`` and the full size in ``ds_numel``.
    """
    shares = [compat.zero3_partition(param) or _dtensor_share(param) for param in model.parameters()]
    total = sum(size for _, size in shares)
    return sum(held for held, _ in shares) / total if total else 1.0


def _dtensor_share(param: torch.Tensor) -> tuple[int, int]:
    """(elements this rank holds, elements in all) of a parameter, sharded (DTensor) or not."""
    return (param.to_local().numel() if hasattr(param, "to_local") else param.numel()), param.numel()


def _full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """Every rank calls this; the main process gets the whole (gathered) state dict (ZeRO-3 gives the
    others None), without the ``_orig_mod.`` prefix that accelerate keeps from a torch.compile
    wrapper (``strategy.compile``)."""
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled and accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
        state_dict = compat.zero3_full_state_dict(trainer.model_wrapped)
    else:
        state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if state_dict is None:
        return None
    return {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}


def save_final_model(trainer, job: JobSpec, encoder: ChatEncoder, out: Path) -> None:
    """Consolidated Hugging Face weights in ``out``, whatever the strategy (collective), with the
    tokenizer (the model's own inference template, never a training variant) and a generation
    config that stops at the end of an assistant turn.

    With LoRA the adapter is saved, or with ``lora.merge`` a fresh copy of the
    base gets the trained adapter and is merged, so the sharded training
    model is never modified.
    """
    state_dict = _full_state_dict(trainer)
    if not trainer.accelerator.is_main_process:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    lora = job.strategy.lora
    if lora is not None and lora.merge:
        with compat.without_zero3_init():  # the copy is built whole, on this rank only
            base = build_model(job.model, job.train.seed, len(encoder.tokenizer))
        model, state_dict = compat.lora_copy(base, model, state_dict).merge_and_unload(), None
    model.save_pretrained(
        str(out), state_dict=compat.drop_tied_copy(model, state_dict), safe_serialization=True
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation_config_for(base, encoder).save_pretrained(str(out))
    encoder.tokenizer.save_pretrained(str(out))
