"""What the model will see: trained tokens per sample, corpus stats, and sources that train nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

from jinja2 import TemplateError

from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.packing import best_fit
from sft_cluster.data.records import (
    Conversation,
    DataError,
    format_of,
    iter_raw,
    record_location,
    resolve_source_uris,
    source_options,
    to_conversation,
)
from sft_cluster.spec import DataSpec, SourceSpec, StorageSpec

# How many records of each source are tokenized before training to see that it trains something.
SAMPLE_RECORDS = 32


def best_fit_bins(lengths: Sequence[int], capacity: int) -> int:
    """How many rows of ``capacity`` tokens best-fit-decreasing packing needs."""
    return len(best_fit(lengths, capacity))


def trained_count(mask: Sequence[int], max_len: int) -> int:
    """Tokens trained in a sample cut to ``max_len`` (the first token of a row is never a label)."""
    return sum(mask[1:max_len])


@dataclass
class SourceStats:
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    untrained: int = 0  # samples with no trained token (within max_seq_len): dropped in training
    over_length: int = 0
    lengths: list[int] = field(default_factory=list)

    def add(self, ids: list[int], mask: list[int], max_len: int) -> None:
        self.samples += 1
        self.tokens += len(ids)
        trained = trained_count(mask, max_len)
        self.trained_tokens += trained
        self.untrained += trained == 0
        self.over_length += len(ids) > max_len
        self.lengths.append(len(ids))

    def packing_efficiency(self, max_len: int, truncation: str) -> float:
        kept = [n for n in self.lengths if n <= max_len or truncation == "truncate"]
        if not kept:
            return 0.0
        return sum(min(n, max_len) for n in kept) / (best_fit_bins(kept, max_len) * max_len)


def _first_conversations(
    source: SourceSpec, data: DataSpec, store: StorageSpec, limit: int
) -> Iterator[tuple[Callable[[], str], Conversation]]:
    """(how to name it, conversation) for the first ``limit`` readable records of a source."""
    options = source_options(source, data, store)
    count = 0
    for uri in resolve_source_uris(source, data, store):
        fmt, compression = format_of(uri, source.format)
        for number, raw in iter_raw(uri, options, fmt, compression):
            locate = partial(record_location, uri, fmt, number)
            try:
                conversation = to_conversation(raw, source.columns, locate)
            except DataError:
                continue  # bad records are the training run's policy (data.on_bad_record)
            yield locate, conversation
            count += 1
            if count == limit:
                return


def untrained_sources(data: DataSpec, store: StorageSpec, encoder: ChatEncoder) -> list[str]:
    """Sources none of whose first ``SAMPLE_RECORDS`` readable records has a trained token.

    A record the template cannot render is an error naming its file and line.
    """
    problems = []
    for index, source in enumerate(data.sources):
        first = list(_first_conversations(source, data, store, SAMPLE_RECORDS))
        for locate, conversation in first:
            try:
                _, mask = encoder.encode(conversation, conversation.tools)
            except (TemplateError, DataError, TypeError, ValueError) as exc:
                raise DataError(f"{locate()}: the chat template cannot render this record: {exc}") from None
            if trained_count(mask, data.max_seq_len):
                break
        else:
            if first:
                problems.append(
                    f"data.sources[{index}] ({source.uri}): none of its first {len(first)} samples has a "
                    f"token to train on with the chat template of {encoder.model_name} "
                    f"(mask: {encoder.method}, max_seq_len {data.max_seq_len}): check that "
                    "the records have assistant turns that fit in data.max_seq_len, or set "
                    "model.chat_template"
                )
    return problems
