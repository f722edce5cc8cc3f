"""The streamed, concurrent S3 listing (``sft_cluster.data.listing``) against ``fs.find``, on a real
S3 server (SeaweedFS on loopback): the same objects, sizes, versions and order, page by page."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
import s3fs

from sft_cluster.data import check_sources, listing
from sft_cluster.data.listing import ObjectInfo, list_path, version_of
from sft_cluster.data.records import _listable, list_objects
from sft_cluster.spec import DataSpec, StorageSpec
from tests.fixtures.s3 import s3_server  # noqa: F401 - fixture

KEEP = partial(_listable, declared=None)


@pytest.fixture
def bucket(s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.make_bucket()


def _fs(server) -> s3fs.S3FileSystem:
    """A fresh filesystem: no directory cache from an earlier listing."""
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}, skip_instance_cache=True)


def _by_find(server, path: str, keep=KEEP) -> list[ObjectInfo]:
    """What the listing was before: ``fs.find`` with details, filtered the same way."""
    found = _fs(server).find(path, detail=True)
    if len(found) > 1 or path not in found:
        found = {name: info for name, info in found.items() if keep(name)}
    return [
        ObjectInfo(f"s3://{name}", int(info["size"]), version_of(info))
        for name, info in sorted(found.items())
        if info["type"] == "file"
    ]


def _counting(fs: s3fs.S3FileSystem) -> Counter:
    """S3 calls by (operation, delimiter); ``"peak"``: the most recursive listings in flight at once."""
    calls: Counter = Counter()
    real, in_flight = fs._call_s3, Counter()

    async def counting(method, *args, **kwargs):
        calls[method, kwargs.get("Delimiter")] += 1
        in_flight[kwargs.get("Delimiter")] += 1
        calls["peak"] = max(calls["peak"], in_flight[None])
        try:
            return await real(method, *args, **kwargs)
        finally:
            in_flight[kwargs.get("Delimiter")] -= 1

    fs._call_s3 = counting
    return calls


def test_a_nested_prefix_lists_as_find_does(s3_server, bucket, monkeypatch):  # noqa: F811
    keys = [f"corpus/top-{i:02d}.jsonl" for i in range(9)]  # directly under the prefix
    keys += [
        f"corpus/{sub}/part-{i:02d}.jsonl.gz"
        for sub in ("a", "b", "b-1", "c")
        for i in range(5 + 4 * len(sub))
    ]
    keys += [f"corpus/c/deep/er/x-{i}.parquet" for i in range(11)]
    keys += ["corpus/b.jsonl", "corpus/b/_SUCCESS", "corpus/_SUCCESS", "corpus/a/.part-00.jsonl.crc"]
    keys += ["corpus/c/notes.txt", "corpus/c/deep/README.md"]
    keys += ["corpus-other/x.jsonl", "corpus.jsonl", "elsewhere/y.jsonl"]  # beside it, not under it
    _fs(s3_server).pipe({f"{bucket}/{key}": b"x" * (n % 17) for n, key in enumerate(keys)})
    s3_server.client().put_object(Bucket=bucket, Key="corpus/c/marker/", Body=b"")  # a "directory"

    expected = _by_find(s3_server, f"{bucket}/corpus")
    assert len(expected) == 9 + 1 + 9 + 9 + 17 + 9 + 11  # the filter dropped the rest
    assert len({obj.size for obj in expected}) > 5 and all(obj.version for obj in expected)
    fs = _fs(s3_server)
    calls = _counting(fs)
    assert list_path(fs, f"{bucket}/corpus", KEEP, page_size=7, concurrency=3) == expected
    # 11 objects and 4 sub-prefixes directly under corpus/: 3 pages of 7 entries. Below them
    # a: 10 keys, b: 10, b-1: 17, c: 9 + 11 + 2 + the marker: 2 + 2 + 3 + 4 pages.
    assert calls.pop("peak") in (2, 3)  # the sub-prefixes, at most 3 at a time
    assert calls == {("list_objects_v2", "/"): 3, ("list_objects_v2", None): 11}, calls
    fs = _fs(s3_server)
    calls = _counting(fs)
    assert list_path(fs, f"{bucket}/corpus/", KEEP) == expected
    assert calls.pop("peak") and calls == {("list_objects_v2", "/"): 1, ("list_objects_v2", None): 4}
    # Past MAX_FANOUT sub-prefixes, one recursive listing of the prefix instead of one each.
    monkeypatch.setattr(listing, "MAX_FANOUT", 3)
    fs = _fs(s3_server)
    calls = _counting(fs)
    assert list_path(fs, f"{bucket}/corpus", KEEP, page_size=7) == expected
    assert calls == {("list_objects_v2", "/"): 3, ("list_objects_v2", None): 11, "peak": 1}, calls  # 71 keys
    # A declared format keeps what the suffix filter drops: still the objects fs.find finds.
    declared = partial(_listable, declared="jsonl")
    with_markers = list_path(_fs(s3_server), f"{bucket}/corpus", declared, page_size=7)
    assert with_markers == _by_find(s3_server, f"{bucket}/corpus", declared)
    assert f"s3://{bucket}/corpus/c/marker/" in {obj.uri for obj in with_markers}

    store = StorageSpec(endpoint_url=s3_server.endpoint)
    data = DataSpec.model_validate({"sources": [{"uri": f"s3://{bucket}/corpus"}]})
    assert list_objects(data.sources[0], data, store) == expected  # what every caller gets


def test_a_flat_prefix_is_one_paginated_listing(s3_server, bucket):  # noqa: F811
    _fs(s3_server).pipe({f"{bucket}/flat/shard-{i:03d}.jsonl": b"{}\n" * i for i in range(30)})
    fs = _fs(s3_server)
    calls = _counting(fs)
    objects = list_path(fs, f"{bucket}/flat", KEEP, page_size=7)
    assert objects == _by_find(s3_server, f"{bucket}/flat") and len(objects) == 30
    assert calls == {("list_objects_v2", "/"): 5, "peak": 0}, calls  # 30 keys, 7 a page


def test_one_object_an_empty_prefix_and_the_bucket(s3_server, bucket):  # noqa: F811
    fs = _fs(s3_server)
    fs.pipe({f"{bucket}/one/data.bin": b"abc", f"{bucket}/two/_SUCCESS": b""})
    # A path naming one object keeps it, data or not, as fs.find names it (fs has no listing cached).
    single = list_path(fs, f"{bucket}/one/data.bin", KEEP)
    assert single == _by_find(s3_server, f"{bucket}/one/data.bin")
    assert [(o.uri, o.size) for o in single] == [(f"s3://{bucket}/one/data.bin", 3)]
    assert single[0].version
    assert list_path(fs, f"{bucket}/two", KEEP) == []  # only a marker below it
    assert list_path(fs, f"{bucket}/nothing-here", KEEP) == []
    assert list_path(fs, f"{bucket}/one/data", KEEP) == []  # a stem, not an object
    assert list_path(fs, bucket, KEEP) == []  # the whole bucket: no data object
    fs.pipe({f"{bucket}/root.jsonl": b"{}\n"})
    whole = list_path(fs, bucket, KEEP)
    assert whole == _by_find(s3_server, bucket) and [o.uri for o in whole] == [f"s3://{bucket}/root.jsonl"]


def test_a_missing_bucket_raises_as_find_does(s3_server, bucket):  # noqa: F811
    with pytest.raises(OSError) as by_find:
        _fs(s3_server).find("no-such-bucket-sftc/data", detail=True)
    with pytest.raises(OSError) as ours:
        list_path(_fs(s3_server), "no-such-bucket-sftc/data", KEEP)
    assert (type(ours.value), str(ours.value)) == (type(by_find.value), str(by_find.value))

    store = StorageSpec(endpoint_url=s3_server.endpoint)
    data = DataSpec.model_validate({"sources": [{"uri": "s3://no-such-bucket-sftc/data"}]})
    [problem] = check_sources(data, store)
    assert problem.startswith("data.sources[0].uri = 's3://no-such-bucket-sftc/data': cannot list it: ")
    assert type(by_find.value).__name__ in problem


def test_a_failing_sub_prefix_raises_its_own_error(s3_server, bucket):  # noqa: F811
    fs = _fs(s3_server)
    fs.pipe({f"{bucket}/d/{sub}/x-{i}.jsonl": b"{}\n" for sub in "abcdef" for i in range(3)})
    real = fs._call_s3

    async def denied_below_c(method, *args, **kwargs):
        if kwargs.get("Prefix") == "d/c/":
            raise PermissionError("Access Denied")
        return await real(method, *args, **kwargs)

    fs._call_s3 = denied_below_c
    with pytest.raises(PermissionError, match="Access Denied"):  # not an ExceptionGroup
        list_path(fs, f"{bucket}/d", KEEP, concurrency=2)
