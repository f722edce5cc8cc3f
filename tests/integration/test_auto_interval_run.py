"""``checkpoint.every_n_steps: auto`` on a real run (the smoke job, 2 workers under torchrun): it says
which interval it chose, and the committed checkpoints are exactly at the steps that choice gives.
The choice itself (Daly's optimum from the measured step and stall) is unit-tested in
tests/unit/test_auto_interval.py; here the measuring save, the all-reduce and the schedule run for real.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import isolated_environment, run_torchrun

STEPS = 24
CHOSEN = re.compile(r"checkpoint\.every_n_steps = auto: every (\d+) steps \([^)]*\) from step (\d+)")


def test_auto_interval_checkpoints_where_it_says(tmp_path):
    out = tmp_path / "run"
    result = run_torchrun(
        Path("jobs/smoke.yaml"),
        isolated_environment(tmp_path / "home"),
        f"train.max_steps={STEPS}",
        "train.eval_every_n_steps=null",
        "checkpoint.every_n_steps=auto",
        "checkpoint.mttf_hours=0.002",  # 7.2 s: an interval of a few steps on the smoke job
        "checkpoint.keep_last=100",
        "tracking=none",
        f"output_uri={out}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [chosen] = CHOSEN.findall(result.stdout + result.stderr)
    every, measured_at = int(chosen[0]), int(chosen[1])
    assert 1 <= every < STEPS and 3 <= measured_at < STEPS
    committed = {
        int(folder.name.removeprefix("step-"))
        for folder in (out / "checkpoints").glob("step-*")
        if (folder / "COMMITTED").exists()
    }
    scheduled = set(range(measured_at, STEPS + 1, every))
    assert len(scheduled) >= 2 and scheduled <= committed  # here: every 3 from step 3
    assert committed - scheduled <= {STEPS}  # the last step is always saved
