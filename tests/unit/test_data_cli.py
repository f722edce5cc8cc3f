"""`sft-cluster data stats|preview` on the shipped smoke data."""

from __future__ import annotations

import re

from sft_cluster.data.inspect import best_fit_bins
from tests.conftest import run_cli


def test_best_fit_packs_tightly():
    assert best_fit_bins([6, 5, 4, 3, 2], capacity=10) == 2
    assert best_fit_bins([10, 10, 1], capacity=10) == 3
    assert best_fit_bins([12], capacity=10) == 1  # over-length rows are cut to one row


def test_stats_counts_the_smoke_data(isolated_env):
    result = run_cli(["data", "stats", "jobs/smoke.yaml"], isolated_env)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ all"))
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[1] == "2,000"
    assert int(cells[3].replace(",", "")) < int(cells[2].replace(",", ""))  # only assistant tokens train
    assert float(cells[5]) >= 0.95  # packing efficiency of the smoke data at max_seq_len 256


def test_preview_shows_each_rank_its_own_samples(isolated_env):
    ranks = [
        run_cli(
            ["data", "preview", "jobs/smoke.yaml", "-n", "2", "--rank", str(r), "--world-size", "2"],
            isolated_env,
        )
        for r in (0, 1)
    ]
    for result in ranks:
        assert result.returncode == 0, result.stderr
        assert "<|im_start|>assistant" in result.stdout
    assert re.findall(r"rank 0, sample (\d+)", ranks[0].stdout) == ["0", "1"]
    assert re.findall(r"rank 1, sample (\d+)", ranks[1].stdout) == ["0", "1"]
    # The plan gives each rank its own records.
    assert ranks[0].stdout.split("rank 0, sample 0")[1] != ranks[1].stdout.split("rank 1, sample 0")[1]
    bad = run_cli(["data", "preview", "jobs/smoke.yaml", "--rank", "2", "--world-size", "2"], isolated_env)
    assert bad.returncode == 2 and "--rank 2 must be in 0..1" in bad.stderr
