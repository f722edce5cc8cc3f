"""The doctor's pure parts: what the probe prints, version agreement, sinfo's GRES column."""

from __future__ import annotations

import subprocess
import sys

from sft_cluster.launch.doctor import PROBE_SOURCE, parse_probe, versions_agree
from sft_cluster.launch.probes import _gres_gpus


def test_the_probe_runs_on_the_standard_library_and_is_read_back():
    result = subprocess.run(
        [sys.executable, "-S", "-c", PROBE_SOURCE], capture_output=True, text=True, check=True
    )
    found = parse_probe("noise\n" + result.stdout + "more noise\n")
    assert set(found["versions"]) == {"ray", "torch", "transformers", "trl"}
    assert found["cpus"] >= 1 and found["staging_free_bytes"] > 0


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
