"""S3's XML answers, read with the standard library's expat-based parsers: ListObjectsV2 pages and errors.

Keys come back as the server sent them; with ``encoding-type=url`` (which tess asks for, as botocore
does, so keys with characters XML cannot carry survive) they are decoded only when the answer says
``<EncodingType>url</EncodingType>``, exactly as botocore decides.
"""

from __future__ import annotations

import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: str


@dataclass(frozen=True, kw_only=True)
class ListPage:
    objects: list[ListedObject]
    truncated: bool
    next_token: str | None


class MalformedXML(ValueError):
    """The answer is not the XML S3 sends."""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_list_page(body: bytes) -> ListPage:
    """One ListObjectsV2 page.

    Raises:
        MalformedXML: not XML, not a ListBucketResult, or a Contents entry without Key or a numeric Size.
    """
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise MalformedXML(f"the LIST answer is not XML ({e})") from None
    if _local(root.tag) != "ListBucketResult":
        raise MalformedXML(f"the LIST answer is a <{_local(root.tag)}>, not a <ListBucketResult>")
    fields: dict[str, str] = {}
    entries = []
    for child in root:
        name = _local(child.tag)
        if name == "Contents":
            entries.append({_local(c.tag): c.text or "" for c in child})
        else:
            fields[name] = child.text or ""
    decode = fields.get("EncodingType", "").lower() == "url"
    objects = []
    for entry in entries:
        if "Key" not in entry or not entry.get("Size", "").isdigit():
            raise MalformedXML(f"a LIST entry without a Key or a numeric Size ({sorted(entry)})")
        key = urllib.parse.unquote_plus(entry["Key"]) if decode else entry["Key"]
        objects.append(
            ListedObject(
                key=key,
                size=int(entry["Size"]),
                etag=entry.get("ETag", ""),
                last_modified=entry.get("LastModified", ""),
            )
        )
    truncated = fields.get("IsTruncated", "false").strip().lower() == "true"
    return ListPage(objects=objects, truncated=truncated, next_token=fields.get("NextContinuationToken") or None)


def error_code(body: bytes) -> str | None:
    """The ``<Code>`` of an S3 error answer, also from the first bytes of a cut or oversized one."""
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("end",))
    try:
        parser.feed(body)  # a cut document is no error until close(), which is never called
    except ET.ParseError:
        pass  # the events parsed before the bad byte are still there
    for event in parser.read_events():
        el = event[-1]  # ("end", element): the only events asked for
        if isinstance(el, ET.Element) and _local(el.tag) == "Code" and el.text:
            return el.text.strip()[:128]
    return None
