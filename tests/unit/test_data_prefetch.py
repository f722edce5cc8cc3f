"""The prefetch thread: the same rows and cursors as the synchronous stream, errors raised where the
rows are consumed, a bounded read-ahead, a thread that stops, and window bookkeeping that stays
bounded by the rows in flight."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from sft_cluster.data import DataError, build_plan
from sft_cluster.data import prefetch as prefetch_module
from sft_cluster.data.prefetch import Prefetcher
from sft_cluster.data.stream import PackedDataset
from tests.unit.test_data_plan import STORE, FakeEncoder, record, spec, write_corpus


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sft-cluster-prefetch")]


@pytest.fixture
def corpus(tmp_path):
    files = [[record(i, filler=i % 7, answer=1 + i % 5) for i in range(k, k + 60)] for k in (0, 100)]
    data = spec((write_corpus(tmp_path, "c", files, [False, True]), 1.0))
    return data, build_plan(data, STORE, 2, 3, chunk_bytes=500)


def _dataset(corpus, prefetch: int, state=None) -> PackedDataset:
    data, plan = corpus
    data = data.model_copy(update={"prefetch_rows": prefetch})
    return PackedDataset(plan, 1, data, STORE, FakeEncoder(), state, window_rows=3)


@pytest.mark.parametrize("consumed", [0, 5, 9, 17])
def test_prefetched_rows_and_cursors_equal_the_synchronous_ones(corpus, consumed):
    sync = iter(_dataset(corpus, prefetch=0))
    expected = [next(sync)["input_ids"] for _ in range(consumed + 12)]
    ahead = _dataset(corpus, prefetch=4)
    rows = iter(ahead)
    got = [next(rows)["input_ids"] for _ in range(consumed + 2)]  # the DataLoader reads ahead too
    time.sleep(0.2)  # the producer runs ahead as far as the queue lets it
    assert ahead.rows.rows_out > consumed + 2
    state = json.loads(json.dumps(ahead.state_after(consumed)))
    resumed = iter(_dataset(corpus, prefetch=4, state=state))
    got_after = [next(resumed)["input_ids"] for _ in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=False))
    assert all(torch.equal(a, b) for a, b in zip(got_after, expected[consumed:], strict=True))
    rows.close()
    resumed.close()


def test_the_read_ahead_is_bounded_and_the_thread_stops(corpus):
    dataset = _dataset(corpus, prefetch=5)
    rows = iter(dataset)
    next(rows)
    time.sleep(0.3)
    # One row in the consumer's hands, five queued, one held by the blocked producer.
    assert dataset.rows.rows_out - dataset.consumed <= 6
    assert len(_threads()) == 1
    rows.close()  # what a DataLoader's dropped iterator does
    assert _threads() == []
    assert dataset.state_dict()["rows"] == 1


def test_the_wait_is_counted_with_or_without_the_thread(corpus):
    for prefetch in (0, 4):
        dataset = _dataset(corpus, prefetch)
        rows = iter(dataset)
        for _ in range(6):
            next(rows)
        assert dataset.wait_s > 0
        rows.close()


def test_a_bad_record_is_raised_in_the_consumer_with_its_line(tmp_path):
    lines = [json.dumps(record(i)) for i in range(30)]
    lines[20] = "{not json"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    data = spec((str(tmp_path / "bad.jsonl"), 1.0)).model_copy(update={"prefetch_rows": 2})
    dataset = PackedDataset(build_plan(data, STORE, 1, 0), 0, data, STORE, FakeEncoder())
    with pytest.raises(DataError, match=r"bad\.jsonl:21: malformed JSON"):
        for _ in range(100):
            next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert _threads() == []


def test_forgetting_keeps_the_windows_bounded_by_the_rows_in_flight(corpus):
    dataset = _dataset(corpus, prefetch=6)
    rows = iter(dataset)
    for step in range(1, 120):  # several epochs of this rank's share
        next(rows)
        dataset.forget(step - 1)  # the step before this one is done with
        assert len(dataset.rows._windows) <= 4  # windows of 3 rows over 1 + 6 + 1 rows in flight
    assert dataset.state_after(119)["rows"] == 119
    with pytest.raises(ValueError, match="older than the oldest cursor kept"):
        dataset.state_after(100)
    rows.close()


def test_a_prefetcher_keeps_order_and_refuses_no_depth():
    assert list(Prefetcher(iter(range(50)), depth=3)) == list(range(50))
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(iter(()), depth=0)


def test_closing_leaves_a_stuck_producer_behind_with_a_warning(monkeypatch, caplog):
    """A storage read that never returns must not hold up the end of training."""
    monkeypatch.setattr(prefetch_module, "_JOIN_S", 0.2)
    release = threading.Event()

    def stuck():
        yield 1
        release.wait()  # the read that never returns
        yield 2

    ahead = Prefetcher(stuck(), depth=2)
    assert next(ahead) == 1
    started = time.monotonic()
    ahead.close()
    assert time.monotonic() - started < 5
    assert "did not stop within 0.2 s" in caplog.text
    release.set()


class SlowEncoder(FakeEncoder):
    """Slow enough that the consumer catches up with the producer in the middle of a window."""

    def encode(self, conversation, tools=None):
        time.sleep(0.002)
        return super().encode(conversation, tools)


def test_every_cursor_under_prefetch_is_the_synchronous_cursor(corpus):
    """Window boundaries included: there the cursor is the saved state of the last packed window,
    never the state of the window the producer is packing at that moment."""
    data, plan = corpus
    ahead = PackedDataset(
        plan, 1, data.model_copy(update={"prefetch_rows": 1}), STORE, SlowEncoder(), window_rows=3
    )
    rows = iter(ahead)
    at_boundary = 0
    for consumed in range(40):
        sync = _dataset(corpus, prefetch=0)
        sync_rows = iter(sync)
        for _ in range(consumed):
            next(sync_rows)
        at_boundary += consumed == ahead.rows._next_window
        assert ahead.state_after(consumed) == sync.state_dict(), consumed
        next(rows)
    assert at_boundary >= 3  # the case this test is for happened
    rows.close()
