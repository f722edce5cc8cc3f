"""The hang watchdog's decision (``sft_cluster.driver.watchdog``), its spec section, and the
workers' heartbeats (``sft_cluster.train.heartbeat``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from sft_cluster.driver.node_watch import NodeWatch, collect_node_hangs
from sft_cluster.driver.watchdog import Beat, Hang, Watchdog, first_attempt, py_spy_dump, record_hang
from sft_cluster.spec import WatchdogSpec, load_job
from sft_cluster.tracking import RunDir, read_jsonl
from sft_cluster.train.evaluation import EvalCallback
from sft_cluster.train.heartbeat import BEATS_ENV, Heartbeat, node_sink
from sft_cluster.train.progress import LogSink
from tests.unit.test_spec import MINIMAL, in_tmp, job_errors, write  # noqa: F401 (a fixture)

SPEC = WatchdogSpec(step_timeout_s=100, median_multiple=5, warmup_steps=3, min_limit_s=2)


def _started(dog: Watchdog, ranks: int = 2, at: float = 0.0) -> None:
    for rank in range(ranks):
        dog.observe({"kind": "start", "rank": rank}, at)


def _beat(dog: Watchdog, rank: int, step: int, phase: str, at: float, cycle_s: float | None = None) -> bool:
    event = {"kind": "beat", "rank": rank, "step": step, "phase": phase, "pid": 10 + rank, "node": "n"}
    return dog.observe({**event, "cycle_s": cycle_s}, at)


def _steps(dog: Watchdog, steps: range, step_s: float, start: float = 0.0, ranks: int = 2) -> float:
    """Every rank takes ``steps`` of ``step_s`` each (beats as they begin); the time after."""
    at = start
    for step in steps:
        for rank in range(ranks):
            _beat(dog, rank, step, "step", at, cycle_s=step_s if step > steps.start else None)
        at += step_s
    return at


def test_fixed_limit_until_warm_up_then_median_multiple_within_bounds() -> None:
    dog = Watchdog(SPEC)
    _started(dog)
    assert dog.limit_s("step") == 100  # nothing timed yet
    _steps(dog, range(1, 4), 1.0)
    assert dog.limit_s("step") == 100  # 2 of 3 warm-up steps timed (the first has no predecessor)
    _steps(dog, range(4, 6), 1.0, start=10)
    assert dog.limit_s("step") == pytest.approx(5.0)  # 5 x the median of 1 s
    assert dog.limit_s("saving") == dog.limit_s("evaluating") == 100
    fast = Watchdog(SPEC)
    _started(fast)
    _steps(fast, range(1, 10), 0.01)
    assert fast.limit_s("step") == 2  # never below min_limit_s
    slow = Watchdog(SPEC)
    _started(slow)
    _steps(slow, range(1, 10), 50.0)
    assert slow.limit_s("step") == 100  # never above step_timeout_s


def test_a_quiet_rank_is_a_hang_reported_once_naming_the_rank_behind() -> None:
    dog = Watchdog(SPEC)
    _started(dog)
    at = _steps(dog, range(1, 7), 1.0)
    _beat(dog, 0, 7, "step", at, cycle_s=1.0)  # rank 1 stopped in step 6; rank 0 waits in step 7
    assert dog.check(at + 3.9) is None
    hang = dog.check(at + 5.2)
    assert hang is not None
    assert (hang.rank, hang.step, hang.phase, hang.attempt) == (1, 6, "step", 1)
    assert hang.seconds == pytest.approx(6.2) and hang.limit_s == pytest.approx(5.0)
    assert {r: (b.pid, b.node) for r, b in hang.beats.items()} == {0: (10, "n"), 1: (11, "n")}
    assert "rank 1 hung at step 6" in hang.describe()
    assert dog.check(at + 100) is None  # reported once


def test_saves_and_evaluations_get_the_fixed_limit() -> None:
    dog = Watchdog(SPEC)
    _started(dog)
    at = _steps(dog, range(1, 8), 1.0)
    _beat(dog, 0, 7, "evaluating", at)
    _beat(dog, 1, 7, "saving", at)
    assert dog.check(at + 99) is None
    assert dog.check(at + 101) is not None


def test_beats_of_an_ended_group_never_look_hung() -> None:
    dog = Watchdog(SPEC)
    assert not dog.observe({"kind": "start", "rank": 0}, 0)
    assert _beat(dog, 1, 1, "step", 0)  # consumed, but rank 1 has not started: not watched
    assert dog.check(1000) is None
    _started(dog)
    at = _steps(dog, range(1, 3), 1.0)
    dog.observe({"kind": "worker_failed", "rank": 1, "reason": "killed"}, at)
    _beat(dog, 0, 3, "step", at)  # a straggler of the failed group
    assert dog.check(at + 1000) is None
    _started(dog, at=at)  # the new group: attempt 2
    _beat(dog, 0, 3, "step", at)
    assert dog.attempt == 2
    _beat(dog, 0, 3, "done", at + 1)  # training ended: no longer watched
    assert dog.check(at + 1000) is None


@pytest.mark.usefixtures("in_tmp")
def test_the_spec_section() -> None:
    job = load_job(write(MINIMAL))
    assert job.watchdog.step_timeout_s == 1800 and job.watchdog.collective_timeout_s == 2100
    tight = load_job(write(MINIMAL), ("watchdog.step_timeout_s=5", "watchdog.min_limit_s=2"))
    assert tight.watchdog.collective_timeout_s == 305
    assert job_errors(MINIMAL, ("watchdog.min_limit_s=120", "watchdog.step_timeout_s=60")) == [
        "error: jobs/smoke.yaml: watchdog.min_limit_s = 120 is above watchdog.step_timeout_s = 60: "
        "the limit after warm-up lies between the two "
        "(lower watchdog.min_limit_s or raise watchdog.step_timeout_s)"
    ]
    errors = job_errors(MINIMAL + "watchdog: {median_multiple: 1, step_timeout_s: 0, tick: 1}\n")
    assert errors == [
        "error: jobs/smoke.yaml: watchdog.step_timeout_s = 0: must be greater than 0",
        "error: jobs/smoke.yaml: watchdog.median_multiple = 1: must be greater than 1",
        "error: jobs/smoke.yaml: unknown key 'watchdog.tick' (valid keys: enabled, step_timeout_s, "
        "median_multiple, warmup_steps, min_limit_s)",
    ]


class _Sink:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def emit(self, event: dict) -> None:
        self.events.append(event)


def test_heartbeats_of_a_rank_and_the_node_files_the_torchrun_watcher_reads(tmp_path, monkeypatch) -> None:
    recorded: list[dict] = []
    sink, evaluator = _Sink(), EvalCallback(lambda: [], 2, on_event=recorded.append)
    evaluator.evaluate = lambda: 1.5  # the evaluation itself is not what is tested here
    beats = Heartbeat(sink, 1, evaluator)
    state, plain, saving = (
        SimpleNamespace(global_step=4),
        SimpleNamespace(should_save=False),
        SimpleNamespace(should_save=True),
    )
    beats.on_step_begin(None, state, plain)
    beats.on_step_end(None, state, plain)  # nothing long: no beat
    beats.on_step_begin(None, state, plain)
    evaluator.on_step_end(
        None, SimpleNamespace(global_step=4, max_steps=10), SimpleNamespace(should_log=False)
    )
    assert [(e["event"], e["step"]) for e in recorded] == [("eval_started", 4), ("eval_finished", 4)]
    beats.on_step_end(None, state, saving)
    beats.on_step_begin(None, state, plain)
    beats.on_train_end(None, state, plain)
    assert [(e["phase"], e["step"]) for e in sink.events] == [
        ("step", 5),
        ("step", 5),
        ("evaluating", 4),
        ("step", 4),
        ("saving", 4),
        ("step", 5),
        ("done", 4),
    ]
    cycles = [e["cycle_s"] for e in sink.events if "cycle_s" in e]
    assert cycles[0] is None and cycles[1] >= 0 and cycles[2] is None  # none over an evaluation or save
    assert {(e["rank"], e["pid"]) for e in sink.events} == {(1, os.getpid())}

    # torchrun: start and beat events go to the rank's file, everything but beats on to the log sink.
    assert node_sink(sink) is sink
    monkeypatch.setenv(BEATS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    inner = _Sink()
    files = node_sink(inner)
    for event in ({"kind": "start", "rank": 3}, sink.events[0], {"kind": "notice", "message": "hi"}):
        files.emit(event)
    lines = [json.loads(line) for line in (tmp_path / "rank-3.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in lines] == ["start", "beat"]
    assert [e["kind"] for e in inner.events] == ["start", "notice"]
    LogSink().emit(sink.events[0])  # a beat is nothing to log


def test_a_stopped_process_is_dumped_recorded_and_the_next_driver_numbers_after_it(tmp_path) -> None:
    source = "import time\ndef nap():\n    print('in nap', flush=True); time.sleep(60)\nnap()"
    sleeper = subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline() == "in nap\n"
        sleeper.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30  # a signal is delivered when the kernel gets to it
        while psutil.Process(sleeper.pid).status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, "the sleeper never stopped"
            time.sleep(0.05)
        text = py_spy_dump(sleeper.pid, timeout_s=30)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert text.startswith(f"pid {sleeper.pid} on ") and "state T (stopped)" in text
    assert "nap (<string>:3)" in text, text  # py-spy read the frames of a stopped process

    run = RunDir(str(tmp_path))
    assert first_attempt(run) == 1
    beat = Beat(6, "step", 0.0, sleeper.pid, "n")
    hang = Hang(1, 6, "step", 6.2, 5.0, 2, {1: beat})
    folder = record_hang(run, hang, {0: "zero", 1: text})
    assert folder == str(tmp_path / "hangs" / "attempt-2")
    assert (tmp_path / "hangs" / "attempt-2" / "rank-1.txt").read_text() == text
    (event,) = read_jsonl(run.events)
    assert event["event"] == "hang" and (event["rank"], event["step"], event["attempt"]) == (1, 6, 2)
    assert event["stacks"] == folder and event["seconds"] == 6.2 and event["limit_s"] == 5.0
    assert first_attempt(run) == 3  # a later driver never writes over attempt-2


def test_two_nodes_hangs_reach_the_events_once_each_through_the_first_nodes_driver(tmp_path) -> None:
    """Each torchrun node's watcher records its hang in an object of its own; the first node's
    driver appends them, and a record written after it collected is appended by the next one."""
    run = RunDir(str(tmp_path))
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in (0, 1)]

    def hang_on(watch: NodeWatch, rank: int) -> None:  # each node's one rank, a sleeper here
        beat = Beat(14, "step", 0.0, sleepers[rank].pid, f"node-{rank}")
        watch._end(Hang(rank, 14, "step", 6.0 + rank, 5.0, watch.attempt, {rank: beat}))
        assert sleepers[rank].wait(timeout=10) == -signal.SIGKILL

    try:
        with NodeWatch(SPEC, run, node_rank=0) as first, NodeWatch(SPEC, run, node_rank=1) as second:
            assert first.attempt == second.attempt == 1
            hang_on(first, 0)
            first_collection = collect_node_hangs(run)  # the first node's agent ended first
            hang_on(second, 1)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
    assert [r["node_rank"] for r in first_collection] == [0]
    assert [r["node_rank"] for r in collect_node_hangs(run)] == [1]  # the late one, at the next start
    assert collect_node_hangs(run) == []
    events = read_jsonl(run.events)
    assert [(e["event"], e["rank"], e["node"], e["node_rank"]) for e in events] == [
        ("hang", 0, "node-0", 0),
        ("hang", 1, "node-1", 1),
    ]
    assert sorted(os.listdir(tmp_path / "hangs" / "attempt-1")) == [
        "node-0.json",
        "node-1.json",
        "rank-0.txt",
        "rank-1.txt",
    ]
    described = Hang.from_event(events[1]).describe()
    assert described == "rank 1 hung at step 14 (step): no heartbeat for 7.0 s (limit 5.0 s)"
    assert first_attempt(run) == 2
