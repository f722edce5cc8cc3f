"""`sft-cluster data stats|preview` on the shipped smoke data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sft_cluster.data.inspect import best_fit_bins
from sft_cluster.spec import resolve_builtin
from tests.conftest import run_cli
from tests.fixtures.families import build_family


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
    assert 0 < int(cells[3].replace(",", "")) < int(cells[2].replace(",", ""))  # only assistant tokens train
    assert cells[4] == "0"  # no sample without a trained token
    assert float(cells[6]) >= 0.95  # packing efficiency of the smoke data at max_seq_len 256
    assert "assistant mask: markers" in result.stdout


def _tokenizer_with(folder: Path, template: str | None) -> Path:
    """The shipped tiny tokenizer with another chat template (None: a base model's, without one)."""
    from transformers import AutoTokenizer

    from sft_cluster.spec.templates import read_template

    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    tokenizer.chat_template = read_template(template) if template else None
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family,method", [("qwen2_5", "trl_variant"), ("llama3_1", "prefix")])
def test_a_family_folder_shows_the_trained_tokens_of_its_own_template(isolated_env, tmp_path, family, method):
    """A real family's model folder (its original template, no markers): the mask is found."""
    folder = build_family(family, tmp_path / family)
    result = run_cli(["data", "stats", "jobs/smoke.yaml", f"model.name_or_path={folder}"], isolated_env)
    assert result.returncode == 0, result.stderr
    assert f"assistant mask: {method}" in result.stdout
    cells = [c.strip() for c in result.stdout.split("│ all")[1].splitlines()[0].strip("│ ").split("│")]
    # The smoke data's 3,000-odd assistant turns: each its content and end-of-turn token at least.
    assert int(cells[2].replace(",", "")) > 8000 and cells[3] == "0"


def test_a_base_tokenizer_is_refused_until_a_template_is_named(isolated_env, tmp_path):
    base = _tokenizer_with(tmp_path / "base", None)
    refused = run_cli(
        ["run", "jobs/smoke.yaml", f"model.tokenizer={base}", f"output_uri={tmp_path}/run"], isolated_env
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "has no chat template" in refused.stderr and "model.chat_template" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "run").exists()
    named = run_cli(
        [
            "data",
            "preview",
            "jobs/smoke.yaml",
            "-n",
            "1",
            f"model.tokenizer={base}",
            "model.chat_template=chatml",
        ],
        isolated_env,
    )
    assert named.returncode == 0, named.stderr
    assert "assistant mask: markers" in named.stdout
    assert int(re.search(r"(\d+) trained", named.stdout).group(1)) > 0


def test_a_source_that_trains_nothing_is_refused_before_training(isolated_env, tmp_path):
    data = tmp_path / "prompts.jsonl"
    long_prompt = {"role": "user", "content": "word " * 400}
    data.write_text(json.dumps({"messages": [long_prompt, {"role": "assistant", "content": "ok"}]}) + "\n")
    result = run_cli(
        [
            "run",
            "jobs/smoke.yaml",
            f"data.sources[0].uri={data}",
            "data.truncation=truncate",
            f"output_uri={tmp_path}/run",
        ],
        isolated_env,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"data.sources[0] ({data}): none of its first 1 samples has a token to train on" in result.stderr
    assert not (tmp_path / "run").exists()


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
