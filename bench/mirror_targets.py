"""The targets of the fetch bench (:mod:`bench.mirror_bench`): each one a ratio taken between two rows measured
in the same run (or one value held against a bound), with its status: ``met``, ``NOT met`` or ``not measured``
(``make bench-fetch`` prints them last and writes ``bench/results/mirror_targets.md``).

Owns the list of targets and how each is checked; the rows come from :mod:`bench.mirror_bench` (``measure``,
``noop_rows``, ``startup_rows``). The issue's targets come first, in this order:

* small (s3rver): objects/s >= 1.3x s5cmd's, client CPU ms/object <= 1.0x s5cmd's, start-up included;
* large (2 x 256 MB) and large4 (4 x 512 MB): MB/s >= 0.8x s5cmd's, client CPU s <= 1.0x rclone's (the same
  bytes), peak RSS < 300 MB;
* one100 (one 100 MB object): wall <= 2.0x s5cmd's;
* latency (+20 ms) and tls: objects/s >= 1.0x s5cmd's;
* start-up: ``python -m pipeline fetch --help`` <= 0.15 s wall (median of :data:`STARTUP_RUNS`);
* no-op re-fetch of the small set: tess over its own complete cache (0 GETs) no slower than ``s5cmd sync``
  onto its complete folder (0 GETs too, or the comparison is not a no-op and is "not measured");
* stream: a ``--source s3`` epoch >= 1.5x s3torchconnector's ``S3MapDataset``, from rows another bench hands
  in (:func:`stream_target`; "not measured" until then).

Then the earlier ones, kept as extra rows: every client refuses the TLS server without its CA; small objects/s
>= 1.0x tess-prev; moto objects/s >= 1.0x rclone; the no-op no slower than tess-base.
"""

from __future__ import annotations

from collections.abc import Sequence

Row = dict[str, object]

STARTUP_RUNS = 5
STARTUP_LIMIT_S = 0.15

# The stream target's rows (handed to :func:`targets` as ``extra_rows``, e.g. by bench/stream_bench.py): one row
# per loader, {"set": STREAM_SET, "key": STREAM_TESS or STREAM_PEER, "runs": k (> 0), "images/s": median}.
STREAM_SET = "stream"
STREAM_TESS = "readahead"  # tess's DSSDataset (--source s3) with read-ahead
STREAM_PEER = "s3map"  # s3torchconnector's S3MapDataset
STREAM_RATIO = 1.5

NOT_MEASURED = "not measured"


def _row(rows: Sequence[Row], set_name: str, key: str) -> Row | None:
    """The row of tool ``key`` in set ``set_name`` that has at least one successful run."""
    return next((r for r in rows if r.get("set") == set_name and r.get("key") == key and r.get("runs")), None)


def _set_label(rows: Sequence[Row], set_name: str, default: str) -> str:
    """``large (2 x 256 MB)``: the set's name with the objects and size this run measured (``default`` without rows)."""
    r = next((r for r in rows if r.get("set") == set_name and r.get("objects")), None)
    if r is None:
        return default
    n, mb = int(r["objects"]), float(r["set MB"])  # type: ignore[arg-type]
    return f"{set_name} ({n} x {mb / n:.0f} MB)" if mb / n >= 1 else f"{set_name} ({n:,} objects)"


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _ratio_target(
    rows: Sequence[Row],
    name: str,
    set_name: str,
    metric: str,
    peer: str | None,
    op: str,
    bound: float,
    tool: str = "tess",
    unit: str = "",
) -> Row:
    """``tool``'s ``metric`` on ``set_name`` divided by ``peer``'s (or alone, without a peer),
    held against ``bound``."""
    t = _row(rows, set_name, tool)
    p = _row(rows, set_name, peer) if peer else None
    if t is None or (peer and p is None):
        missing = tool if t is None else str(peer)
        if not any(r.get("set") == set_name for r in rows):
            why = f"the {set_name} set was not run"
        elif not any(r.get("set") == set_name and r.get("key") == missing for r in rows):
            why = f"{missing} was not run on {set_name}"
        else:
            why = f"every {missing} run on {set_name} failed"
        return {"target": name, "measured": f"n/a ({why})", "status": NOT_MEASURED}
    tv = float(t[metric])  # type: ignore[arg-type]
    value = tv / float(p[metric]) if p else tv  # type: ignore[arg-type]
    ok = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
    unit = unit or metric
    if p:
        measured = f"{value:.2f}x ({_num(tv)} vs {_num(float(p[metric]))} {unit})"  # type: ignore[arg-type]
    else:
        measured = f"{_num(tv)} {unit}"
    return {"target": name, "measured": measured, "status": "met" if ok else "NOT met"}


def _large_targets(rows: Sequence[Row], set_name: str, default: str) -> list[Row]:
    label = _set_label(rows, set_name, default)
    return [
        _ratio_target(rows, f"{label}: MB/s >= 0.8x s5cmd", set_name, "MB/s", "s5cmd", ">=", 0.8),
        _ratio_target(
            rows,
            f"{label}: client CPU s <= 1.0x rclone (the same bytes)",
            set_name,
            "client CPU s",
            "rclone",
            "<=",
            1.0,
            unit="CPU s",
        ),
        _ratio_target(rows, f"{label}: peak RSS < 300 MB", set_name, "peak RSS MB", None, "<", 300, unit="MB"),
    ]


def startup_target(rows: Sequence[Row]) -> Row:
    """``python -m pipeline fetch --help``: median wall of :data:`STARTUP_RUNS` runs <= :data:`STARTUP_LIMIT_S`."""
    name = f"start-up: `python -m pipeline fetch --help` <= {STARTUP_LIMIT_S} s wall (median of {STARTUP_RUNS})"
    r = _row(rows, "start-up", "tess")
    if r is None:
        return {"target": name, "measured": "n/a", "status": NOT_MEASURED}
    wall = float(r["wall s"])  # type: ignore[arg-type]
    return {
        "target": name,
        "measured": f"{wall:.3f} s (median of {r['runs']})",
        "status": "met" if wall <= STARTUP_LIMIT_S else "NOT met",
    }


def noop_target(rows: Sequence[Row]) -> Row:
    """The no-op re-fetch of the small set: tess over its complete cache sends no GET and is no slower than
    ``s5cmd sync`` onto its complete folder, which must send no GET either (else it is not a like-for-like no-op)."""
    small = next((r for r in rows if r.get("set") == "small" and r.get("objects")), None)
    keys = f"{int(small['objects']):,} " if small else ""  # type: ignore[arg-type]
    name = f"no-op re-fetch of the small set's {keys}unchanged keys: tess (0 GETs) no slower than s5cmd sync (0 GETs)"
    tess, s5 = _row(rows, "no-op", "tess"), _row(rows, "no-op", "s5cmd")
    if tess is None or s5 is None:
        return {
            "target": name,
            "measured": f"n/a ({'tess' if tess is None else 's5cmd'} has no no-op row)",
            "status": NOT_MEASURED,
        }
    tw, sw = float(tess["wall s"]), float(s5["wall s"])  # type: ignore[arg-type]
    measured = f"tess {tw:.2f} s, {tess['GETs']} GETs; s5cmd sync {sw:.2f} s, {s5['GETs']} GETs ({tw / sw:.2f}x)"
    if s5["GETs"] != 0:
        return {"target": name, "measured": measured + ": s5cmd sync was not a no-op", "status": NOT_MEASURED}
    return {"target": name, "measured": measured, "status": "met" if tess["GETs"] == 0 and tw <= sw else "NOT met"}


def stream_target(extra_rows: Sequence[Row] = ()) -> Row:
    """A ``--source s3`` streaming epoch: images/s of tess's read-ahead loader >= :data:`STREAM_RATIO` x
    S3MapDataset's, from ``extra_rows`` (see :data:`STREAM_SET`); "not measured" without them."""
    name = f"stream: `--source s3` epoch images/s >= {STREAM_RATIO}x s3torchconnector S3MapDataset"
    if not any(r.get("set") == STREAM_SET for r in extra_rows):
        return {"target": name, "measured": "n/a (bench/stream_bench.py)", "status": NOT_MEASURED}
    return _ratio_target(extra_rows, name, STREAM_SET, "images/s", STREAM_PEER, ">=", STREAM_RATIO, tool=STREAM_TESS)


def _noop_base_target(rows: Sequence[Row]) -> Row:
    """The no-op re-fetch: no GET at all, and a wall no longer than tess@BASE's over its own full cache."""
    name = "no-op re-fetch: 0 GETs, no slower than tess-base"
    noop, base = _row(rows, "no-op", "tess"), _row(rows, "no-op", "tess-base")
    if noop is None or base is None:
        return {"target": name, "measured": "n/a", "status": NOT_MEASURED}
    ratio = float(noop["wall s"]) / float(base["wall s"])  # type: ignore[arg-type]
    return {
        "target": name,
        "status": "met" if noop["GETs"] == 0 and ratio <= 1.0 else "NOT met",
        "measured": f"{noop['GETs']} GETs, {noop['wall s']:.2f} s vs {base['wall s']:.2f} s ({ratio:.2f}x)",
    }


def _ca_target(check_rows: Sequence[Row]) -> Row:
    """The TLS set measures verified connections: every client refused the server when not handed the CA."""
    name = "tls: every client refuses the server without the CA"
    if not check_rows:
        return {"target": name, "measured": "n/a", "status": NOT_MEASURED}
    accepted = [str(r["key"]) for r in check_rows if r["without the CA"] != "refused"]
    measured = f"{len(check_rows) - len(accepted)}/{len(check_rows)} refused"
    if accepted:
        measured += f" ({', '.join(accepted)} did not)"
    return {"target": name, "measured": measured, "status": "NOT met" if accepted else "met"}


def targets(rows: Sequence[Row], check_rows: Sequence[Row] = (), extra_rows: Sequence[Row] = ()) -> list[Row]:
    """Every target with its measured value and status ("met", "NOT met" or "not measured"): the issue's first,
    then the earlier ones. ``check_rows``: the TLS set's check without the CA; ``extra_rows``: rows measured by
    other benches (the stream target's, :func:`stream_target`)."""
    issue = [
        _ratio_target(
            rows, "small: objects/s >= 1.3x s5cmd (start-up included)", "small", "objects/s", "s5cmd", ">=", 1.3
        ),
        _ratio_target(
            rows,
            "small: client CPU ms/object <= 1.0x s5cmd (start-up included)",
            "small",
            "CPU ms/object",
            "s5cmd",
            "<=",
            1.0,
            unit="ms/object",
        ),
        *_large_targets(rows, "large", "large (2 x 256 MB)"),
        *_large_targets(rows, "large4", "large4 (4 x 512 MB)"),
        _ratio_target(
            rows,
            f"{_set_label(rows, 'one100', 'one100 (1 x 100 MB)')}: wall <= 2.0x s5cmd",
            "one100",
            "wall s",
            "s5cmd",
            "<=",
            2.0,
            unit="s",
        ),
        _ratio_target(rows, "latency (+20 ms): objects/s >= 1.0x s5cmd", "latency", "objects/s", "s5cmd", ">=", 1.0),
        _ratio_target(rows, "tls: objects/s >= 1.0x s5cmd", "tls", "objects/s", "s5cmd", ">=", 1.0),
        startup_target(rows),
        noop_target(rows),
        stream_target(extra_rows),
    ]
    earlier = [
        _ca_target(check_rows),
        _ratio_target(
            rows,
            "small: objects/s >= 1.0x tess-prev (the asyncio engine)",
            "small",
            "objects/s",
            "tess-prev",
            ">=",
            1.0,
        ),
        _ratio_target(rows, "moto: objects/s >= 1.0x rclone", "moto", "objects/s", "rclone", ">=", 1.0),
        _noop_base_target(rows),
    ]
    return issue + [{**r, "target": f"(earlier) {r['target']}"} for r in earlier]
