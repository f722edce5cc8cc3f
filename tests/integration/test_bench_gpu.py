"""bench/gpu.py stays runnable where no GPU is lent: the tiny model on 2 CPU processes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


# Opt-in (`-m slow`): the GPU check's dry run (test_gpu_check.py) already runs the script's parts on CPU.
@pytest.mark.slow
def test_gpu_bench_runs_each_strategy_on_cpu(isolated_env):
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--cpu", "--tiny", "--steps", "6", "--warmup", "2"]
        + ["--strategies", "ddp", "fsdp2"],
        cwd=REPO,
        env=isolated_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed" not in result.stdout, result.stdout
    assert re.search(r"model [\d.]+M params, seq 256, micro batch 1, 2 process\(es\)", result.stdout)
    rows = dict(re.findall(r"^(ddp|fsdp2)\s+([\d,]+)\s+n/a$", result.stdout, flags=re.M))
    assert rows.keys() == {"ddp", "fsdp2"}, result.stdout
    assert all(int(value.replace(",", "")) > 0 for value in rows.values())
