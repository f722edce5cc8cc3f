"""``loss.png``: the training (and eval) loss against the step; ``report.png``: that, the tokens per
second, and where the wall time went (``sft-cluster report``)."""

from __future__ import annotations

import io
from typing import Any

from sft_cluster import storage


def plot_loss(records: list[dict[str, Any]], uri: str, title: str, options: dict | None = None) -> bool:
    """Draw the curve into ``uri``; False when there is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    _loss_axes(ax, train, evals, title)
    _save(fig, uri, options)
    return True


def plot_report(
    records: list[dict[str, Any]],
    split: dict[str, Any] | None,
    uri: str,
    title: str,
    options: dict | None = None,
) -> None:
    """``report.png``: the loss (and eval loss), tokens per second, and the time split as one bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sft_cluster.tracking.goodput import PARTS

    fig, (losses, rates, time_bar) = plt.subplots(3, 1, figsize=(8, 9), dpi=110, height_ratios=[3, 2, 1])
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    _loss_axes(losses, train, evals, title)
    rate = [(r["step"], r["tokens_per_second"]) for r in records if r.get("tokens_per_second")]
    if rate:
        rates.plot(*zip(*rate, strict=True), linewidth=1.2)
    rates.set_xlabel("optimizer step")
    rates.set_ylabel("tokens/s")
    rates.grid(alpha=0.3)
    if split is not None:
        left = 0.0
        for part in PARTS:
            seconds = split[f"{part}_seconds"]
            time_bar.barh(0, seconds, left=left, label=f"{part.replace('_', ' ')} {seconds:.1f} s")
            left += seconds
        goodput = split.get("goodput")
        time_bar.set_title(f"wall time {split['wall_seconds']:.1f} s, goodput {goodput or 0:.1%}")
        time_bar.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    time_bar.set_yticks([])
    time_bar.set_xlabel("seconds")
    _save(fig, uri, options)


def _loss_axes(ax: Any, train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str) -> None:
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _save(fig: Any, uri: str, options: dict | None) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    fs, path = storage.filesystem(uri, options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
