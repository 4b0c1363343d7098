"""Configuration, one home for each default: S3 endpoints and client options, and the training run.

* :class:`ClientOptions`: how each S3 client talks to the store (``python -m pipeline`` flags).
* :func:`resolve_endpoint` / :func:`manifest_endpoint`: the one place an endpoint flag, the
  environment or a manifest's endpoint label becomes a URL.
* :class:`TrainConfig`: every flag of ``train_vae.py``; the command line is derived from its defaults.
* :class:`LabelRule`: the values of ``--labels`` (fetch and training); the rule itself is :mod:`pipeline.labels`.
* :class:`SyncPolicy`: the values of ``fetch --sync``; the mirror (:mod:`pipeline.mirror`) applies them.

Credentials never appear here: boto3's standard chain (environment, profile, instance role) supplies
them, and nothing in tess prints or stores them. This module imports neither boto3 nor torch.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cache.uri import S3Uri

__all__ = ["AWS_ENDPOINT", "EMBEDDED_DEMO", "IMG_EXTENSIONS", "ClientOptions", "LabelRule", "S3Uri", "SyncPolicy",
           "TrainConfig", "DEFAULT_LABELS", "DEFAULT_SYNC", "check_endpoint", "label_rule", "manifest_endpoint", "parse_extensions", "redact_url", "resolve_endpoint"]

ENV_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
RETRY_MODES = ("standard", "adaptive", "legacy")
# Endpoint labels that manifests record instead of a URL.
AWS_ENDPOINT = "aws"
# The embedded demo server listens on a fresh port each run, so its manifests name it by this label.
EMBEDDED_DEMO = "embedded-demo"


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for messages)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"***@{host}").geturl()


def check_endpoint(url: str) -> str:
    """Validate an endpoint URL and return it without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {redact_url(url)!r} is not an http(s) URL; use e.g. ENDPOINT=http://127.0.0.1:9000")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"endpoint {redact_url(url)!r} contains credentials; remove them from the URL and set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"endpoint {url!r} has a query or fragment; pass only scheme://host[:port][/path]")
    return url.rstrip("/")


def resolve_endpoint(explicit: str | None = None) -> str | None:
    """``explicit``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    for candidate in (explicit, *(os.environ.get(k) for k in ENV_ENDPOINTS)):
        if candidate:
            return check_endpoint(candidate)
    return None


def manifest_endpoint(label: str, override: str | None = None) -> str | None:
    """The URL to reach a manifest's objects: ``override`` (``--endpoint``), else the manifest's
    endpoint label when it is a URL, else None (AWS; and :data:`EMBEDDED_DEMO`, which has no lasting
    URL: a caller that needs its objects starts an embedded server, see ``pipeline.repair``)."""
    if override:
        return override
    return label if label.startswith(("http://", "https://")) else None


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """How each S3 client talks to the store (the old ``dss.clientOption``).

    Attributes:
        endpoint: custom endpoint URL (MinIO, Ceph RGW, DSS); None means AWS. Path-style addressing
            is used for custom endpoints.
        max_connections: objects in flight per client on the event loop (and boto3's pool for uploads).
        retry_mode: botocore retry mode of the boto3 calls that remain (upload, bucket creation):
            ``standard`` or ``adaptive`` (client-side rate limiting). The transport retries on its own.
        max_attempts: attempts per request, first try included (botocore) and per object body.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds without bytes before a read fails.
        region: signing region; None lets botocore decide (us-east-1 for custom endpoints).
        ca_bundle: PEM file of the CAs to trust for https endpoints (``--ca-bundle``); None: ``AWS_CA_BUNDLE``,
            then ``ca_bundle`` of the AWS config profile, then botocore's default bundle
            (:mod:`pipeline.transport.tls`).
        verify_ssl: False skips TLS certificate verification (``--no-verify-ssl``; the CLI warns).
    """

    endpoint: str | None = None
    # Objects in flight per client on the mirror's event loop (README "Performance"): 128 keeps a store
    # 20 ms away busy (128 / 0.02 s = 6,400 requests/s in flight) at no cost in threads; the blocking
    # paths (uploads through boto3) cap their threads at 16-32.
    max_connections: int = 128
    retry_mode: str = "standard"
    max_attempts: int = 4
    connect_timeout: float = 3.0
    # Bounds the silence between bytes, not the length of a download.
    read_timeout: float = 10.0
    region: str | None = None
    ca_bundle: str | None = None
    verify_ssl: bool = True

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", check_endpoint(self.endpoint))
        if not 1 <= self.max_connections <= 1024:
            raise ValueError(f"max_connections={self.max_connections} must be between 1 and 1024")
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(f"retry_mode={self.retry_mode!r} must be one of {', '.join(RETRY_MODES)}")
        if not 1 <= self.max_attempts <= 20:
            raise ValueError(f"max_attempts={self.max_attempts} must be between 1 and 20")
        for name in ("connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 seconds")

    @property
    def endpoint_label(self) -> str:
        """What manifests record as the endpoint: the URL, or ``aws`` for AWS itself."""
        return self.endpoint or AWS_ENDPOINT


# torchvision.datasets.folder.IMG_EXTENSIONS, plus .gif (Pillow decodes it, as it does all of these).
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def parse_extensions(text: str | Iterable[str]) -> tuple[str, ...]:
    """``".png,.JPG"`` or ``["png", ".jpg"]`` -> ``(".png", ".jpg")`` (lowercase, with the dot).

    Raises:
        ValueError: no extension given, or one with a path separator or a space.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        ext = item.strip().lower()
        if not ext:
            continue
        ext = ext if ext.startswith(".") else "." + ext
        if "/" in ext or " " in ext or ext == ".":
            raise ValueError(f"--extensions: {item!r} is not a file extension; pass a list like .png,.jpg")
        if ext not in out:
            out.append(ext)
    if not out:
        raise ValueError(f"--extensions {text!r} names no extension; pass a list like .png,.jpg,.jpeg")
    return tuple(out)


class LabelRule(enum.StrEnum):
    """How the keys of one listing get their labels (``--labels``): one rule for the whole listing.

    Here, beside the other flag values, and not in :mod:`pipeline.labels`: this module must stay free of
    the listing's imports (the mirror imports this module).
    """

    AUTO = "auto"  # folder when every image key lies in a class folder, else suffix when every one has it, else none
    FOLDER = "folder"  # the first folder below the prefix is the class (torchvision ImageFolder)
    SUFFIX = "suffix"  # <stem>_<int>.<ext> gives int (the research loader)
    NONE = "none"  # -1 for every key


# The one default of --labels: fetch (FetchConfig), training (TrainConfig) and both command lines read it.
DEFAULT_LABELS = LabelRule.AUTO


def label_rule(value: str) -> LabelRule:
    """``value`` as a :class:`LabelRule`; ValueError naming the choices otherwise."""
    try:
        return LabelRule(value)
    except ValueError:
        raise ValueError(f"labels={value!r} must be one of {', '.join(LabelRule)} (--labels, LABELS=)") from None


class SyncPolicy(enum.Enum):
    """When blobs become durable (``fetch --sync``; README "Guarantees").

    Here, beside the other flag values, and not in :mod:`pipeline.mirror_types` (which re-exports it): the
    command line builds ``--sync`` from it, and importing the mirror's vocabulary costs 30-40 ms of start-up
    (the body checks, thread pools) that ``fetch --help`` never needs.
    """

    PER_BLOB = "per-blob"  # fsync every blob before its rename
    # One syncfs of the cache filesystem before the manifest is written (blobs fetched in ranges, at
    # least large_threshold bytes, are still fsynced each, off the event loop, where it overlaps downloads).
    BEFORE_MANIFEST = "before-manifest"


# The one default of --sync (MirrorSettings.sync, and through it FetchConfig.sync, and the command line). Measured
# (README "Guarantees"): one syncfs before the manifest costs a fraction of an fsync per blob.
DEFAULT_SYNC = SyncPolicy.BEFORE_MANIFEST


SOURCES = ("cache", "s3")
PACK_MODES = ("auto", "on", "off")
BAD_SAMPLE_MODES = ("stop", "skip")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs; ``train_vae.py`` derives its flags and defaults from it."""

    epochs: int = 1
    batch: int = 16
    workers: int = 0
    clients: int = 1
    lr: float = 1e-3
    latent_dim: int = 32
    beta: float = 1.0
    image_size: int = 32
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    source: str = "cache"
    prefix: str | None = None
    endpoint: str | None = None
    manifest: str | None = None
    cache_dir: str | None = None
    out: str = "runs/latest"
    resume: bool = False
    force_resume: bool = False
    pack: str = "auto"
    on_bad_sample: str = "stop"
    progress: bool = True
    # One intra-op thread: torch's default (one per core) spins OpenMP threads that collapse when any other
    # process wants a core (bench/results/contention_n2000.md, 2 cores: one thread 785 img/s beside a busy
    # process vs 268 for torch's default, at a 17% cost when idle); 0 means torch's own choice.
    threads: int = 1
    extensions: tuple[str, ...] = IMG_EXTENSIONS
    # auto with --source cache: the manifest's labels as recorded at fetch time (pipeline.sources).
    labels: LabelRule = DEFAULT_LABELS
    # --source s3: batches each DataLoader process keeps in flight ahead of the one asked for (pipeline.readahead).
    prefetch: int = 2
    # --source s3: store the streamed bodies in the cache and pin them in a manifest after the first epoch.
    cache_as_you_go: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs={self.epochs} must be >= 1 (-e/--epochs)"),
            (self.batch >= 1, f"batch={self.batch} must be >= 1 (-b/--batch)"),
            (0 <= self.workers <= 64, f"workers={self.workers} must be between 0 and 64 (-w/--workers)"),
            (self.clients >= 1, f"clients={self.clients} must be >= 1 (-c/--clients)"),
            (self.threads >= 0, f"threads={self.threads} must be >= 0 (--threads; 0 = torch's default)"),
            (0 <= self.prefetch <= 64, f"prefetch={self.prefetch} must be between 0 and 64 (--prefetch)"),
            (not self.cache_as_you_go or self.source == "s3", "--cache-as-you-go applies to --source s3 only"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be a positive number (--lr)"),
            (self.source in SOURCES, f"source={self.source!r} must be one of {', '.join(SOURCES)} (--source)"),
            (self.pack in PACK_MODES, f"pack={self.pack!r} must be one of {', '.join(PACK_MODES)} (--pack)"),
            (self.on_bad_sample in BAD_SAMPLE_MODES, f"on_bad_sample={self.on_bad_sample!r} must be stop or skip"),
            (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
             f"device={self.device!r} must be auto, cpu, cuda[:N] or mps (--device)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        object.__setattr__(self, "extensions", parse_extensions(self.extensions))
        object.__setattr__(self, "labels", label_rule(self.labels))
        # Imported here, not at the top: the model module imports torch, and this module must not
        # (``python -m pipeline fetch`` and ``train_vae.py --help`` read it).
        from pipeline.model import VAEConfig

        VAEConfig(image_size=self.image_size, latent_dim=self.latent_dim, beta=self.beta)
