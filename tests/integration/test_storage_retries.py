"""Transient object-store errors are retried: uploads through a proxy that resets connections.

The S3 client's own retries are set to a single attempt here, so what is tested is our
retry layer (``sft_cluster.storage.retrying``) on genuine connection resets from loopback.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from sft_cluster import storage
from sft_cluster.checkpoint import CheckpointStore
from tests.fixtures.flaky_proxy import flaky_proxy
from tests.fixtures.s3 import s3_server  # noqa: F401 - fixture


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(storage.retry, "BASE_DELAY_S", 0.05)
    return s3_server


def _store(bucket: str, endpoint: str) -> CheckpointStore:
    """A store whose S3 client and s3fs each try once: every reset reaches our retry layer."""
    options = {
        "client_kwargs": {"endpoint_url": endpoint},
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
    }
    store = CheckpointStore(f"s3://{bucket}/run/checkpoints", options)
    store.fs.retries = 1
    return store


def test_checkpoint_upload_survives_connection_resets(s3_env, tmp_path: Path):
    bucket = s3_env.make_bucket()
    local = tmp_path / "staged"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"w" * 10_000)
    with flaky_proxy(urlparse(s3_env.endpoint).port, resets=3) as proxy:
        store = _store(bucket, proxy.endpoint)
        store.upload_files(local, ["model.safetensors"], step=10)
        assert proxy.reset_count == 3  # the blips really happened
    keys = s3_env.keys(bucket)
    assert keys == ["run/checkpoints/step-00000010/model.safetensors"]


def test_a_lasting_outage_still_fails_clearly(s3_env, tmp_path: Path):
    bucket = s3_env.make_bucket()
    (tmp_path / "f.txt").write_text("x")
    with flaky_proxy(urlparse(s3_env.endpoint).port, resets=1000) as proxy:
        store = _store(bucket, proxy.endpoint)
        with pytest.raises(Exception) as caught:
            store.upload_files(tmp_path, ["f.txt"], step=1)
        assert storage.is_transient(caught.value)
        assert proxy.reset_count >= storage.retry.ATTEMPTS  # it tried, with backoff, then gave up
