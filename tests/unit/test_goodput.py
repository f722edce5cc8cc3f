"""The goodput report's time split on a made-up timeline whose every part is known."""

from __future__ import annotations

import pytest

from sft_cluster.tracking.goodput import PARTS, describe_split, time_split


def _record(step: int, at: float, wait: float = 0.0, held: float = 0.0) -> dict:
    return {"step": step, "time": at, "data_wait_s": wait, "checkpoint_s": held}


def test_every_second_of_a_run_with_two_restarts_lands_in_its_part():
    # Start at 100; steps 1-4 every 2 s from 110; a save after step 2 held the steps 0.5 s; step 3
    # waited 0.25 s for data; an evaluation ran 0.75 s during step 4.
    records = [_record(1, 110), _record(2, 112), _record(3, 114.5, wait=0.25, held=0.5), _record(4, 116)]
    events = [
        {"event": "eval_started", "step": 4, "time": 115},
        {"event": "eval_finished", "step": 4, "time": 115.75},
    ]
    # Attempt 1 logged steps 5-7 (dropped, lost) until 122, died; attempt 2 resumed from step 4 at 130,
    # logged step 5 at 133 and died; attempt 3 resumed from step 4 at 140 and logged step 5 at 143.
    events += [
        {"event": "resumed", "step": 4, "time": 130, "lost_steps": 3, "failed_at": 122},
        {"event": "resumed", "step": 4, "time": 140, "lost_steps": 1, "failed_at": 133},
    ]
    records += [_record(5, 143), _record(6, 145)]
    split = time_split(records, events, started_at=100, ended_at=150)
    assert split["startup_seconds"] == 10  # to the first step logged
    assert split["data_wait_seconds"] == 0.25
    assert split["checkpoint_seconds"] == 0.5
    assert split["evaluation_seconds"] == 0.75
    assert split["lost_seconds"] == (122 - 116) + (133 - 130)  # each attempt to its last record
    assert split["restart_seconds"] == (130 - 122) + (140 - 133) + (143 - 140)
    assert split["productive_seconds"] == 6 - 0.25 - 0.5 - 0.75 + 2  # steps 2-4 and 6
    assert split["finish_seconds"] == 5
    assert split["unaccounted_seconds"] == 0
    assert sum(split[f"{part}_seconds"] for part in PARTS) == pytest.approx(split["wall_seconds"])
    assert split["goodput"] == round(split["productive_seconds"] / 50, 4)
    line = describe_split(split)
    assert line.startswith("13.0% (6.5 s training); restart 18.0 s, startup 10.0 s, lost 9.0 s")


def test_a_resumed_drive_starts_its_own_timeline():
    """Records of an earlier drive are the history, not this one's time; its restart is start-up."""
    records = [_record(1, 10), _record(2, 12), _record(3, 105), _record(4, 107)]
    events = [{"event": "resumed", "step": 2, "time": 103}]
    split = time_split(records, events, started_at=100, ended_at=110)
    assert split["startup_seconds"] == 5 and split["restart_seconds"] == 0
    assert split["productive_seconds"] == 2 and split["finish_seconds"] == 3
    assert time_split([], [], 100, 104)["startup_seconds"] == 4
