"""scripts/gpu_check.py stays runnable where no GPU is lent.

Its dry mode is the GPU check on CPU (gloo, fp32, DDP and LoRA, each resumed from its middle
checkpoint); the wheel list it computes for the GPU image is checked from the same run, so CI
pays for one set of torchrun starts. Nothing is downloaded here (scripts/gpu_wheels.sh does that).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_check_trains_resumes_exactly_and_lists_the_wheels(isolated_env, tmp_path: Path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--dry", "--out", str(out)],
        cwd=REPO,
        env=isolated_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    logs = (out / "runs.log").read_text()[-4000:] if (out / "runs.log").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + logs
    assert "GPU CHECK PASSED" in (out / "summary.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    results = {r["strategy"]: r for r in summary["results"]}
    assert results.keys() == {"ddp", "lora"}
    for r in results.values():
        assert r["problems"] == [] and r["resume"] == "exact"
        assert r["wrapper"] == "DistributedDataParallel" and r["device"].startswith("cpu")
        assert r["note"]["ray_imported"] is False  # the worker under torchrun never loads Ray

    plan = results["ddp"]["note"]["wheel_plan"]
    carried = {w["name"]: w for w in plan["carry"]}
    needed = {"trl", "datasets", "deepspeed", "pydantic", "pydantic-core", "hjson", "dill", "zstandard"}
    assert needed | {"fsspec", "multiprocess"} <= carried.keys()
    assert not carried.keys() & {"ray", "torch", "transformers", "accelerate", "peft"}
    assert carried["pydantic-core"]["kind"] == carried["multiprocess"]["kind"] == "binary"
    assert carried["trl"]["kind"] == "any"
    assert plan["ray_imported"] is False
    assert plan["installed_total"] == sum(w["installed"] for w in plan["carry"]) > 0
    # Whatever the runs loaded is in the GPU image, carried, or known not to be needed there.
    gpu_check = _gpu_check()
    loaded = set().union(*(r["note"]["versions"] for r in results.values()))
    assert loaded - carried.keys() - gpu_check.IMAGE - gpu_check.NOT_CARRIED.keys() == set()


def test_bench_output_is_read_into_the_summary_table():
    gpu_check = _gpu_check()
    text = (
        "model 1,235.8M params, seq 4096, micro batch 1, 1 process(es), attn sdpa, bf16; "
        "9.49 GFLOP/token; peak 989 TFLOP/s\n"
        "strategy  tokens/s per device     MFU\n"
        "ddp                    41,234   39.6%\n"
        "fsdp2    failed:\n"
        "exit 1, 3 steps logged\n"
        "zero3                  38,000   36.5%\n"
    )
    header, *rows = gpu_check.parse_bench(text)
    assert header["header"].startswith("model 1,235.8M params")
    assert rows == [
        {"strategy": "ddp", "tokens_per_s": 41234.0, "mfu": "39.6%"},
        {"strategy": "zero3", "tokens_per_s": 38000.0, "mfu": "36.5%"},
        {"strategy": "fsdp2", "error": "failed"},
    ]
    table = gpu_check.table([], [header, *rows])
    assert "ddp            41,234 39.6%" in table and "fsdp2    failed (bench.log)" in table
