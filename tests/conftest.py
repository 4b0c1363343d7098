"""Shared fixtures: fake credentials, a loopback S3 server (moto behind tess's counting middleware),
per-test buckets and cache folders."""

from __future__ import annotations

import io
import os
import subprocess
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "TESS_CACHE_DIR")


@pytest.fixture(scope="session", autouse=True)
def fake_credentials() -> Iterator[dict[str, str]]:
    """Fake AWS credentials for the whole session; no real profile or endpoint leaks in."""
    saved = {k: os.environ.get(k) for k in (*FAKE_ENV, *_CLEARED)}
    for k in _CLEARED:
        os.environ.pop(k, None)
    os.environ.update(FAKE_ENV)
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    yield dict(FAKE_ENV)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(fake_credentials):
    """moto's S3 on 127.0.0.1 at a free port, for the whole session."""
    from pipeline.demo.server import LoopbackS3Server

    with LoopbackS3Server() as server:
        yield server


@pytest.fixture
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client) -> str:
    """A fresh, empty bucket."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def options(s3_server):
    from pipeline.config import ClientOptions

    return ClientOptions(endpoint=s3_server.endpoint, max_attempts=2, connect_timeout=2, read_timeout=10)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def png_bytes(seed: int, size: int = 8) -> bytes:
    """A tiny random RGB PNG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def put(s3_client, bucket):
    """put(key, data) into the test bucket over HTTP."""

    def _put(key: str, data: bytes) -> None:
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)

    return _put


@pytest.fixture(scope="session")
def s3rver_server():
    """s3rver (npm ``s3rver@3.7.1``, a Node.js S3 server) on 127.0.0.1 for the whole session.

    Installed under ``.venv/s3rver`` on first use; skipped, with the reason, only where node or the
    npm registry cannot be reached.
    """
    from s3rver import S3rverServer, install

    try:
        modules = install()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"s3rver unavailable: {e}")
    with S3rverServer(modules=modules) as server:
        yield server


@pytest.fixture
def s3rver_env(s3rver_server, monkeypatch):
    """Credentials s3rver accepts (only S3RVER/S3RVER) for one test; returns the endpoint."""
    from s3rver import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    return s3rver_server.endpoint


@pytest.fixture(scope="session")
def rgw_server():
    """Ceph RGW (Pacific) on 127.0.0.1 over HTTP and TLS for the whole session (``tests/rgw.py``).

    Installs Debian's Ceph packages with apt-get when they are missing; skipped, with the reason, only
    where apt-get cannot install them (or we are not root). A cluster that does not start is an error
    whose message ends with the daemons' last log lines. Every daemon is stopped and the folder removed.
    """
    from tests.rgw import RgwCluster, RgwUnavailable, ensure_installed

    try:
        ensure_installed()
    except RgwUnavailable as e:
        pytest.skip(f"Ceph RGW unavailable: {e}")
    with RgwCluster() as cluster:
        yield cluster
