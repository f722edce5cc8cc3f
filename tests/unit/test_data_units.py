"""Reading one unit lazily: Parquet row groups by byte range, streamed compressed JSONL, JSON limits.

Records are ``record(id)`` from the plan tests, so a raw record names itself.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import weakref
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from sft_cluster.data import units
from sft_cluster.data.plan import Piece, ShardPlan, SourcePlan, Unit, derive_seed
from sft_cluster.data.reader import RankStream
from sft_cluster.data.records import DataError, ObjectInfo
from sft_cluster.data.units import apply_cuts, read_lines, read_unit, shuffle_buffer
from tests.unit.test_data_plan import FAST, STORE, FakeEncoder, record, spec


def rid(raw) -> int:
    """The id a raw record (a JSONL line or a parsed row) carries."""
    parsed = json.loads(raw) if isinstance(raw, bytes) else raw
    return int(parsed["messages"][0]["content"].split()[0])


def parquet_file(tmp_path: Path, count: int = 200, group: int = 17) -> ObjectInfo:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([record(i) for i in range(count)]), path, row_group_size=group)
    return ObjectInfo(str(path), path.stat().st_size)


def jsonl_file(tmp_path: Path, suffix: str, count: int) -> ObjectInfo:
    text = "".join(json.dumps(record(i)) + "\n" for i in range(count)).encode()
    path = tmp_path / f"rows.jsonl{suffix}"
    compress = {"": bytes, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}[suffix]
    path.write_bytes(compress(text))
    return ObjectInfo(str(path), path.stat().st_size)


def ranges(size: int, chunk: int) -> list[Unit]:
    return [Unit(0, start, min(start + chunk, size)) for start in range(0, size, chunk)]


def ids(records) -> list[int]:
    return [rid(raw) for _, raw in records]


def one_source_plan(obj: ObjectInfo, unit_list: list[Unit], seed: int = 3) -> ShardPlan:
    return ShardPlan(seed, 1, 1 << 20, [SourcePlan(obj.uri, [obj], [unit_list])], "test")


@pytest.mark.parametrize("chunk", [97, 333, 1000, 4000, 1 << 20])
def test_parquet_byte_ranges_own_every_row_once_and_number_rows_in_the_file(tmp_path, chunk):
    obj = parquet_file(tmp_path)
    file_order = []
    for unit in ranges(obj.size, chunk):
        file_order += read_unit(obj, unit, None, {})[0]
    assert [number for number, _ in file_order] == list(range(1, 201))
    assert ids(file_order) == list(range(200))
    shuffled = [ids(read_unit(obj, unit, None, {}, seed=5)[0]) for unit in ranges(obj.size, chunk)]
    assert sorted(itertools.chain(*shuffled)) == list(range(200))
    again = [ids(read_unit(obj, unit, None, {}, seed=5)[0]) for unit in ranges(obj.size, chunk)]
    assert shuffled == again
    if chunk == 1 << 20:  # one unit: the order is a shuffle, and another seed gives another
        assert shuffled[0] != list(range(200))
        assert shuffled != [ids(read_unit(obj, u, None, {}, seed=6)[0]) for u in ranges(obj.size, chunk)]


def test_parquet_whole_object_unit_is_every_row_group(tmp_path):
    obj = parquet_file(tmp_path)
    assert ids(read_unit(obj, Unit(0), None, {})[0]) == list(range(200))
    assert sorted(ids(read_unit(obj, Unit(0), None, {}, seed=1)[0])) == list(range(200))


def test_parquet_reads_only_owned_row_groups_one_at_a_time(tmp_path, monkeypatch):
    obj = parquet_file(tmp_path)
    calls, alive = [], []
    real = pq.ParquetFile.read_row_group

    def counting(self, index, *args, **kwargs):
        # Every row group read before must be freed by now: one in memory at a time.
        assert all(ref() is None for ref in alive)
        table = real(self, index, *args, **kwargs)
        calls.append(index)
        alive.append(weakref.ref(table))
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    metadata = pq.ParquetFile(obj.uri).metadata
    starts = [metadata.row_group(g).column(0).dictionary_page_offset for g in range(metadata.num_row_groups)]
    unit = Unit(0, starts[3], starts[6])  # owns row groups 3, 4 and 5
    rows = list(read_unit(obj, unit, None, {}, seed=9)[0])
    assert sorted(calls) == [3, 4, 5]
    assert sorted(number for number, _ in rows) == list(range(3 * 17 + 1, 6 * 17 + 1))
    # Rows leave row group by row group: each group's rows are contiguous in the shuffled order.
    groups = [(number - 1) // 17 for number, _ in rows]
    assert [g for g, _ in itertools.groupby(groups)] == calls


@pytest.mark.parametrize("kind", ["parquet", "parquet.gz", ".gz", ".zst", "", "json"])
def test_stride_sharing_keeps_index_mod_stride_in_file_order(tmp_path, kind):
    if kind == "parquet":
        obj, whole = parquet_file(tmp_path), Unit(0)
    elif kind == "parquet.gz":
        path = tmp_path / "rows.parquet.gz"
        path.write_bytes(gzip.compress(Path(parquet_file(tmp_path).uri).read_bytes()))
        obj, whole = ObjectInfo(str(path), path.stat().st_size), Unit(0)
    elif kind == "json":
        path = tmp_path / "rows.json"
        path.write_text(json.dumps([record(i) for i in range(200)]))
        obj, whole = ObjectInfo(str(path), path.stat().st_size), Unit(0)
    else:
        obj = jsonl_file(tmp_path, kind, 200)
        whole = Unit(0, 0, obj.size) if kind == "" else Unit(0)
    for stride in (1, 2, 3, 7):
        slots = [Unit(0, whole.start, whole.end, stride, offset) for offset in range(stride)]
        got = [ids(read_unit(obj, slot, None, {})[0]) for slot in slots]
        assert got == [list(range(200))[offset::stride] for offset in range(stride)]
        shuffled = [sorted(ids(read_unit(obj, slot, None, {}, seed=2)[0])) for slot in slots]
        assert shuffled == got


def test_jsonl_range_keeps_the_order_plans_always_had(tmp_path):
    obj = jsonl_file(tmp_path, "", 300)
    fs = fsspec.filesystem("file")
    for unit in [Unit(0, 0, 5000, 2, 1), Unit(0, 5000, obj.size)]:
        _, lines = read_lines(fs, obj.uri, unit.start, unit.end, obj.size)
        old = lines[unit.offset :: unit.stride]
        random.Random(derive_seed(4, "records", 0, 0, unit.key)).shuffle(old)
        seed = derive_seed(4, "records", 0, 0, unit.key)
        assert list(read_unit(obj, unit, None, {}, seed=seed)[0]) == old


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_streams_through_a_bounded_shuffle_buffer(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(units, "SHUFFLE_BUFFER_RECORDS", 64)
    obj = jsonl_file(tmp_path, suffix, 1000)
    first = ids(read_unit(obj, Unit(0), None, {}, seed=11)[0])
    assert sorted(first) == list(range(1000))
    assert first != list(range(1000))
    assert first == ids(read_unit(obj, Unit(0), None, {}, seed=11)[0])
    assert first != ids(read_unit(obj, Unit(0), None, {}, seed=12)[0])
    # The buffer bounds how far a record can travel forward: a record leaves once 64 are held.
    assert all(position >= record_id - 63 for position, record_id in enumerate(first))


def test_shuffle_buffer_holds_at_most_its_records_or_bytes():
    taken = 0

    def source(count: int, size: int):
        nonlocal taken
        for number in range(count):
            taken += 1
            yield number, b"x" * size

    for count, size, max_records, max_bytes in [(500, 1, 10, 1 << 20), (500, 100, 1000, 1000)]:
        taken, held = 0, []
        for emitted, _ in enumerate(shuffle_buffer(source(count, size), 1, max_records, max_bytes)):
            held.append(taken - emitted)
        bound = min(max_records, max_bytes // size)
        assert max(held) == bound and len(held) == count


@pytest.mark.parametrize("kind", [".zst", "parquet-ranges"])
def test_a_resume_continues_the_same_order(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(units, "SHUFFLE_BUFFER_RECORDS", 32)
    if kind == "parquet-ranges":
        obj = parquet_file(tmp_path, 300, 23)
        unit_list = ranges(obj.size, 700)
    else:
        obj, unit_list = jsonl_file(tmp_path, kind, 300), [Unit(0)]
    data, plan = spec((obj.uri, 1.0)), one_source_plan(obj, unit_list)
    stream = RankStream(plan, 0, data, STORE, FakeEncoder())
    straight = [next(stream).record for _ in range(450)]
    assert sorted(number for _, epoch, _, number in straight if epoch == 0) == list(range(1, 301))
    for k in (1, 37, 150, 299, 300, 301):
        stream = RankStream(plan, 0, data, STORE, FakeEncoder())
        head = [next(stream).record for _ in range(k)]
        resumed = RankStream(
            plan, 0, data, STORE, FakeEncoder(), state=json.loads(json.dumps(stream.state()))
        )
        assert head + [next(resumed).record for _ in range(450 - k)] == straight


def test_one_pass_streams_parquet_ranges(tmp_path):
    obj = parquet_file(tmp_path)
    data, plan = spec((obj.uri, 1.0)), one_source_plan(obj, ranges(obj.size, 900))
    seen = [sample.input_ids[0] - 10 for sample in RankStream(plan, 0, data, STORE, FakeEncoder()).one_pass()]
    assert sorted(seen) == list(range(200)) and seen != list(range(200))


def test_a_bad_parquet_row_is_named_by_its_row_in_the_file(tmp_path):
    rows = [record(i) for i in range(60)]
    rows[44] = {"question": "no shape"}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    obj = ObjectInfo(str(path), path.stat().st_size)
    data = spec((obj.uri, 1.0))
    stream = RankStream(one_source_plan(obj, ranges(obj.size, 500)), 0, data, STORE, FakeEncoder())
    with pytest.raises(DataError, match=r"bad\.parquet:row 45: "):
        list(itertools.islice(stream, 100))


@pytest.mark.parametrize("compressed", [False, True])
def test_a_json_array_over_the_limit_is_refused(tmp_path, monkeypatch, compressed):
    path = tmp_path / ("big.json.gz" if compressed else "big.json")
    text = json.dumps([record(i) for i in range(50)]).encode()
    path.write_bytes(gzip.compress(text) if compressed else text)
    obj = ObjectInfo(str(path), path.stat().st_size)
    assert len(list(read_unit(obj, Unit(0), None, {})[0])) == 50
    monkeypatch.setattr(units, "MAX_JSON_BYTES", obj.size - 1)
    with pytest.raises(DataError) as caught:
        read_unit(obj, Unit(0), None, {})
    message = str(caught.value)
    assert path.name in message and str(obj.size) in message and str(obj.size - 1) in message
    assert "jq -c '.[]' in.json > out.jsonl" in message


cuts_strategy = st.lists(
    st.tuples(st.integers(0, 12), st.lists(st.integers(0, 40), max_size=8).map(tuple)), max_size=4
).map(tuple)


@FAST
@given(st.permutations(range(40)), cuts_strategy)
def test_streamed_cuts_equal_piece_apply(order, cuts):
    records = [(number, f"raw {number}") for number in order]
    assert list(apply_cuts(iter(records), cuts)) == Piece(Unit(0), cuts).apply(records)
