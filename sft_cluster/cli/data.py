"""``sft-cluster data``: the training data as the model will see it."""

from __future__ import annotations

import itertools
from typing import Annotated

import typer
from rich.table import Table

from sft_cluster.cli.app import app
from sft_cluster.cli.common import JobArg, OverridesArg, check_data, console, fail, load_checked
from sft_cluster.spec import (
    JobSpec,
)

data_app = typer.Typer(help="Look at the training data as the model will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _conversations_by_source(job: JobSpec):
    """(source uri, conversations) for each source, with data errors as user errors."""
    from sft_cluster.data import DataError, load_conversations

    try:
        for source in job.data.sources:
            single = job.data.model_copy(update={"sources": [source]})
            yield source.uri, load_conversations(single, job.storage)
    except DataError as exc:
        fail([str(exc)])


@data_app.command("preview")
def data_preview(
    job_path: JobArg,
    overrides: OverridesArg = None,
    rank: Annotated[int, typer.Option(help="Show what this rank trains on.")] = 0,
    world_size: Annotated[int, typer.Option(help="Number of ranks the data is split over.")] = 1,
    n: Annotated[int, typer.Option("-n", help="How many samples.")] = 3,
) -> None:
    """Samples as the model sees them: the chat template applied, trained tokens highlighted.

    The samples are the first that ``--rank`` of ``--world-size`` reads under the
    run's shard plan (seeded by train.seed), in training order.
    """
    from rich.text import Text

    from sft_cluster.data import DataError, list_sources, make_plan
    from sft_cluster.data.stream import RankStream

    job, _ = load_checked(job_path, overrides, None)
    if not 0 <= rank < world_size:
        fail([f"--rank {rank} must be in 0..{world_size - 1}"])
    check_data(job_path, job)
    encoder = _encoder(job)
    tokenizer = encoder.tokenizer
    try:
        plan = make_plan(job.data, list_sources(job.data, job.storage), world_size, job.train.seed)
        stream = RankStream(plan, rank, job.data, job.storage, encoder)
        samples = list(itertools.islice(stream, n))
    except DataError as exc:
        fail([str(exc)])
    console.print(f"assistant mask: {encoder.method} ({_METHODS[encoder.method]})", highlight=False)
    for index, sample in enumerate(samples):
        text = Text()
        for token, trained in zip(sample.input_ids, sample.assistant_mask, strict=True):
            text.append(tokenizer.decode([token]), style="bold green" if trained else "dim")
        console.rule(
            f"rank {rank}, sample {index}: {len(sample.input_ids)} tokens, "
            f"{sum(sample.assistant_mask)} trained (green)"
        )
        console.print(text)
    skipped = [(c.untrained, c.dropped) for c in stream.counters]
    console.print(
        f"skipped on the way: {sum(u for u, _ in skipped)} without a trained token, "
        f"{sum(d for _, d in skipped)} over max_seq_len",
        highlight=False,
    )


@data_app.command("stats")
def data_stats(job_path: JobArg, overrides: OverridesArg = None) -> None:
    """Samples, tokens, trained tokens, untrained and over-length samples, packing efficiency, per source."""
    from jinja2 import TemplateError

    from sft_cluster.data.inspect import SourceStats

    job, _ = load_checked(job_path, overrides, None)
    check_data(job_path, job)
    encoder = _encoder(job)
    max_len, policy = job.data.max_seq_len, job.data.truncation
    table = Table(
        "source",
        "samples",
        "tokens",
        "trained",
        "no trained token",
        f"> {max_len} ({policy})",
        "packing efficiency",
    )
    total = SourceStats()
    for uri, conversations in _conversations_by_source(job):
        stats = SourceStats()
        for number, conversation in enumerate(conversations, start=1):
            try:
                ids, mask = encoder.encode(conversation, conversation.tools)
            except (TemplateError, TypeError, ValueError) as exc:
                fail([f"{uri}: record {number}: the chat template cannot render it: {exc}"])
            stats.add(ids, mask, max_len)
            total.add(ids, mask, max_len)
        table.add_row(uri, *_stats_cells(stats, max_len, policy))
    table.add_row("all", *_stats_cells(total, max_len, policy), style="bold")
    console.print(f"assistant mask: {encoder.method} ({_METHODS[encoder.method]})", highlight=False)
    console.print(table)


_METHODS = {
    "markers": "the template's {% generation %} markers",
    "trl_variant": "TRL's generation-tagged variant of the template",
    "prefix": "derived by rendering growing prefixes of each conversation",
    "all": "data.assistant_only_loss is false: every token",
}


def _encoder(job: JobSpec):
    """The job's chat encoder; a template that cannot give an assistant mask is a user error."""
    from sft_cluster.data import DataError
    from sft_cluster.train.model import load_chat

    try:
        encoder = load_chat(job)
    except DataError as exc:
        fail([str(exc)])
    if encoder.notice:
        console.print(f"note: {encoder.notice}", highlight=False, soft_wrap=True)
    return encoder


def _stats_cells(stats, max_len: int, policy: str) -> list[str]:
    return [
        f"{stats.samples:,}",
        f"{stats.tokens:,}",
        f"{stats.trained_tokens:,}",
        f"{stats.untrained:,}",
        f"{stats.over_length:,}",
        f"{stats.packing_efficiency(max_len, policy):.3f}",
    ]
