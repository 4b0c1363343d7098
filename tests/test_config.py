"""Parsing and validation of URIs, endpoints and client options: every bad value gets a message with the fix."""

import pytest

from pipeline.config import ClientOptions, S3Uri, redact_url, resolve_endpoint


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("s3://data/train/", "data", "train/"),
        ("s3://data", "data", ""),
        ("s3://my.bucket-1/a b/ü/", "my.bucket-1", "a b/ü/"),
        ("s3://data//lead", "data", "/lead"),
    ],
)
def test_s3_uri_parses(uri, bucket, prefix):
    u = S3Uri.parse(uri)
    assert (u.bucket, u.prefix) == (bucket, prefix)
    assert str(u) == f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("data/train", "is not an S3 URI; use s3://bucket/prefix"),
        ("http://data/train", "is not an S3 URI"),
        ("s3://", "has no bucket name"),
        ("s3:///train", "has no bucket name"),
        ("s3://a/x", "is not a valid bucket name"),
        ("s3://bad bucket/x", "is not a valid bucket name"),
    ],
)
def test_s3_uri_rejects_with_fix(uri, fragment):
    with pytest.raises(ValueError) as e:
        S3Uri.parse(uri)
    assert fragment in str(e.value)
    assert repr(uri) in str(e.value)


def test_endpoint_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(ValueError) as e:
        ClientOptions(endpoint="http://admin:hunter2@127.0.0.1:9000")
    msg = str(e.value)
    assert "contains credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert "hunter2" not in msg and "admin" not in msg
    assert redact_url("http://u:p@h:1/x") == "http://***@h:1/x"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_in_flight": 0}, "max_in_flight=0 must be between 1 and 1024"),
        ({"retry_mode": "fast"}, "retry_mode='fast' must be one of standard, adaptive, legacy"),
        ({"max_attempts": 0}, "max_attempts=0 must be between 1 and 20"),
        ({"connect_timeout": 0}, "connect_timeout=0 must be > 0"),
        ({"endpoint": "ftp://x"}, "is not an http(s) URL"),
    ],
)
def test_client_options_validation(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        ClientOptions(**kwargs)
    assert fragment in str(e.value)


def test_endpoint_resolution_order(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert resolve_endpoint(None) is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert resolve_endpoint(None) == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2/")
    assert resolve_endpoint(None) == "http://s3-specific:2"
    assert resolve_endpoint("http://explicit:3") == "http://explicit:3"


def test_client_options_are_frozen_and_hashable():
    o = ClientOptions(endpoint="http://127.0.0.1:9000")
    with pytest.raises(AttributeError):
        o.max_in_flight = 3  # type: ignore[misc]
    assert hash(o) == hash(ClientOptions(endpoint="http://127.0.0.1:9000/"))


@pytest.mark.parametrize(
    ("label", "override", "url"),
    [
        ("http://10.0.0.1:9000", None, "http://10.0.0.1:9000"),
        ("https://minio.example", None, "https://minio.example"),
        ("aws", None, None),
        ("embedded-demo", None, None),
        ("aws", "http://127.0.0.1:9", "http://127.0.0.1:9"),
        ("http://10.0.0.1:9000", "http://127.0.0.1:9", "http://127.0.0.1:9"),
    ],
)
def test_manifest_endpoint_turns_a_label_into_a_url(label, override, url):
    from pipeline.config import AWS_ENDPOINT, EMBEDDED_DEMO, manifest_endpoint

    assert manifest_endpoint(label, override) == url
    assert {AWS_ENDPOINT, EMBEDDED_DEMO} == {"aws", "embedded-demo"}  # the labels manifests on disk hold


def test_train_vae_flags_take_their_defaults_from_train_config():
    import dataclasses

    import train_vae
    from pipeline.config import TrainConfig

    parser = train_vae.build_parser()
    args = parser.parse_args([])
    fields = dataclasses.fields(TrainConfig)
    # Every field has a flag, and every flag's default is the field's default (a tuple as a comma list).
    flag_defaults = {f.name: getattr(args, f.name) for f in fields}
    assert flag_defaults == {f.name: ",".join(f.default) if isinstance(f.default, tuple) else f.default for f in fields}
    assert TrainConfig(**flag_defaults) == TrainConfig()
    # Parsed values reach the config by name, with their types.
    argv = [
        "-e",
        "3",
        "-b",
        "8",
        "--lr",
        "0.01",
        "--threads",
        "2",
        "--no-progress",
        "--amp",
        "--pack",
        "off",
        "--extensions",
        "PNG,.jpg",
    ]
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields})
    assert (config.epochs, config.batch, config.lr, config.threads, config.progress, config.amp, config.pack) == (
        3,
        8,
        0.01,
        2,
        False,
        True,
        "off",
    )
    assert config.extensions == (".png", ".jpg")
    assert "(default 16)" in " ".join(parser.format_help().split())


def test_fetch_flags_have_the_defaults_of_fetch_config_and_client_options():
    from pipeline.cli import build_parser
    from pipeline.fetch.stage import FetchConfig

    args = build_parser().parse_args(["fetch", "s3://bkt/p/"])
    f = FetchConfig(prefix="s3://bkt/p/")
    assert (args.workers, args.clients, args.batch, args.limit, args.verify, args.cache_dir) == (
        f.workers,
        f.clients,
        f.batch,
        f.limit,
        f.verify,
        f.cache_dir,
    )
    d = ClientOptions()
    assert (args.max_in_flight, args.retry_mode, args.max_attempts, args.connect_timeout, args.read_timeout) == (
        d.max_in_flight,
        d.retry_mode,
        d.max_attempts,
        d.connect_timeout,
        d.read_timeout,
    )
