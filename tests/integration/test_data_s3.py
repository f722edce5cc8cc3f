"""The shard plan and the per-rank streams over a real S3 server (SeaweedFS on loopback).

Listing a prefix is paginated ListObjectsV2 and nothing per object; byte
ranges are ranged GETs; every record reaches exactly one rank; resume is exact.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
import s3fs

from sft_cluster.data import build_plan, load_conversations
from sft_cluster.data.stream import PackedRowStream, RankStream
from sft_cluster.spec import DataSpec, StorageSpec
from tests.fixtures.s3 import s3_server  # noqa: F401 - fixture
from tests.unit.test_data_plan import FakeEncoder, record


@pytest.fixture
def bucket(s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.make_bucket()


def _calls(monkeypatch) -> Counter:
    """S3 API calls made through s3fs, by operation name."""
    calls: Counter = Counter()
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls[method] += 1
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    return calls


def test_plan_and_streams_over_s3(s3_server, bucket, monkeypatch):  # noqa: F811
    client = s3_server.client()
    rows = [record(i, filler=i % 9, answer=1 + i % 5) for i in range(600)]
    lines = [json.dumps(r) + "\n" for r in rows]
    for part in range(3):
        body = "".join(lines[part * 150 : (part + 1) * 150]).encode()
        client.put_object(Bucket=bucket, Key=f"corpus/part-{part}.jsonl", Body=body)
    client.put_object(
        Bucket=bucket, Key="corpus/part-3.jsonl.gz", Body=gzip.compress("".join(lines[450:]).encode())
    )
    client.put_object(Bucket=bucket, Key="corpus/_SUCCESS", Body=b"")
    store = StorageSpec(endpoint_url=s3_server.endpoint)
    data = DataSpec.model_validate({"sources": [{"uri": f"s3://{bucket}/corpus"}], "max_seq_len": 64})

    calls = _calls(monkeypatch)
    plan = build_plan(data, store, 2, 5, chunk_bytes=4096)
    assert set(calls) == {"list_objects_v2"}, calls
    assert [o.uri.rsplit("/", 1)[-1] for o in plan.sources[0].objects] == [
        "part-0.jsonl",
        "part-1.jsonl",
        "part-2.jsonl",
        "part-3.jsonl.gz",
    ]
    assert all(o.version for o in plan.sources[0].objects)  # ETags, to notice a changed object on resume

    seen = []
    for rank in range(2):
        stream = RankStream(plan, rank, data, store, FakeEncoder())
        while (sample := next(stream)).epoch == 0:
            seen.append(sample.input_ids[0] - 10)
    assert sorted(seen) == list(range(600))
    assert len(load_conversations(data, store)) == 600  # the in-memory reader shares the parsing
    globbed = DataSpec.model_validate(
        {
            "sources": [
                {"uri": f"s3://{bucket}/corpus/part-[01].jsonl"},
                {"uri": f"s3://{bucket}/corpus/part-3.jsonl.gz"},
            ]
        }
    )
    assert [len(source.objects) for source in build_plan(globbed, store, 2, 0).sources] == [2, 1]
    assert calls["get_object"] >= sum(len(units) for units in plan.sources[0].ranks)

    reference = PackedRowStream(plan, 1, data, store, FakeEncoder(), window_rows=4)
    expected = [next(reference) for _ in range(60)]
    interrupted = PackedRowStream(plan, 1, data, store, FakeEncoder(), window_rows=4)
    for _ in range(45):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_after(37)))
    resumed = PackedRowStream(plan, 1, data, store, FakeEncoder(), state, window_rows=4)
    assert [next(resumed) for _ in range(23)] == expected[37:]


def test_a_prefix_of_many_objects_is_listed_by_pages(s3_server, bucket, monkeypatch):  # noqa: F811
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint}, skip_instance_cache=True)
    fs.pipe({f"{bucket}/many/shard-{i:05d}.jsonl": b'{"text": "x"}\n' for i in range(2500)})
    store = StorageSpec(endpoint_url=s3_server.endpoint)
    data = DataSpec.model_validate({"sources": [{"uri": f"s3://{bucket}/many/"}]})
    calls = _calls(monkeypatch)
    plan = build_plan(data, store, 4, 0)
    assert len(plan.sources[0].objects) == 2500
    assert calls == {"list_objects_v2": 3}, calls  # 1,000 keys a page
