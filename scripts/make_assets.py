"""Build the tiny assets shipped in ``sft_cluster/assets`` (nothing is downloaded at run time).

    python scripts/make_assets.py [--out DIR]

Writes, deterministically (the same bytes on every run with the pinned library versions):

- ``smoke-chat.jsonl``: 2000 toy chat conversations in the OpenAI ``messages`` shape.
  Each user turn asks one of six questions over a small vocabulary: a capital, a
  colour, an opposite, the number after n (n < 20), a sum of two numbers below 5, or
  to repeat a word. Answers are one word and a full stop. ~30% of conversations
  start with a system message; one of them ("Be excited!") makes every answer end
  in "!" instead. ~30% have 2 or 3 turns. Every conversation is under 70 tokens.
  The 0.37M-parameter ``tiny-llama`` learns the lookups within 150 steps (batch
  8 x 256 packed tokens, lr 1e-3): the assistant-only loss falls from ~6 to ~0.9.
- ``tiny-chatml/``: a byte-level BPE tokenizer (GPT-2 pre-tokenization, as Qwen2)
  trained on that data, with ``<|endoftext|>`` (pad), ``<|im_start|>`` and
  ``<|im_end|>`` (eos), and a ChatML chat template whose assistant turns (content
  and ``<|im_end|>``) are wrapped in ``{% generation %}``, so
  ``return_assistant_tokens_mask=True`` (TRL's ``assistant_only_loss``) marks them.
- ``tiny-llama/``: a Llama ``config.json`` (no weights: the model is built with
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
from transformers import LlamaConfig, PreTrainedTokenizerFast

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sft_cluster" / "assets"
DATA_FILE = "smoke-chat.jsonl"
TOKENIZER_DIR = "tiny-chatml"
MODEL_DIR = "tiny-llama"

SEED = 1234
NUM_CONVERSATIONS = 2000
VOCAB_SIZE = 1024  # an upper bound: BPE stops once every word of the data is a single token
MODEL_MAX_LENGTH = 1024
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2's ChatML template without its default system message. Each assistant turn's content
# and its <|im_end|> sit inside {% generation %}, the newline after <|im_end|> does not.
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

# hidden 128 / 2 layers / intermediate 256 with a ~580-token tied embedding: ~0.37M parameters.
LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "use_cache": False,
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
EXCITED = "Be excited!"  # the one system message that changes answers: "!" instead of "."
SYSTEMS = ["You are a helpful assistant.", "You are a precise tutor.", EXCITED]
MAX_ADDEND = 5


def _question(rng: random.Random) -> tuple[str, str]:
    """One question and its one-word answer (without the final punctuation)."""
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
            question, answer = _question(rng)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer + end})
        rows.append({"messages": messages})
    return rows


def train_tokenizer(rows: list[dict]) -> Tokenizer:
    """Byte-level BPE trained on every message text (and the role names)."""
    texts = [message["content"] for row in rows for message in row["messages"]]
    texts += ["system", "user", "assistant"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
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


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """tokenizer.json, tokenizer_config.json (chat template inside), special_tokens_map.json."""
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    # transformers 5 no longer writes this file; older readers look for it.
    special = {"additional_special_tokens": [IM_START], "eos_token": IM_END, "pad_token": ENDOFTEXT}
    _write_text(directory / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,  # None, as in the tokenizer (ChatML has no BOS)
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LLAMA,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _write_text(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))  # "\n" line ends on every platform


def build(out: Path, seed: int = SEED) -> None:
    """Write every asset under ``out``, replacing the asset files and folders already there."""
    rows = conversations(random.Random(seed))
    tokenizer = hf_tokenizer(train_tokenizer(rows))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        staged = Path(tmp)
        save_tokenizer(tokenizer, staged / TOKENIZER_DIR)
        shutil.copytree(staged / TOKENIZER_DIR, staged / MODEL_DIR)
        llama_config(tokenizer).save_pretrained(staged / MODEL_DIR)
        for name in (TOKENIZER_DIR, MODEL_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
            (staged / name).rename(out / name)
    _write_text(out / DATA_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=SEED, help="data seed (default: %(default)s)")
    args = parser.parse_args(argv)
    build(args.out, args.seed)
    print(f"wrote {DATA_FILE}, {TOKENIZER_DIR}/ and {MODEL_DIR}/ under {args.out}")


if __name__ == "__main__":
    main()
