"""The doctor's pure parts: what the probe prints, version agreement, stack dumps, sinfo's GRES column."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sft_cluster.launch.doctor import PROBE_SOURCE, check_stacks, parse_probe, ptrace_facts, versions_agree
from sft_cluster.launch.probes import _gres_gpus


def test_the_probe_runs_on_the_standard_library_and_is_read_back():
    result = subprocess.run(
        [sys.executable, "-S", "-c", PROBE_SOURCE], capture_output=True, text=True, check=True
    )
    found = parse_probe("noise\n" + result.stdout + "more noise\n")
    assert set(found["versions"]) == {"ray", "torch", "transformers", "trl"}
    assert found["cpus"] >= 1 and found["staging_free_bytes"] > 0
    assert {k: found[k] for k in ("ptrace_scope", "ptrace_capable")} == ptrace_facts()


@pytest.mark.parametrize(
    "scope,capable,ok",
    [
        (None, False, True),
        (0, False, True),
        (1, False, True),
        (2, True, True),
        (2, False, False),
        (3, True, False),
    ],
)
def test_stacks_check_follows_yamas_scope_and_the_users_right_to_trace(scope, capable, ok):
    check = check_stacks({"ptrace_scope": scope, "ptrace_capable": capable}, "on node-3")
    assert check.ok is ok and check.name == "stacks"
    assert ("no Yama" if scope is None else f"kernel.yama.ptrace_scope={scope}") in check.detail
    if not ok:
        assert "on node-3" in check.detail and "without the workers' stacks" in check.detail
        assert "CAP_SYS_PTRACE" in check.fix and "ptrace_scope to 1 or less" in check.fix


def test_versions_agree_on_major_minor_and_name_the_pins():
    here = {"ray": "2.60.0", "torch": "2.13.0+cpu", "transformers": "5.1.0", "trl": "0.29.1"}
    assert versions_agree(here, {**here, "ray": "2.60.1", "torch": "2.13.0+cu128"}, "on the cluster").ok
    bad = versions_agree(here, {**here, "transformers": "4.57.0", "trl": None}, "on the cluster")
    assert not bad.ok
    assert "transformers 5.1.0 here, 4.57.0 on the cluster" in bad.detail
    assert "trl 0.29.1 here, missing on the cluster" in bad.detail
    assert "pip install transformers==5.1.0 trl==0.29.1 on the cluster" in bad.fix


def test_gpus_per_node_from_sinfo_gres():
    assert _gres_gpus("gpu:h100:8(S:0-1)") == 8
    assert _gres_gpus("gpu:4,shard:8") == 4
    assert _gres_gpus("(null)") == 0
