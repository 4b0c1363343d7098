"""``upload``: put a local folder under an S3 prefix, skipping files the prefix already holds unchanged.

Like ``aws s3 sync``, one listing of the prefix decides: a file whose size and MD5 match the object of
the same key is not sent again (``--force`` sends all). The MD5 is compared with the ETag as S3 forms
it: the plain MD5 of a single-part object, or the MD5 of the parts' MD5s plus ``-N`` for a multipart one
(tess uploads files above :data:`MULTIPART_ABOVE` in :data:`PART_SIZE` parts, s3transfer's default). The
PUTs themselves stay boto3's (:mod:`pipeline.transport.boto`: multipart through s3transfer); the listing is the
transport's.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ClientOptions, S3Uri
from pipeline.transport.boto import MULTIPART_ABOVE, upload_file
from pipeline.transport.listing import list_objects

PART_SIZE = 8 << 20  # s3transfer's default multipart_chunksize, which upload_file uses


@dataclass(frozen=True, kw_only=True)
class UploadReport:
    uploaded: int
    uploaded_bytes: int
    skipped: int


def s3_etag_of(path: Path, size: int) -> str:
    """The ETag S3 gives this file as tess uploads it (hex, without quotes)."""
    with open(path, "rb") as f:
        if size <= MULTIPART_ABOVE:
            return hashlib.file_digest(f, "md5").hexdigest()
        parts = []
        while chunk := f.read(PART_SIZE):
            parts.append(hashlib.md5(chunk).digest())
    return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"


def unchanged(path: Path, listed: tuple[int, str] | None) -> bool:
    """True when ``listed`` (size, ETag) is this file's, as uploaded."""
    if listed is None:
        return False
    size = path.stat().st_size
    return listed[0] == size and listed[1].strip('"').lower() == s3_etag_of(path, size)


def upload_folder(
    root: Path, uri: S3Uri, options: ClientOptions, files: list[Path], *, force: bool, progress: bool = True
) -> UploadReport:
    """Upload ``files`` (under ``root``) to ``uri``; keys are the prefix plus the path relative to ``root``."""
    from tqdm import tqdm

    listed = {} if force else {o.key: (o.size, o.etag) for o in list_objects(uri, options)}
    key_of = {p: uri.prefix + p.relative_to(root).as_posix() for p in files}
    todo = [p for p in files if force or not unchanged(p, listed.get(key_of[p]))]
    sizes = {p: p.stat().st_size for p in todo}
    with (
        tqdm(
            total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1000, desc="upload", disable=not progress
        ) as bar,
        ThreadPoolExecutor(min(options.max_in_flight, 32)) as pool,
    ):

        def one(p: Path) -> None:
            upload_file(p, uri.bucket, key_of[p], options, uri_for_errors=uri.key_uri(key_of[p]))
            bar.update(sizes[p])

        for _ in pool.map(one, todo):
            pass
    return UploadReport(uploaded=len(todo), uploaded_bytes=sum(sizes.values()), skipped=len(files) - len(todo))


def files_under(root: Path) -> list[Path]:
    """The files under ``root``, sorted. Raises for a folder that is missing, unreadable or empty."""
    if not root.is_dir():
        raise FileNotFoundError(f"folder {str(root)!r} does not exist; pass a folder of images to upload")
    os.listdir(root)  # raises PermissionError here; rglob would silently find nothing in an unreadable folder
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"folder {str(root)!r} holds no files; nothing to upload")
    return files
