"""Tokenize + assistant mask throughput of each ``ChatEncoder`` method, side by side (issue #13).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/masks.py [--repeats 5] [--profile]

One process (= one data worker) encodes the same conversations (the smoke data,
``sft_cluster/assets/smoke-chat.jsonl``: 2,000 records of 1-3 turns) by every
path, with tiny real-family tokenizers (``tests/fixtures/families.py``: the
shipped tiny BPE with the family's special tokens and original template):

- markers: the Qwen2.5 tokenizer with TRL's ``qwen2_5_training.jinja`` set as
  its template (``{% generation %}`` markers; ``ChatEncoder`` picks ``markers``);
- trl_variant: the Qwen2.5 tokenizer with its original template (TRL knows it:
  ``trl_variant``, which tokenizes with that same training template);
- prefix: the Qwen2.5 tokenizer with its original template plus a Jinja comment,
  which renders the same text but which TRL does not recognise (``prefix``: one
  render of the conversation plus two per assistant turn);
- prefix (llama3_1): Llama 3.1's own template (no TRL variant: ``prefix``), a
  like-for-unlike extra (more tokens per conversation: its headers, and the
  system block with dates it always renders);
- hf markers: ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)``
  with the markers template, what transformers/TRL do, as the baseline.

The three Qwen2.5 paths and the baseline render the same text and give the same
ids (checked on every conversation before timing, which is also the warm-up).
Timing: ``--repeats`` rounds over all the conversations, the paths taking turns
on each chunk of 50 (so a burst of other work on the shared cores hits them
alike); reported: the median round as tokens/s (tokens produced per second by
one process) and, per path, the median over rounds of its speed over markers'.
Then the prefix path's scaling: synthetic conversations of 1, 2, 4, 8 and 16
turns (words from the smoke data, as ``bench/data.py`` builds them), about the
same number of tokens at each size, the markers path on the same conversations
(taking turns on chunks of about 50 turns).
``--profile`` adds a cProfile breakdown of one pass per path (rendering,
tokenizing, the rendered-content checks, the mask from offsets).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SMOKE = REPO / "sft_cluster" / "assets" / "smoke-chat.jsonl"
TURNS = (1, 2, 4, 8, 16)
TARGETS = {"prefix": 0.5, "trl_variant": 0.9}  # issue #13: each path's tokens/s over the markers path's
# A Jinja comment renders nothing, but the template text is no longer one TRL knows.
UNKNOWN_TO_TRL = "{#- the same template, but not TRL's text #}"

Encode = Callable[[list, list | None], tuple[list[int], list[int]]]


def load_smoke():
    from sft_cluster.data.records import load_conversations
    from sft_cluster.spec import DataSpec, StorageSpec

    return load_conversations(DataSpec.model_validate({"sources": [{"uri": str(SMOKE)}]}), StorageSpec())


def synthetic(turns: int, count: int, seed: int) -> list[list[dict]]:
    """``count`` conversations of ``turns`` user/assistant turns (bench/data.py's words and lengths)."""
    words = sorted(set(re.findall(r"[A-Za-z]+", SMOKE.read_text())))
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        messages = []
        for _ in range(turns):
            question = " ".join(rng.choices(words, k=rng.randint(3, 25))) + "?"
            answer = " ".join(rng.choices(words, k=rng.randint(2, 30))) + "."
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append(messages)
    return conversations


def build_paths(root: Path) -> tuple[dict[str, Encode], dict[str, str]]:
    """{path: encode(messages, tools)} and {path: what it is}; the encoders' methods checked."""
    import transformers

    from sft_cluster.data.chat import ChatEncoder
    from sft_cluster.spec import ModelSpec
    from sft_cluster.train.model import load_tokenizer
    from tests.fixtures.families import build_family, trl_template

    transformers.logging.set_verbosity_error()
    folders = {name: build_family(name, root / name) for name in ("qwen2_5", "llama3_1")}

    def tokenizer(family: str, template: str | None = None):
        loaded = load_tokenizer(ModelSpec(name_or_path=str(folders[family])))  # as a job loads it
        if template is not None:
            loaded.chat_template = template
        return loaded

    marked = tokenizer("qwen2_5", trl_template("qwen2_5_training"))
    encoders = {
        "markers": ChatEncoder(marked, "qwen2_5 + qwen2_5_training.jinja"),
        "trl_variant": ChatEncoder(tokenizer("qwen2_5"), "qwen2_5"),
        "prefix": ChatEncoder(tokenizer("qwen2_5", trl_template("qwen2_5") + UNKNOWN_TO_TRL), "qwen2_5 + #"),
        "prefix llama3_1": ChatEncoder(tokenizer("llama3_1"), "llama3_1"),
    }
    for name, encoder in encoders.items():
        expected = name.split()[0]
        if encoder.method != expected:
            raise RuntimeError(f"{name}: ChatEncoder picked {encoder.method!r}, not {expected!r}")

    def hf(messages: list, tools: list | None) -> tuple[list[int], list[int]]:
        out = marked.apply_chat_template(
            list(messages), tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])

    paths: dict[str, Encode] = {name: encoder.encode for name, encoder in encoders.items()}
    paths["hf markers"] = hf
    about = {
        "markers": "ChatEncoder, qwen2_5 tokenizer, TRL's qwen2_5_training.jinja (markers)",
        "trl_variant": "ChatEncoder, qwen2_5 tokenizer, original template (trl_variant)",
        "prefix": "ChatEncoder, qwen2_5 tokenizer, original template + a comment (prefix)",
        "prefix llama3_1": "ChatEncoder, llama3_1 tokenizer, original template (prefix)",
        "hf markers": "tokenizer.apply_chat_template(return_assistant_tokens_mask=True), markers template",
    }
    return paths, about


def check(paths: dict[str, Encode], conversations: Sequence) -> dict[str, dict]:
    """One pass of every path (the warm-up): same ids where the text is the same; tokens and trained."""
    stats = {name: {"tokens": 0, "trained": 0} for name in paths}
    mask_differs = 0
    for conversation in conversations:
        tools = getattr(conversation, "tools", None)
        outs = {name: encode(conversation, tools) for name, encode in paths.items()}
        for name, (ids, mask) in outs.items():
            stats[name]["tokens"] += len(ids)
            stats[name]["trained"] += sum(mask)
        ids, mask = outs["markers"]
        for name in ("trl_variant", "prefix", "hf markers"):
            if outs[name][0] != ids:
                raise RuntimeError(f"{name} gives other ids than markers for {list(conversation)!r}")
        for name in ("trl_variant", "hf markers"):
            if outs[name][1] != mask:
                raise RuntimeError(f"{name} gives another mask than markers for {list(conversation)!r}")
        mask_differs += sum(a != b for a, b in zip(mask, outs["prefix"][1], strict=True))
    stats["prefix"]["mask_differs"] = mask_differs
    return stats


def one_pass(encode: Encode, conversations: Sequence) -> tuple[int, float]:
    tokens = 0
    started = time.perf_counter()
    for conversation in conversations:
        ids, _ = encode(conversation, getattr(conversation, "tools", None))
        tokens += len(ids)
    return tokens, time.perf_counter() - started


def timed(
    paths: dict[str, Encode], conversations: Sequence, repeats: int, chunk: int = 50
) -> dict[str, dict]:
    """Tokens/s per path: ``repeats`` rounds over the conversations, the paths taking turns on each chunk
    of ``chunk`` conversations (so a burst of other work hits them alike); the median round, and the
    median over rounds of each path's time over the markers path's."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    tokens = dict.fromkeys(paths, 0)
    names = list(paths)
    for round_ in range(repeats):
        gc.collect()
        spent = dict.fromkeys(paths, 0.0)
        for index, start in enumerate(range(0, len(conversations), chunk)):
            part = conversations[start : start + chunk]
            shift = (round_ + index) % len(names)
            for name in names[shift:] + names[:shift]:
                count, elapsed = one_pass(paths[name], part)
                spent[name] += elapsed
                if round_ == 0:
                    tokens[name] += count
        for name in paths:
            seconds[name].append(spent[name])
    return {
        name: {
            "tokens": tokens[name],
            "seconds": statistics.median(seconds[name]),
            "tokens_s": tokens[name] / statistics.median(seconds[name]),
            "spread": (tokens[name] / max(seconds[name]), tokens[name] / min(seconds[name])),
            "vs_markers": statistics.median(
                tokens[name] / mine / (tokens["markers"] / theirs)
                for mine, theirs in zip(seconds[name], seconds["markers"], strict=True)
            ),
        }
        for name in paths
    }


# --- cProfile breakdown ------------------------------------------------------------------------

# (label, function name, file name ends with); cumulative time of each, the rest is "other".
_PARTS = (
    ("render", "render_jinja_template", "chat_template_utils.py"),
    ("tokenize", "__call__", "tokenization_utils_base.py"),
    ("checks", "_check_rendered", "chat.py"),
    ("mask", "_mask_from_spans", "chat.py"),
    ("clean", "_clean", "chat.py"),
)


def profile(paths: dict[str, Encode], conversations: Sequence) -> dict[str, dict[str, float]]:
    """Share of one pass's time per part (cProfile; its overhead weighs on Python-heavy parts)."""
    shares = {}
    for name, encode in paths.items():
        profiler = cProfile.Profile()
        profiler.enable()
        one_pass(encode, conversations)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        total = sum(tt for _, _, tt, _, _ in stats.values())
        parts = {}
        for label, function, filename in _PARTS:
            parts[label] = sum(
                ct
                for (file, _, func), (_, _, _, ct, _) in stats.items()
                if func == function and file.endswith(filename)
            )
        parts["other"] = max(total - sum(parts.values()), 0.0)
        renders = sum(
            nc
            for (file, _, func), (_, nc, _, _, _) in stats.items()
            if func == "render_jinja_template" and file.endswith("chat_template_utils.py")
        )
        shares[name] = {"total_s": total, "renders": renders, **{k: v / total for k, v in parts.items()}}
    return shares


# --- the report ----------------------------------------------------------------------------------


def report_main(results: dict[str, dict], stats: dict[str, dict], about: dict[str, str], count: int) -> None:
    print(f"\nSmoke data: {count:,} conversations of 1-3 turns, one process")
    print(
        f"{'path':17}{'tokens':>9}{'trained':>9}{'tokens/s':>10}{'conv/s':>8}{'vs markers':>12}"
        "   tokens/s min-max"
    )
    for name, result in results.items():
        low, high = result["spread"]
        print(
            f"{name:17}{result['tokens']:>9,}{stats[name]['trained']:>9,}{result['tokens_s']:>10,.0f}"
            f"{count / result['seconds']:>8,.0f}{result['vs_markers']:>11.2f}x   {low:,.0f}-{high:,.0f}"
        )
    for name, text in about.items():
        print(f"  {name}: {text}")
    differs = stats["prefix"]["mask_differs"]
    print(
        "  the same ids on every conversation from markers, trl_variant, prefix and hf markers, and the same "
        f"mask from markers, trl_variant and hf markers; prefix's differs on {differs:,} tokens"
    )


def report_targets(results: dict[str, dict]) -> None:
    print()
    for name in ("prefix", "prefix llama3_1", "trl_variant"):
        floor = TARGETS[name.split()[0]]
        ratio = results[name]["vs_markers"]
        verdict = "met" if ratio >= floor else "NOT MET"
        extra = " (its own text and tokens: not like for like)" if name == "prefix llama3_1" else ""
        print(f"target: {name} >= {floor}x markers: {ratio:.2f}x -> {verdict}{extra}")


def report_scaling(rows: dict[int, dict[str, dict]]) -> None:
    print("\nThe prefix path by turns per conversation (synthetic, about the same tokens at each size)")
    print(
        f"{'turns':>5}{'conv':>6}{'tokens':>9}{'markers tok/s':>15}{'prefix tok/s':>14}{'vs markers':>12}"
        f"{'llama3_1 prefix tok/s':>23}{'vs markers':>12}"
    )
    for turns, results in rows.items():
        markers, prefix, llama = results["markers"], results["prefix"], results["prefix llama3_1"]
        print(
            f"{turns:>5}{markers['count']:>6}{markers['tokens']:>9,}{markers['tokens_s']:>15,.0f}"
            f"{prefix['tokens_s']:>14,.0f}{prefix['vs_markers']:>11.2f}x"
            f"{llama['tokens_s']:>23,.0f}{llama['vs_markers']:>11.2f}x"
        )
    print(
        "  renders per conversation: markers 1, prefix 2 x turns (a turn: one user + one assistant message)"
    )


def report_profile(shares: dict[str, dict[str, float]], count: int) -> None:
    labels = [label for label, _, _ in _PARTS] + ["other"]
    print(f"\ncProfile, one pass over the {count:,} smoke conversations: share of each path's time")
    print(f"{'path':18}{'total s':>9}{'renders':>9}" + "".join(f"{label:>10}" for label in labels))
    for name, share in shares.items():
        print(
            f"{name:18}{share['total_s']:>9.2f}{share['renders']:>9,}"
            + "".join(f"{share[label]:>9.0%} " for label in labels)
        )
    print(
        "  render: Jinja (render_jinja_template); tokenize: the tokenizer call (Rust + its Python wrapper);"
    )
    print("  checks: ChatEncoder._check_rendered; mask: _mask_from_spans; other: the rest (hf markers: its")
    print("  char_to_token mask loop; prefix: slicing and startswith)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the smoke data (median reported)")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="rounds per turn count")
    parser.add_argument("--scaling-turns", type=int, default=800, help="assistant turns per turn count")
    parser.add_argument("--profile", action="store_true", help="add a cProfile breakdown per path")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = os.getloadavg()
    started = time.perf_counter()
    conversations = load_smoke()
    with tempfile.TemporaryDirectory(prefix="sftc-bench-masks-") as name:
        paths, about = build_paths(Path(name))
        stats = check(paths, conversations)
        results = timed(paths, conversations, args.repeats)
        scaling_paths = {n: paths[n] for n in ("markers", "prefix", "prefix llama3_1")}
        scaling = {}
        for turns in TURNS:
            count = max(args.scaling_turns // turns, 20)
            synth = synthetic(turns, count, seed=turns)
            one_pass(scaling_paths["prefix"], synth[:20])  # warm this size's renders
            scaling[turns] = timed(scaling_paths, synth, args.scaling_repeats, chunk=max(50 // turns, 2))
            for result in scaling[turns].values():
                result["count"] = count
        shares = profile(paths, conversations) if args.profile else None
    report_main(results, stats, about, len(conversations))
    report_targets(results)
    report_scaling(scaling)
    if shares:
        report_profile(shares, len(conversations))
    print(
        f"\n{os.cpu_count()} cores; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"(1 min); {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
