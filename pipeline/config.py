"""Configuration, one home for each default: S3 endpoints and client options, and the training run.

* :class:`ClientOptions`: how each S3 client talks to the store (``python -m pipeline`` flags).
* :func:`resolve_endpoint` / :func:`manifest_endpoint`: the one place an endpoint flag, the
  environment or a manifest's endpoint label becomes a URL.
* :class:`FetchConfig`: every flag of ``tess fetch``; :class:`TrainConfig`: every flag of ``tess train``
  (``train_vae.py``); :class:`VAEConfig`: the model's shape. The command lines are derived from their
  fields and defaults (:mod:`pipeline.flags`).
* The modes (:class:`LabelRule`, :class:`SyncPolicy`, :class:`Source`, ...) are :mod:`pipeline.modes`'s enums,
  re-exported here.

Credentials never appear here: boto3's standard chain (environment, profile, instance role) supplies
them, and nothing in tess prints or stores them. This module imports neither boto3 nor torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cache.uri import S3Uri
from pipeline.modes import DeviceKind, LabelRule, OnBadSample, PackMode, RetryMode, Source, SyncPolicy, parse_mode

if TYPE_CHECKING:
    from cache.shard import ShardSpec

__all__ = [
    "AWS_ENDPOINT",
    "DATASET_SYNC",
    "DEFAULT_LABELS",
    "DEFAULT_SYNC",
    "EMBEDDED_DEMO",
    "IMG_EXTENSIONS",
    "ClientOptions",
    "DeviceKind",
    "FetchConfig",
    "LabelRule",
    "OnBadSample",
    "PackMode",
    "RetryMode",
    "S3Uri",
    "Source",
    "SyncPolicy",
    "TrainConfig",
    "VAEConfig",
    "CACHE_DIR_HELP",
    "check_endpoint",
    "label_rule",
    "manifest_endpoint",
    "parse_extensions",
    "redact_url",
    "resolve_endpoint",
]

ENV_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
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
    URL: a caller that needs its objects starts an embedded server, see ``pipeline.fetch.repair``)."""
    if override:
        return override
    return label if label.startswith(("http://", "https://")) else None


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """How each S3 client talks to the store (the old ``dss.clientOption``).

    Attributes:
        endpoint: custom endpoint URL (MinIO, Ceph RGW, DSS); None means AWS. Path-style addressing
            is used for custom endpoints.
        max_in_flight: objects in flight per client on the event loop (``--max-in-flight``; each holds one
            connection at a time); uploads through boto3 cap their threads at 16-32 of them.
        retry_mode: botocore retry mode of the boto3 calls that remain (upload, bucket creation).
            The transport retries on its own (``max_attempts``).
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
    # Objects in flight per client on the mirror's event loop (docs/performance.md): 128 keeps a store
    # 20 ms away busy (128 / 0.02 s = 6,400 requests/s in flight) at no cost in threads; the blocking
    # paths (uploads through boto3) cap their threads at 16-32.
    max_in_flight: int = 128
    retry_mode: RetryMode = RetryMode.STANDARD
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
        if not 1 <= self.max_in_flight <= 1024:
            raise ValueError(f"max_in_flight={self.max_in_flight} must be between 1 and 1024 (--max-in-flight)")
        object.__setattr__(self, "retry_mode", parse_mode(RetryMode, self.retry_mode, "retry_mode", "--retry-mode"))
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


# The one default of --labels: fetch (FetchConfig), training (TrainConfig) and both command lines read it.
DEFAULT_LABELS = LabelRule.AUTO


def label_rule(value: str) -> LabelRule:
    """``value`` as a :class:`LabelRule`; ValueError naming the choices otherwise."""
    return parse_mode(LabelRule, value, "labels", "--labels, LABELS=")


# The one default of --sync (FetchConfig.sync, MirrorSettings.sync). Measured (docs/guarantees.md): one syncfs
# before the manifest costs a fraction of an fsync per blob.
DEFAULT_SYNC = SyncPolicy.BEFORE_MANIFEST
# A dataset the user drives (DSSDataset(load2memory=False)) writes no manifest, so nothing would ever sync its
# blobs before they are read: each is fsynced before its rename. The fetch stage passes DEFAULT_SYNC.
DATASET_SYNC = SyncPolicy.PER_BLOB


# The one help text of every --cache-dir: what cache.layout.default_cache_dir reads, in its order.
CACHE_DIR_HELP = "cache root (default $TESS_CACHE_DIR, else $XDG_CACHE_HOME/tess, else ~/.cache/tess)"


# The shape of the VAE (pipeline.train.model), stored in checkpoints; here so TrainConfig checks it without torch.
@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Shape and loss settings of a :class:`VAE`.

    Attributes:
        image_size: Height and width of the (square) input images; a power of
            two, at least 8.
        channels: Number of image channels (3 for RGB).
        latent_dim: Size of the latent vector ``z``.
        beta: Weight of the KL term in the loss (``beta``-VAE); 1.0 is the
            plain ELBO.
        base_channels: Channels of the first encoder convolution; each further
            stride-2 stage doubles it. 16 reconstructs the demo set as well as
            32 in 5 epochs at about half the CPU step time.
    """

    image_size: int = 32
    channels: int = 3
    latent_dim: int = 32
    beta: float = 1.0
    base_channels: int = 16

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 8 or size & (size - 1) != 0:
            raise ValueError(f"image_size must be a power of two >= 8, got {size}; resize images to 8, 16, 32, 64, ...")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}; use 3 for RGB or 1 for greyscale")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}; use a positive latent size such as 32")
        if not self.beta >= 0 or math.isinf(self.beta):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}; use 1.0 for the plain ELBO")
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {self.base_channels}; use a positive width such as 16")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain JSON-serialisable dict (for checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VAEConfig:
        """Rebuild a config from :meth:`to_dict` output.

        Args:
            data: Field names mapped to values; missing fields take defaults.

        Returns:
            The validated config.

        Raises:
            ValueError: If ``data`` has keys that are not config fields, or a
                value fails validation.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """What to fetch and how.

    Attributes:
        prefix: ``s3://bucket/prefix``.
        options: S3 client options (endpoint, connections, retries, timeouts).
        cache_dir: cache root; None: ``$TESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/tess``, else ``~/.cache/tess``.
        workers: DataLoader worker processes (0 = fetch in the main process).
        clients: clients per process; worker ``i`` uses client ``i % clients``.
        batch: objects per DataLoader batch (each batch is fetched concurrently).
        limit: fetch at most this many objects (the first ones in listing order).
        verify: rehash local blobs instead of trusting the key index.
        max_cache_bytes: after the fetch, evict until blobs + packs fit (see :mod:`cache.gc`); a prefix
            larger than the cap fails before any download.
        endpoint_label: what the manifest records as endpoint (default: the endpoint URL or ``aws``).
        progress: show a tqdm bar (bytes in MB = 10^6 bytes, like the summary line).
        sync: when blobs become durable (docs/guarantees.md); the manifest is always written after.
        shard: mirror only this shard of the listing (:mod:`cache.shard`); the manifest records it
            as ``shard: "k/N"`` and gets its own file. None (or ``k/1``) means the whole listing.
        labels: the label rule (:mod:`pipeline.fetch.labels`), decided over the whole listing before any
            sharding; the manifest records the rule applied as ``labels``.
    """

    prefix: str
    options: ClientOptions = field(default_factory=ClientOptions)
    cache_dir: str | os.PathLike[str] | None = None
    workers: int = 0
    clients: int = 1
    batch: int = 64
    limit: int | None = None
    verify: bool = False
    endpoint_label: str | None = None
    progress: bool = True
    max_cache_bytes: int | None = None
    shard: ShardSpec | None = None
    sync: SyncPolicy = DEFAULT_SYNC
    labels: LabelRule = DEFAULT_LABELS

    @property
    def shard_to_fetch(self) -> ShardSpec | None:
        """The shard to keep of the listing, None for all of it (no ``shard``, or ``k/1``)."""
        return self.shard if self.shard is not None and not self.shard.whole else None

    def __post_init__(self) -> None:
        S3Uri.parse(self.prefix)
        object.__setattr__(self, "labels", label_rule(self.labels))
        object.__setattr__(self, "sync", parse_mode(SyncPolicy, self.sync, "sync", "--sync"))
        if not 0 <= self.workers <= 256:
            raise ValueError(f"workers={self.workers} must be between 0 and 256 (-w/--workers, WORKERS=)")
        if not 1 <= self.clients <= 256:
            raise ValueError(f"clients={self.clients} must be between 1 and 256 (-c/--clients, CLIENTS=)")
        if not 1 <= self.batch <= 100_000:
            raise ValueError(f"batch={self.batch} must be between 1 and 100000 (--batch)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1 (--limit)")
        if self.max_cache_bytes is not None and self.max_cache_bytes < 1:
            raise ValueError(
                f"max_cache_bytes={self.max_cache_bytes} must be >= 1 (--max-cache-bytes, CACHE_MAX_BYTES=)"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs; ``train_vae.py`` derives its flags and defaults from it."""

    epochs: int = 1
    batch: int = 16
    workers: int = 0
    clients: int = 1
    lr: float = 1e-3
    latent_dim: int = VAEConfig.latent_dim
    beta: float = VAEConfig.beta
    image_size: int = VAEConfig.image_size
    seed: int = 0
    device: str = DeviceKind.AUTO  # a DeviceKind, or cuda:N
    amp: bool = False
    source: Source = Source.CACHE
    prefix: str | None = None
    endpoint: str | None = None
    manifest: str | None = None
    cache_dir: str | None = None
    out: str = "runs/latest"
    resume: bool = False
    force_resume: bool = False
    pack: PackMode = PackMode.AUTO
    on_bad_sample: OnBadSample = OnBadSample.STOP
    progress: bool = True
    # One intra-op thread: torch's default (one per core) spins OpenMP threads that collapse when any other
    # process wants a core (bench/results/contention_n2000.md, 2 cores: one thread 785 img/s beside a busy
    # process vs 268 for torch's default, at a 17% cost when idle); 0 means torch's own choice.
    threads: int = 1
    extensions: tuple[str, ...] = IMG_EXTENSIONS
    # auto with --source cache: the manifest's labels as recorded at fetch time (pipeline.train.sources).
    labels: LabelRule = DEFAULT_LABELS
    # --source s3: batches each DataLoader process keeps in flight ahead of the one asked for (pipeline.data.readahead).
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
            (not self.cache_as_you_go or self.source == Source.S3, "--cache-as-you-go applies to --source s3 only"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be a positive number (--lr)"),
            (
                self.device.split(":")[0] in tuple(DeviceKind),
                f"device={self.device!r} must be auto, cpu, cuda[:N] or mps (--device)",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for name, kind, flag in (
            ("source", Source, "--source"),
            ("pack", PackMode, "--pack"),
            ("on_bad_sample", OnBadSample, "--on-bad-sample"),
        ):
            object.__setattr__(self, name, parse_mode(kind, getattr(self, name), name, flag))
        object.__setattr__(self, "extensions", parse_extensions(self.extensions))
        object.__setattr__(self, "labels", label_rule(self.labels))
        VAEConfig(image_size=self.image_size, latent_dim=self.latent_dim, beta=self.beta)

    @property
    def device_kind(self) -> DeviceKind:
        """The kind of ``device`` (``cuda:1`` is :attr:`DeviceKind.CUDA`)."""
        return DeviceKind(self.device.split(":")[0])
