"""The shipped assets: tokenizer, chat template and assistant mask, model config, smoke data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "sft_cluster" / "assets"
SCRIPT = REPO / "scripts" / "make_assets.py"
NUM_CONVERSATIONS = 2000
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CONVERSATION = [
    {"role": "system", "content": "Be excited!"},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "Lima!"},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5!"},
]
RENDERED = (
    "<|im_start|>system\nBe excited!<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n"
    "<|im_start|>assistant\nLima!<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
    "<|im_start|>assistant\n5!<|im_end|>\n"
)


@pytest.fixture(scope="module", params=["tiny-chatml", "tiny-llama"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(ASSETS / request.param)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = (ASSETS / "smoke-chat.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_tokenizer_loads_with_chatml_special_tokens(tokenizer):
    assert tokenizer.is_fast
    for token in SPECIAL:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert len(tokenizer) <= 1024
    # Byte-level: any text survives a round trip, even outside the training data.
    text = "Grüße, naïve café! 12345 \t tabs\nnew line"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_round_trips(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED
    ids = tokenizer.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == RENDERED
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == RENDERED.split("Lima!")[0]
    assert prompt.endswith("<|im_start|>assistant\n")


def test_assistant_mask_is_exactly_the_assistant_turns(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    turns = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(ids[a:b]) for a, b in _spans(mask)] == turns
    unmasked = "".join(tokenizer.decode([i]) for i, bit in zip(ids, mask, strict=True) if not bit)
    assert unmasked == RENDERED.replace("Lima!<|im_end|>", "").replace("5!<|im_end|>", "")


def test_template_satisfies_trl_assistant_only_loss(tokenizer):
    chat_template_utils = pytest.importorskip("trl.chat_template_utils")
    assert chat_template_utils.has_generation_markers(tokenizer.chat_template)
    assert chat_template_utils.is_chat_template_stop_token_trained(tokenizer)


def test_model_config_matches_tokenizer():
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.tie_word_embeddings is True
    assert config.use_cache is False
    assert config.num_hidden_layers == 2
    assert config.max_position_embeddings == 1024
    assert not any(p.suffix in {".safetensors", ".bin"} for p in (ASSETS / "tiny-llama").iterdir())


def test_model_builds_from_config_and_runs():
    import torch
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    batch = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))


def test_smoke_data_rows_are_valid_chat(rows):
    assert len(rows) == NUM_CONVERSATIONS
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-chatml")
    with_system = multi_turn = 0
    for row in rows:
        assert list(row) == ["messages"]
        messages = row["messages"]
        assert all(list(m) == ["role", "content"] for m in messages)
        assert all(isinstance(m["content"], str) and m["content"] for m in messages)
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            with_system += 1
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
        multi_turn += len(roles) > 2
        length = len(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
        assert length < 120
    assert 0.1 * len(rows) < with_system < 0.9 * len(rows)
    assert 0.1 * len(rows) < multi_turn < 0.9 * len(rows)


def test_assets_are_small():
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024


def test_generator_reproduces_the_shipped_bytes(tmp_path: Path, isolated_env):
    out = tmp_path / "assets"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        env=isolated_env,
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )

    def files(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        }

    generated, shipped = files(out), files(ASSETS)
    assert sorted(generated) == sorted(shipped)
    for name, data in generated.items():
        assert data == shipped[name], f"{name} differs: rerun scripts/make_assets.py"
