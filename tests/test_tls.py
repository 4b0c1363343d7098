"""TLS as AWS users expect, end to end against s3rver serving HTTPS with a certificate of a private CA.

The CA is named the way boto3 and the AWS CLI take it: ``AWS_CA_BUNDLE``, ``ca_bundle`` in the AWS config
profile, or ``--ca-bundle``; ``--no-verify-ssl`` skips the check with a warning. Without the CA, the fetch
stops within seconds with one line naming the certificate problem and the fix, and writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time

import boto3
import botocore.config
import pytest

from cache import load_manifest
from tests.certs import make_ca_and_cert
from tests.helpers import ROOT

BUCKET = "tls"
OBJECTS = {f"t/img-{i:03d}_{i % 2}.bin": random.Random(i).randbytes(1000 + i) for i in range(20)}
OBJECTS["t/big_1.bin"] = random.Random(99).randbytes((16 << 20) + 3)  # HEAD + ranged GETs over TLS too


@pytest.fixture(scope="module")
def tls_s3rver(tmp_path_factory, fake_credentials):
    from s3rver import ACCESS_KEY, SECRET_KEY, S3rverServer, install

    try:
        modules = install()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"s3rver unavailable: {e}")
    certs = make_ca_and_cert(tmp_path_factory.mktemp("certs"))
    with S3rverServer(modules=modules, tls=(certs.cert, certs.key, certs.ca)) as server:
        s3 = boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY).client(
            "s3",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            verify=str(certs.ca),
            # Over HTTPS botocore would send the body aws-chunked with a checksum trailer, which s3rver
            # stores as it is (framing included).
            config=botocore.config.Config(request_checksum_calculation="when_required"),
        )
        s3.create_bucket(Bucket=BUCKET)
        for key, data in OBJECTS.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        yield server, certs


@pytest.fixture
def env(tls_s3rver, tmp_path):
    """The environment of a user with s3rver's keys and no CA named anywhere."""
    from s3rver import ACCESS_KEY, SECRET_KEY

    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
    }
    e.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_CONFIG_FILE=os.devnull)
    return e


def _fetch(server, cache_dir, env, *flags):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "fetch",
        f"s3://{BUCKET}/t/",
        "--endpoint",
        server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        *flags,
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def _assert_right_bytes(cache_dir):
    manifest = next((cache_dir / "manifests").glob("*.jsonl"))
    m = load_manifest(manifest)
    assert sorted(m.keys) == sorted(OBJECTS)
    for i, key in enumerate(m.keys):
        assert m.sha_hex(i) == hashlib.sha256(OBJECTS[key]).hexdigest(), key


def test_aws_ca_bundle_alone_is_enough(tls_s3rver, env, tmp_path):
    server, certs = tls_s3rver
    proc, _ = _fetch(server, tmp_path / "c", {**env, "AWS_CA_BUNDLE": str(certs.ca)})
    assert proc.returncode == 0, proc.stderr
    _assert_right_bytes(tmp_path / "c")


def test_the_ca_bundle_flag_and_the_profile_setting_work_too(tls_s3rver, env, tmp_path):
    server, certs = tls_s3rver
    proc, _ = _fetch(server, tmp_path / "flag", env, "--ca-bundle", str(certs.ca))
    assert proc.returncode == 0, proc.stderr
    _assert_right_bytes(tmp_path / "flag")
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nca_bundle = {certs.ca}\n")
    proc, _ = _fetch(server, tmp_path / "profile", {**env, "AWS_CONFIG_FILE": str(config)})
    assert proc.returncode == 0, proc.stderr
    _assert_right_bytes(tmp_path / "profile")


def test_without_the_ca_the_fetch_stops_at_once_with_one_line(tls_s3rver, env, tmp_path):
    server, _ = tls_s3rver
    proc, wall = _fetch(server, tmp_path / "c", env)
    assert proc.returncode == 2, proc.stderr
    assert wall < 20, wall  # never retried for minutes
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tess: error: "), proc.stderr
    assert "certificate" in lines[0] and "AWS_CA_BUNDLE" in lines[0] and "--ca-bundle" in lines[0], lines[0]
    assert "cannot reach" not in lines[0]
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c" / "manifests").glob("*.jsonl"))


def test_a_ca_bundle_that_does_not_exist_is_named(tls_s3rver, env, tmp_path):
    server, _ = tls_s3rver
    proc, _ = _fetch(server, tmp_path / "c", {**env, "AWS_CA_BUNDLE": str(tmp_path / "nope.pem")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tess: error: the CA bundle {str(tmp_path / 'nope.pem')!r} (from AWS_CA_BUNDLE) does not exist; pass the path "
        "of a PEM file with the CA that signed the server's certificate"
    ]


def test_no_verify_ssl_fetches_and_warns(tls_s3rver, env, tmp_path):
    server, _ = tls_s3rver
    proc, _ = _fetch(server, tmp_path / "c", env, "--no-verify-ssl")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "verification is off" in line]
    assert len(warnings) == 1 and warnings[0].startswith("tess: warning: "), proc.stderr
    _assert_right_bytes(tmp_path / "c")
