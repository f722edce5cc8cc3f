"""Tokenizer and model from the job's ``model`` section."""

from __future__ import annotations

import logging

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


def build_model(
    model: ModelSpec, seed: int, vocab_size: int | None = None, weights: bool = True
) -> transformers.PreTrainedModel:
    """Load weights, or initialise them from the config with ``seed`` (same on every rank).

    Weights are fp32 (the master copy); mixed precision autocasts the compute.
    ``vocab_size`` (the tokenizer's length) larger than the embeddings grows
    them (to a multiple of 64), with ``seed``: tokens a template added.
    ``weights=False`` (a rank that receives its shards from rank 0, see
    ``strategy.builds_weights``) reads no weight file and holds no copy: the
    same model, its parameters allocated and never written.
    """
    if not weights:
        return _placeholder_model(model, vocab_size)
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


def _placeholder_model(model: ModelSpec, vocab_size: int | None) -> transformers.PreTrainedModel:
    """The model ``build_model`` gives, shapes, buffers and config alike, with unwritten parameters.

    Built on the meta device from the config (buffers such as rotary
    frequencies are computed for real: they are not broadcast), grown as
    ``build_model`` grows it (without mean resizing, which reads the weights),
    then given host storage that is allocated and never touched, so it costs
    no resident memory until FSDP2 replaces it with this rank's shards. In
    place of loaded weights it carries what ``from_pretrained`` leaves on a
    model (``compat.as_if_loaded``): the export walks it on every rank.
    """
    from accelerate import init_empty_weights

    path = _resolve(model.name_or_path)
    common = {"trust_remote_code": model.trust_remote_code}
    config = AutoConfig.from_pretrained(path, **common)
    compat.set_attention(config, attention_implementation(model.attn_implementation))
    with compat.without_zero3_init(), init_empty_weights(include_buffers=False):
        built = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **common)
    built.tie_weights()  # from_config leaves tied embeddings as two tensors on the meta device
    built.config.use_cache = False
    if vocab_size is not None and vocab_size > built.get_input_embeddings().weight.shape[0]:
        built.resize_token_embeddings(vocab_size, pad_to_multiple_of=64, mean_resizing=False)
    if not model.from_config:
        compat.as_if_loaded(built)
    compat.untouched_host_parameters(built)
    return built


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
