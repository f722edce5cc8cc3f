"""``checkpoint.every_n_steps: auto``: Daly's interval minimises the expected loss, and the callback
saves once after warm-up to measure the stall, then at the chosen steps, and says why."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from sft_cluster.spec import SpecError, load_job
from sft_cluster.train import interval
from sft_cluster.train.interval import AutoInterval, daly_interval_s, expected_goodput


@pytest.mark.parametrize(("stall", "mttf"), [(10.0, 86400.0), (30.0, 3600.0), (120.0, 7200.0)])
def test_daly_interval_is_where_the_expected_goodput_peaks(stall, mttf):
    chosen = daly_interval_s(stall, mttf)
    assert math.sqrt(2 * stall * mttf) * 0.9 < chosen < math.sqrt(2 * stall * mttf) * 1.1  # near Young's
    peak = max(expected_goodput(tau, stall, mttf, restart_s=300) for tau in range(1, 20000))
    assert expected_goodput(chosen, stall, mttf, restart_s=300) > peak - 0.001  # within 0.1 point
    assert expected_goodput(chosen / 3, stall, mttf, restart_s=300) < peak - 0.005  # and it matters
    assert expected_goodput(chosen * 3, stall, mttf, restart_s=300) < peak - 0.005
    assert daly_interval_s(3 * mttf, mttf) == mttf  # stalls longer than failures: one per failure


def test_the_callback_measures_then_saves_at_the_chosen_steps(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(interval.time, "monotonic", lambda: clock[0])
    said: list[str] = []
    auto = AutoInterval(mttf_hours=1, warm_up_steps=5, notify=said.append)
    state, saved = SimpleNamespace(global_step=100), []  # a resumed attempt: steps count from 101
    for step in range(101, 2000):
        control = SimpleNamespace(should_save=False)
        auto.on_step_begin(None, state, control)
        clock[0] += 1.0  # every step takes 1 s
        state.global_step = step
        auto.on_step_end(None, state, control)
        if control.should_save:
            saved.append(step)
            clock[0] += 30.0  # the save stalls 30 s before the next step begins
    every = round(daly_interval_s(30.0, 3600.0))  # 1 s steps: as many steps as seconds
    assert every == 445
    assert saved[:3] == [105, 105 + every, 105 + 2 * every]
    assert said == [
        "checkpoint.every_n_steps = auto: every 445 steps (7.4 min) from step 105; measured step "
        "1.000 s, checkpoint stall 30.00 s, checkpoint.mttf_hours 1 (Daly's optimum 7.4 min)"
    ]


def test_auto_needs_the_mean_time_between_failures():
    with pytest.raises(SpecError, match="needs checkpoint.mttf_hours"):
        load_job("jobs/smoke.yaml", ["checkpoint.every_n_steps=auto"])
    with pytest.raises(SpecError, match="used only with checkpoint.every_n_steps = auto"):
        load_job("jobs/smoke.yaml", ["checkpoint.mttf_hours=24"])
    with pytest.raises(SpecError, match="'often': must be a positive number of steps, or auto"):
        load_job("jobs/smoke.yaml", ["checkpoint.every_n_steps=often"])
    job = load_job("jobs/smoke.yaml", ["checkpoint.every_n_steps=auto", "checkpoint.mttf_hours=24"])
    assert job.checkpoint.every_n_steps == "auto"
