"""Shard plan, per-rank streams and packed rows: every record once per epoch, exact resume.

Most tests use ``FakeEncoder`` (ids name the record, one token per word) so a
property test can run hundreds of streams in seconds; the packing-efficiency
test uses the real tiny chat tokenizer shipped in the package.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sft_cluster.data import DataError, build_plan, make_plan, plan_changes, same_listing
from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.packing import IGNORE_INDEX, best_fit, pack
from sft_cluster.data.plan import ShardPlan
from sft_cluster.data.plan_files import decode
from sft_cluster.data.reader import RankStream, read_unit
from sft_cluster.data.records import ObjectInfo, source_options
from sft_cluster.data.stream import PackedDataset, PackedRowStream
from sft_cluster.spec import DataSpec, StorageSpec, resolve_builtin

STORE = StorageSpec()
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeEncoder:
    """ChatEncoder stand-in: a user turn "ID words..." gives [10 + ID, 7, 7, ...], untrained;
    each assistant word is one trained token 8."""

    pad_token_id = 0
    eos_token_id = 1

    @property
    def tokenizer(self):
        return self

    def encode(self, conversation, tools=None):
        ids, mask = [], []
        for turn in conversation:
            words = turn["content"].split()
            trained = turn["role"] == "assistant"
            ids += [8 if trained else (10 + int(w) if w.isdigit() else 7) for w in words]
            mask += [int(trained)] * len(words)
        return ids, mask


def record(rid: int, filler: int = 2, answer: int = 2) -> dict:
    return {
        "messages": [
            {"role": "user", "content": " ".join([str(rid), *["x"] * filler])},
            {"role": "assistant", "content": " ".join(["y"] * max(answer, 1))},
        ]
    }


def write_corpus(root: Path, name: str, files: list[list[dict]], gz: list[bool], blanks: bool = False) -> str:
    """JSONL files (some gzipped) under ``root/name``; returns a glob over them."""
    (root / name).mkdir(parents=True)
    for index, (rows, compressed) in enumerate(zip(files, gz, strict=True)):
        text = "".join(
            json.dumps(r) + ("\n\n" if blanks and i % 3 == 1 else "\n") for i, r in enumerate(rows)
        )
        path = root / name / f"part-{index:03d}.jsonl"
        if compressed:
            path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
    return str(root / name / "part-*")


def spec(*sources: tuple[str, float], **extra) -> DataSpec:
    return DataSpec.model_validate(
        {"sources": [{"uri": uri, "weight": weight} for uri, weight in sources], "max_seq_len": 64, **extra}
    )


def unit_record_ids(plan: ShardPlan, data: DataSpec, source: int, rank: int) -> list[int]:
    """What ``rank`` owns of ``source`` by the plan, read unit by unit, unshuffled."""
    ids = []
    for unit in plan.sources[source].ranks[rank]:
        obj = plan.sources[source].objects[unit.file]
        records, _ = read_unit(obj, unit, None, source_options(data.sources[source], data, STORE))
        ids += [int(json.loads(raw)["messages"][0]["content"].split()[0]) for _, raw in records]
    return ids


@st.composite
def corpora(draw, first_id: int = 0):
    """Record groups (one per file), gzip flags and whether to add blank lines."""
    counts = draw(st.lists(st.integers(1, 25), min_size=1, max_size=4))
    ids = iter(range(first_id, first_id + sum(counts)))
    files = [
        [record(next(ids), draw(st.integers(0, 12)), draw(st.integers(1, 8))) for _ in range(count)]
        for count in counts
    ]
    return files, draw(st.lists(st.booleans(), min_size=len(files), max_size=len(files))), draw(st.booleans())


@FAST
@given(corpora(), st.integers(1, 400), st.integers(1, 4), st.integers(0, 2**32))
def test_every_record_goes_to_exactly_one_rank(corpus, chunk_bytes, world_size, seed):
    files, gz, blanks = corpus
    with tempfile.TemporaryDirectory() as tmp:
        data = spec((write_corpus(Path(tmp), "c", files, gz, blanks), 1.0))
        plan = build_plan(data, STORE, world_size, seed, chunk_bytes=chunk_bytes)
        expected = sorted(int(r["messages"][0]["content"].split()[0]) for rows in files for r in rows)
        owned = {rank: unit_record_ids(plan, data, 0, rank) for rank in range(world_size)}
        assert sorted(i for ids in owned.values() for i in ids) == expected
        # The streams agree with the plan: each rank's first epoch is what it owns, once each.
        streamed = []
        for rank in range(world_size):
            stream = RankStream(plan, rank, data, STORE, FakeEncoder())
            if not owned[rank]:  # tiny data: a rank with nothing to read fails loudly, never loops
                with pytest.raises(DataError, match=f"gave rank {rank} no sample"):
                    next(stream)
                continue
            epoch = []
            while (sample := next(stream)).epoch == 0:
                epoch.append(sample.input_ids[0] - 10)
            assert sorted(epoch) == sorted(owned[rank])
            streamed += epoch
        assert sorted(streamed) == expected


@FAST
@given(
    st.lists(st.integers(0, 5000), min_size=1, max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.integers(1, 2000),
    st.integers(1, 6),
    st.integers(0, 2**32),
)
def test_plan_is_a_deterministic_partition_of_the_bytes(sizes, compressed, chunk_bytes, world_size, seed):
    listing = [
        [ObjectInfo(f"/d/f{i}.jsonl" + (".gz" if compressed[i] else ""), n) for i, n in enumerate(sizes)]
    ]
    assume(any(sizes))
    data = spec(("/d/f*", 1.0))
    plan = make_plan(data, listing, world_size, seed, chunk_bytes)
    assert plan.to_json() == make_plan(data, listing, world_size, seed, chunk_bytes).to_json()
    assert ShardPlan.from_json(plan.to_json()) == plan
    assert len(plan.sources[0].ranks) == world_size and all(plan.sources[0].ranks)
    # Every byte of every object, each (stride) slot once: ranges tile [0, size).
    pieces: dict[int, Counter] = {}
    for units in plan.sources[0].ranks:
        for unit in units:
            end = sizes[unit.file] if unit.end is None else unit.end
            assert unit.end is None or (not compressed[unit.file] and end - unit.start <= chunk_bytes)
            pieces.setdefault(unit.file, Counter())[(unit.start, end, unit.stride)] += 1
    for file, counter in pieces.items():
        spans = sorted(counter)
        assert spans[0][0] == 0 and spans[-1][1] == sizes[file]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(counter[span] == span[2] for span in spans)
    assert set(pieces) == {i for i, n in enumerate(sizes) if n}


def test_plan_changes_with_the_seed_and_reports_listing_changes():
    listing = [[ObjectInfo(f"/d/f{i}.jsonl", 1000 + i, "v1") for i in range(12)]]
    data = spec(("/d/f*", 1.0))
    plans = [make_plan(data, listing, 3, seed, chunk_bytes=300) for seed in range(4)]
    assert len({json.dumps([[u.key for u in r] for r in p.sources[0].ranks]) for p in plans}) > 1
    assert len({p.fingerprint for p in plans}) == 1  # the fingerprint is the listing's
    assert plan_changes(plans[0], listing) == []
    # A resume compares fingerprints from the plan's header alone before reading the whole plan.
    header = decode(plans[0].encoded.header, None)
    assert header.sources[0].objects == {} and same_listing(header, listing)
    changed = [
        [ObjectInfo(o.uri, o.size, "v2" if o.uri.endswith("f3.jsonl") else "v1") for o in listing[0][1:]]
        + [ObjectInfo("/d/new.jsonl", 5)]
    ]
    assert plan_changes(plans[0], changed) == [
        "data.sources[0] (/d/f*): 1 object(s) added since the data plan was made, not read by this run: "
        "/d/new.jsonl",
        "data.sources[0] (/d/f*): 1 object(s) removed since the data plan was made: /d/f0.jsonl",
        "data.sources[0] (/d/f*): 1 object(s) changed (size or version) since the data plan was made: "
        "/d/f3.jsonl",
    ]
    assert not same_listing(header, changed)
    assert not same_listing(header, [[ObjectInfo(o.uri, o.size, "v2") for o in listing[0]]])


@st.composite
def resume_cases(draw):
    sources = [draw(corpora(first_id=0))]
    if draw(st.booleans()):
        sources.append(draw(corpora(first_id=1000)))
    weights = [draw(st.floats(0.2, 3.0)) for _ in sources]
    return sources, weights


@FAST
@given(
    resume_cases(),
    st.integers(40, 600),
    st.integers(1, 4),
    st.integers(0, 2**16),
    st.integers(1, 3),
    st.integers(0, 30),
    st.integers(0, 8),
    st.integers(1, 15),
    st.booleans(),
)
def test_resume_continues_exactly(
    case, chunk_bytes, world_size, seed, window_rows, done, ahead, more, packing
):
    sources, weights = case
    with tempfile.TemporaryDirectory() as tmp:
        uris = [write_corpus(Path(tmp), f"s{i}", *corpus) for i, corpus in enumerate(sources)]
        data = spec(*zip(uris, weights, strict=True), packing=packing)
        plan = ShardPlan.from_json(
            build_plan(data, STORE, world_size, seed, chunk_bytes=chunk_bytes).to_json()
        )
        assume(all(unit_record_ids(plan, data, s, r) for s in range(len(uris)) for r in range(world_size)))
        for rank in range(world_size):

            def stream(state=None, rank=rank):
                return PackedRowStream(plan, rank, data, STORE, FakeEncoder(), state, window_rows)

            reference = stream()
            expected = [next(reference) for _ in range(done + ahead + more)]
            interrupted = stream()
            for _ in range(done + ahead):  # the DataLoader reads ahead of the optimizer
                next(interrupted)
            interrupted.state_after(done // 2)  # an earlier checkpoint
            state = json.loads(json.dumps(interrupted.state_after(done)))
            resumed = stream(state)
            assert [next(resumed) for _ in range(ahead + more)] == expected[done:]
            assert resumed.samples.counters == reference.samples.counters


def test_resume_rejects_another_plan_and_old_rows(tmp_path):
    data = spec((write_corpus(tmp_path, "c", [[record(i) for i in range(40)]], [False]), 1.0))
    plan = build_plan(data, STORE, 2, 0, chunk_bytes=200)
    rows = PackedRowStream(plan, 0, data, STORE, FakeEncoder(), window_rows=1)
    for _ in range(10):
        next(rows)
    with pytest.raises(ValueError, match="only 10 rows"):
        rows.state_after(11)
    state = rows.state_after(8)
    with pytest.raises(ValueError, match="older than the oldest cursor kept"):
        rows.state_after(1)
    with pytest.raises(DataError, match="resume with the run's saved data plan"):
        PackedRowStream(plan, 1, data, STORE, FakeEncoder(), state)
    other = build_plan(data, STORE, 2, 1, chunk_bytes=200)
    assert other.fingerprint == plan.fingerprint  # the same listing, but another plan
    with pytest.raises(DataError, match=f"the data cursor is for plan {plan.id} rank 0, not plan {other.id}"):
        PackedRowStream(other, 0, data, STORE, FakeEncoder(), state)
    assert PackedRowStream(plan, 0, data, STORE, FakeEncoder(), state).rows_out == 8


def test_weights_mix_sources_in_proportion(tmp_path):
    a = write_corpus(tmp_path, "a", [[record(i) for i in range(50)]], [False])
    b = write_corpus(tmp_path, "b", [[record(1000 + i) for i in range(50)]], [True])
    data = spec((a, 3.0), (b, 1.0))
    stream = RankStream(build_plan(data, STORE, 1, 7), 0, data, STORE, FakeEncoder())
    sources = Counter(next(stream).source for _ in range(4000))
    assert 0.72 < sources[0] / 4000 < 0.78
    assert stream.counters[1].samples == sources[1] and stream.positions[1].epoch >= 10


def test_byte_range_errors_name_the_absolute_line(tmp_path):
    lines = [json.dumps(record(i)) for i in range(60)]
    lines[36] = "{not json"
    lines[50] = json.dumps({"q": 1})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = spec((str(path), 1.0))
    plan = build_plan(data, STORE, 1, 3, chunk_bytes=300)
    assert len(plan.sources[0].ranks[0]) > 10
    stream = RankStream(plan, 0, data, STORE, FakeEncoder())
    with pytest.raises(DataError, match=r"bad\.jsonl:(37: malformed JSON|51: no known record shape)"):
        for _ in range(100):
            next(stream)
    skipping = spec((str(path), 1.0), on_bad_record="skip", max_bad_records=2)
    stream = RankStream(plan, 0, skipping, STORE, FakeEncoder())
    while next(stream).epoch == 0:
        pass
    assert stream.counters[0].bad == 2 and stream.counters[0].samples == 59
    assert stream.bad.first is not None and (
        "bad.jsonl:37" in stream.bad.first or "bad.jsonl:51" in stream.bad.first
    )
    strict = spec((str(path), 1.0), on_bad_record="skip", max_bad_records=1)
    stream = RankStream(plan, 0, strict, STORE, FakeEncoder())
    with pytest.raises(DataError, match="2 bad records skipped, more than data.max_bad_records = 1"):
        for _ in range(100):
            next(stream)


def test_compressed_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(f"{json.dumps(record(1))}\n\n{{oops\n".encode()))
    data = spec((str(path), 1.0))
    stream = RankStream(build_plan(data, STORE, 1, 0), 0, data, STORE, FakeEncoder())
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:3: malformed JSON"):
        for _ in range(3):
            next(stream)


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_over_length_samples_are_dropped_or_truncated_and_counted(tmp_path, policy):
    rows = [record(i, filler=2, answer=30 if i % 4 == 0 else 3) for i in range(20)]
    data = spec((write_corpus(tmp_path, "c", [rows], [False]), 1.0), truncation=policy)
    stream = RankStream(build_plan(data, STORE, 1, 0), 0, data, STORE, FakeEncoder(), max_seq_len=16)
    samples = []
    while (sample := next(stream)).epoch == 0:
        samples.append(sample)
    # The counters also hold what epoch 1 read up to its first sample (one unit: ``record`` of them).
    counters, head = stream.counters[0], stream.positions[0].record
    if policy == "drop":
        assert (counters.dropped, counters.truncated, len(samples)) == (5 + head - 1, 0, 15)
    else:
        assert (counters.dropped, counters.truncated, len(samples)) == (
            0,
            5 + (len(sample.input_ids) == 16),
            20,
        )
        assert max(len(s.input_ids) for s in samples) == 16
    assert counters.tokens == sum(len(s.input_ids) for s in samples) + len(sample.input_ids)


def test_all_tokens_train_without_assistant_only_loss(tmp_path):
    from transformers import AutoTokenizer

    data = spec((write_corpus(tmp_path, "c", [[record(1)]], [False]), 1.0), assistant_only_loss=False)
    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-chatml"))
    encoder = ChatEncoder(tokenizer, "tiny", assistant_only=False)
    sample = next(RankStream(build_plan(data, STORE, 1, 0), 0, data, STORE, encoder))
    assert sample.assistant_mask == [1] * len(sample.input_ids)
    assert len(sample.input_ids) > 8


def test_truncation_that_cuts_every_trained_token_drops_and_counts_the_sample(tmp_path):
    rows = [record(i, filler=20 if i % 2 else 2, answer=3) for i in range(10)]
    data = spec((write_corpus(tmp_path, "c", [rows], [False]), 1.0), truncation="truncate")
    stream = RankStream(build_plan(data, STORE, 1, 0), 0, data, STORE, FakeEncoder(), max_seq_len=16)
    samples = list(stream.one_pass())
    assert len(samples) == 5 and all(sum(s.assistant_mask[1:]) == 3 for s in samples)
    counters = stream.counters[0]
    assert (counters.samples, counters.untrained, counters.truncated) == (5, 5, 5)


def test_packed_rows_have_labels_and_positions_per_sequence():
    samples = [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1]), ([6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 1, 1, 1, 1])]
    first, second = pack(samples, length=10, pad_id=0)
    assert first.input_ids == [6, 7, 8, 9, 10, 11, 12, 1, 2, 3]
    assert first.labels == [IGNORE_INDEX] * 3 + [9, 10, 11, 12] + [IGNORE_INDEX, 2, 3]
    assert first.position_ids == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert second.input_ids == [4, 5] + [0] * 8 and second.tokens == 2
    assert second.labels == [IGNORE_INDEX, 5] + [IGNORE_INDEX] * 8
    assert second.position_ids == [0, 1, *range(8)]
    unpacked = pack(samples, length=10, pad_id=0, packing=False)
    assert [r.tokens for r in unpacked] == [3, 2, 7]
    assert best_fit([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert best_fit([10, 10, 1], 10) == [[0], [1], [2]]


def test_smoke_data_packs_at_least_95_percent():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-chatml"))
    data = DataSpec.model_validate({"sources": [{"uri": "builtin:smoke-chat.jsonl"}], "max_seq_len": 256})
    encoder = ChatEncoder(tokenizer, "builtin:tiny-chatml")
    rows = PackedRowStream(build_plan(data, STORE, 1, 42), 0, data, STORE, encoder)
    while rows.samples.positions[0].epoch == 0:
        row = next(rows)
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == 256
    assert rows.packing_efficiency >= 0.95
    assert rows.samples.counters[0].samples >= 2000


def test_packed_dataset_yields_tensors_and_a_cursor(tmp_path):
    data = spec((write_corpus(tmp_path, "c", [[record(i) for i in range(30)]], [False]), 1.0))
    plan = build_plan(data, STORE, 1, 0)
    dataset = PackedDataset(plan, 0, data, STORE, FakeEncoder(), window_rows=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=0)
    batches = iter(loader)
    batch = next(batches)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    next(batches)  # read ahead: 8 rows handed out, 4 consumed
    state = json.loads(json.dumps(dataset.state_after(4)))
    resumed = PackedDataset(plan, 0, data, STORE, FakeEncoder(), state, window_rows=2)
    fresh = PackedDataset(plan, 0, data, STORE, FakeEncoder(), window_rows=2)
    after = next(iter(torch.utils.data.DataLoader(resumed, batch_size=4)))
    reference = next(iter(torch.utils.data.DataLoader(fresh, batch_size=12)))["input_ids"]
    assert torch.equal(after["input_ids"], reference[4:8])
    # Stateful: state_dict() is the cursor after every row handed out (8 here), load_state_dict starts there.
    loaded = PackedDataset(plan, 0, data, STORE, FakeEncoder(), window_rows=2)
    loaded.load_state_dict(json.loads(json.dumps(dataset.state_dict())))
    assert torch.equal(
        next(iter(torch.utils.data.DataLoader(loaded, batch_size=4)))["input_ids"], reference[8:]
    )


def test_a_prefix_of_100k_objects_lists_in_one_call_without_per_object_requests(monkeypatch):
    fs = fsspec.filesystem("memory")
    try:
        for i in range(100_000):
            fs.pipe_file(f"/bulk/shard-{i:06d}.jsonl", b'{"text": "x"}\n')
        fs.pipe_file("/bulk/_SUCCESS", b"")
        calls = Counter()
        for name in ("find", "glob", "ls"):
            real = getattr(type(fs), name)
            monkeypatch.setattr(
                type(fs), name, lambda *a, name=name, real=real, **k: calls.update([name]) or real(*a, **k)
            )
        for name in ("info", "exists", "size", "isfile"):
            monkeypatch.setattr(type(fs), name, lambda *a, name=name, **k: pytest.fail(f"{name} per object"))
        data = spec(("memory://bulk", 1.0))
        started = time.perf_counter()
        plan = build_plan(data, STORE, 8, 0)
        elapsed = time.perf_counter() - started
        assert calls == {"find": 1} and len(plan.sources[0].objects) == 100_000
        assert sum(len(units) for units in plan.sources[0].ranks) == 100_000
        assert elapsed < 15, elapsed
    finally:
        for key in [k for k in fs.store if k.startswith("/bulk/")]:
            del fs.store[key]
