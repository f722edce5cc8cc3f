"""Build the tiny assets shipped in ``sft_cluster/assets`` (nothing is downloaded at run time).

    python scripts/make_assets.py [--out DIR]

Writes, deterministically (the same bytes on every run, for a given set of library versions):

- ``smoke-chat.jsonl``: toy chat conversations in the OpenAI ``messages`` shape. The
  tasks are fixed mappings over a small vocabulary (capitals, colours, opposites,
  small sums) plus a word-reversal copy task; some conversations have a system
  message (one of them, "Answer in one word.", changes the answer format) and some
  have two or three turns. A ~0.4M-parameter model learns them visibly in ~150 steps.
- ``tiny-chatml/``: a byte-level BPE tokenizer trained on that data, with special tokens
  ``<|endoftext|>`` (pad), ``<|im_start|>`` and ``<|im_end|>`` (eos) and a ChatML chat
  template whose assistant turns (content and ``<|im_end|>``) are wrapped in
  ``{% generation %}`` (needed for assistant-only loss).
- ``tiny-llama/``: a Llama-shaped ``config.json`` (no weights: the model is built with
  ``AutoModelForCausalLM.from_config`` after seeding) plus the same tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "sft_cluster" / "assets"

SEED = 1234
NUM_CONVERSATIONS = 2000
VOCAB_SIZE = 1024  # upper bound; BPE stops earlier once every word of the data is one token
MODEL_MAX_LENGTH = 1024
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML, as in Qwen2 (without its default system message), with each assistant turn's
# content and <|im_end|> inside {% generation %} so return_assistant_tokens_mask marks them.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
}

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Cuba": "Havana", "Greece": "Athens", "Ireland": "Dublin", "Poland": "Warsaw",
}  # fmt: skip
COLOURS = {
    "grass": "green", "the sky": "blue", "snow": "white", "coal": "black",
    "a banana": "yellow", "a tomato": "red", "an orange": "orange", "a plum": "purple",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "old": "new",
    "wet": "dry", "dark": "light", "happy": "sad", "open": "closed", "early": "late",
}  # fmt: skip
WORDS = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock", "star", "rain"]
EXCITED = "Be excited!"  # this system message ends answers with "!" instead of "."
SYSTEMS = ["You are a helpful assistant.", "You are a precise tutor.", EXCITED]
MAX_ADDEND = 5


def _turn(rng: random.Random) -> tuple[str, str]:
    """One question and its answer, without the final full stop."""
    kind = rng.randrange(6)
    if kind == 0:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", CAPITALS[country]
    if kind == 1:
        thing = rng.choice(sorted(COLOURS))
        return f"What colour is {thing}?", COLOURS[thing].capitalize()
    if kind == 2:
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", OPPOSITES[word].capitalize()
    if kind == 3:
        n = rng.randrange(20)
        return f"What comes after {n}?", str(n + 1)
    if kind == 4:
        a, b = rng.randrange(MAX_ADDEND), rng.randrange(MAX_ADDEND)
        return f"What is {a} plus {b}?", str(a + b)
    word = rng.choice(WORDS)
    return f"Repeat the word: {word}", word


def conversations(rng: random.Random, count: int = NUM_CONVERSATIONS) -> list[dict]:
    """``count`` conversations: ~30% with a system message, ~30% with 2 or 3 turns."""
    rows = []
    for _ in range(count):
        messages = []
        end = "."
        if rng.random() < 0.3:
            system = rng.choice(SYSTEMS)
            end = "!" if system == EXCITED else "."
            messages.append({"role": "system", "content": system})
        turns = 1 if rng.random() < 0.7 else rng.choice((2, 3))
        for _ in range(turns):
            question, answer = _turn(rng)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer + end})
        rows.append({"messages": messages})
    return rows


def train_tokenizer(rows: list[dict]) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization, as Qwen2) trained on the message texts."""
    texts = [message["content"] for row in rows for message in row["messages"]]
    texts += ["system", "user", "assistant"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inside) + special_tokens_map.json."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory, save_jinja_files=False)
    special = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START]}
    _write_json(directory / "special_tokens_map.json", special)


def llama_config(tokenizer: Tokenizer) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        hidden_size=LLAMA["hidden_size"],
        intermediate_size=LLAMA["intermediate_size"],
        num_hidden_layers=LLAMA["num_hidden_layers"],
        num_attention_heads=LLAMA["num_attention_heads"],
        num_key_value_heads=LLAMA["num_key_value_heads"],
        max_position_embeddings=LLAMA["max_position_embeddings"],
        rms_norm_eps=LLAMA["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": LLAMA["rope_theta"]},
        initializer_range=LLAMA["initializer_range"],
        tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id(ENDOFTEXT),
        eos_token_id=tokenizer.token_to_id(IM_END),
        pad_token_id=tokenizer.token_to_id(ENDOFTEXT),
        use_cache=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def build(out: Path, seed: int = SEED) -> None:
    """Write every asset under ``out`` (existing asset files there are replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = conversations(random.Random(seed))
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (out / "smoke-chat.jsonl").write_text(lines, encoding="utf-8")

    tokenizer = train_tokenizer(rows)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        save_tokenizer(tokenizer, staged / "tiny-chatml")
        shutil.copytree(staged / "tiny-chatml", staged / "tiny-llama")
        llama_config(tokenizer).save_pretrained(staged / "tiny-llama")
        for name in ("tiny-chatml", "tiny-llama"):
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.copytree(staged / name, out / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=SEED, help="data seed (default: %(default)s)")
    args = parser.parse_args(argv)
    build(args.out, args.seed)
    print(f"assets written to {args.out}")


if __name__ == "__main__":
    main()
