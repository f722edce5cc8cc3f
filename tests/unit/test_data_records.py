"""Sources in every format and record shape come out as the same chat messages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sft_cluster.data import DataError, check_sources, load_conversations
from sft_cluster.spec import DataSpec, StorageSpec

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _data(tmp_path: Path, uri: str, **extra) -> DataSpec:
    return DataSpec.model_validate({"sources": [{"uri": uri, **extra.pop("source", {})}], **extra})


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst", "json", "parquet"])
def test_every_format_reads_the_same(tmp_path, suffix):
    rows = [{"messages": CHAT, "system": None}, {"messages": CHAT, "system": "be brief"}]
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        path.write_bytes(_jsonl(rows))
    elif suffix == "jsonl.gz":
        path.write_bytes(gzip.compress(_jsonl(rows)))
    elif suffix == "jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(rows)))
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    got = load_conversations(_data(tmp_path, str(path)), StorageSpec())
    assert got == [CHAT, [{"role": "system", "content": "be brief"}, *CHAT]]


def test_record_shapes_and_column_renames(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"instruction": "hi", "input": "", "output": "hello"},
        {"prompt": "hi", "completion": "hello"},
        {"question": "hi", "answer": "hello"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_jsonl(rows[:3]))
    assert load_conversations(_data(tmp_path, str(path)), StorageSpec()) == [CHAT] * 3
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_bytes(_jsonl(rows[3:]))
    spec = _data(tmp_path, str(renamed), source={"columns": {"question": "prompt", "answer": "completion"}})
    assert load_conversations(spec, StorageSpec()) == [CHAT]
    text = tmp_path / "text.jsonl"
    text.write_bytes(_jsonl([{"text": "plain prose"}]))
    assert load_conversations(_data(tmp_path, str(text)), StorageSpec()) == [
        [{"role": "assistant", "content": "plain prose"}]
    ]


def test_bad_line_is_named_by_uri_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_conversations(_data(tmp_path, str(path)), StorageSpec())


def test_missing_column_lists_what_was_found(tmp_path):
    path = tmp_path / "cols.jsonl"
    path.write_bytes(_jsonl([{"q": "hi", "a": "hello"}]))
    with pytest.raises(DataError, match=r"cols\.jsonl:1: no known record shape \(columns found: a, q\)"):
        load_conversations(_data(tmp_path, str(path)), StorageSpec())


def test_skip_counts_bad_records_and_fails_past_the_limit(tmp_path, caplog):
    path = tmp_path / "some-bad.jsonl"
    path.write_text(
        "\n".join(
            [json.dumps({"messages": CHAT}), "{oops", json.dumps({"x": 1}), json.dumps({"messages": CHAT})]
        )
        + "\n"
    )
    spec = _data(tmp_path, str(path), on_bad_record="skip", max_bad_records=2)
    assert load_conversations(spec, StorageSpec()) == [CHAT, CHAT]
    assert "some-bad.jsonl:2" in caplog.text and "skipped 2 bad record(s)" in caplog.text
    strict = _data(tmp_path, str(path), on_bad_record="skip", max_bad_records=1)
    with pytest.raises(DataError, match="more than data.max_bad_records = 1; the first: .*some-bad.jsonl:2"):
        load_conversations(strict, StorageSpec())


def test_memory_uri_and_glob_and_checks(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.jsonl", _jsonl([{"messages": CHAT}]))
    fs.pipe("/corpus/b.jsonl", _jsonl([{"messages": CHAT}] * 2))
    spec = _data(tmp_path, "memory://corpus/*.jsonl")
    assert len(load_conversations(spec, StorageSpec())) == 3
    assert check_sources(spec, StorageSpec()) == []
    missing = _data(tmp_path, "memory://corpus/none-*.jsonl")
    assert check_sources(missing, StorageSpec()) == [
        "data.sources[0].uri = 'memory://corpus/none-*.jsonl': matches no file; check the path"
    ]
    unknown = _data(tmp_path, "memory://corpus/a.jsonl")
    fs.pipe("/corpus/c.csv", b"x")
    assert (
        "cannot tell the format" in check_sources(_data(tmp_path, "memory://corpus/c.csv"), StorageSpec())[0]
    )
    assert check_sources(unknown, StorageSpec()) == []
    with_eval = spec.model_copy(update={"eval": [{"uri": "memory://corpus/held-out-*.jsonl"}]})
    with_eval = DataSpec.model_validate(with_eval.model_dump())
    assert check_sources(with_eval, StorageSpec()) == [
        "data.eval[0].uri = 'memory://corpus/held-out-*.jsonl': matches no file; check the path"
    ]
