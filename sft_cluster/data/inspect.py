"""What the model will see: tokenized samples with their trained tokens, and corpus stats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sft_cluster.data.packing import best_fit


def tokenize(tokenizer: Any, conversation: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1 = trained) from the chat template."""
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def best_fit_bins(lengths: Sequence[int], capacity: int) -> int:
    """How many rows of ``capacity`` tokens best-fit-decreasing packing needs."""
    return len(best_fit(lengths, capacity))


@dataclass
class SourceStats:
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    over_length: int = 0
    lengths: list[int] = field(default_factory=list)

    def add(self, ids: list[int], mask: list[int], max_len: int) -> None:
        self.samples += 1
        self.tokens += len(ids)
        self.trained_tokens += sum(mask)
        self.over_length += len(ids) > max_len
        self.lengths.append(len(ids))

    def packing_efficiency(self, max_len: int, truncation: str) -> float:
        kept = [n for n in self.lengths if n <= max_len or truncation == "truncate"]
        if not kept:
            return 0.0
        return sum(min(n, max_len) for n in kept) / (best_fit_bins(kept, max_len) * max_len)
