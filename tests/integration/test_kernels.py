"""``strategy.compile``: torch.compile (inductor) really trains the smoke job on 2 CPU workers.

The compiled run must give the eager run's losses over the same steps, and compile
once: a packed row is always micro_batch x max_seq_len tokens with position_ids and
no attention mask, so no batch has a new shape to recompile for (TORCH_LOGS=recompiles
would print "Recompiling function ..."). ``strategy.liger`` needs CUDA: its refusals
are in tests/unit (test_spec.py, test_claim.py) and its run in scripts/gpu_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import isolated_environment, max_weight_diff, run_torchrun

STEPS = 6
COMMON = [
    f"train.max_steps={STEPS}",
    f"checkpoint.every_n_steps={STEPS}",
    "tracking=none",
]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("kernels")
    env = {**isolated_environment(tmp / "home"), "TORCH_LOGS": "recompiles"}
    outs = {}
    for name, extra in (("eager", []), ("compiled", ["strategy.compile=true"])):
        outs[name] = tmp / name
        result = run_torchrun(Path("jobs/smoke.yaml"), env, *COMMON, *extra, f"output_uri={outs[name]}")
        assert result.returncode == 0, f"{name}: " + result.stdout[-3000:] + result.stderr[-3000:]
    return outs["eager"], outs["compiled"], result.stderr


def test_compile_really_compiles_once(runs):
    eager, compiled, stderr = runs
    reports = [json.loads(p.read_text()) for p in sorted((compiled / "workers").glob("rank-*.json"))]
    assert [r["world_size"] for r in reports] == [2, 2]
    for report in reports:
        assert report["model_wrapper"] == "OptimizedModule"  # accelerate's torch.compile around DDP
        assert report["compiled_graphs"] > 0
    assert "Recompiling function" not in stderr
    assert json.loads((compiled / "strategy.json").read_text())["accelerate"]["torch_compile"] is True
    eager_report = json.loads((eager / "workers" / "rank-00000.json").read_text())
    assert eager_report["model_wrapper"] == "DistributedDataParallel"
    assert "compiled_graphs" not in eager_report


def test_compiled_losses_match_eager(runs):
    eager, compiled, _ = runs
    reference, losses = _losses(eager), _losses(compiled)
    assert len(losses) == len(reference) == STEPS
    # Measured on 2 CPU workers: equal, bitwise; the bound leaves inductor room to reorder fp32 sums.
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True)) <= 1e-5
    # final/ holds plain Hugging Face names (no "_orig_mod." from the compiled wrapper).
    assert max_weight_diff(compiled, eager) <= 1e-5
