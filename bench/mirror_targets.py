"""The targets of the fetch bench (:mod:`bench.mirror_bench`): each one a ratio taken between two rows of the
fetch table measured in the same run, with its status (``make bench-fetch`` prints them last).

Owns the list of targets and how each is checked; the rows come from :func:`bench.mirror_bench.measure`.
"""

from __future__ import annotations

from collections.abc import Sequence

Row = dict[str, object]


def _row(rows: Sequence[Row], set_name: str, key: str) -> Row | None:
    """The row of tool ``key`` in set ``set_name`` that has at least one successful run."""
    return next((r for r in rows if r["set"] == set_name and r["key"] == key and r.get("runs")), None)


def _ratio_target(rows: Sequence[Row], name: str, set_name: str, metric: str, peer: str | None, op: str,
                  bound: float, tool: str = "tess") -> Row:
    """``tool``'s ``metric`` on ``set_name`` divided by ``peer``'s (or alone, without a peer), held against ``bound``."""
    t = _row(rows, set_name, tool)
    p = _row(rows, set_name, peer) if peer else None
    if t is None or (peer and p is None):
        return {"target": name, "measured": "n/a", "status": "not measured"}
    value = float(t[metric]) / float(p[metric]) if p else float(t[metric])  # type: ignore[arg-type]
    ok = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
    return {"target": name, "measured": f"{value:.2f}{'x' if p else ''}", "status": "met" if ok else "NOT met"}


def _noop_target(rows: Sequence[Row]) -> Row:
    """The no-op re-fetch: no GET at all, and a wall no longer than tess@BASE's over its own full cache."""
    name = "no-op re-fetch: 0 GETs, no slower than tess-base"
    noop, base = _row(rows, "no-op", "tess"), _row(rows, "no-op", "tess-base")
    if noop is None:
        return {"target": name, "measured": "n/a", "status": "not measured"}
    base_wall = float(base["wall s"]) if base else float("nan")  # type: ignore[arg-type]
    ratio = float(noop["wall s"]) / base_wall if base else float("nan")  # type: ignore[arg-type]
    ok = noop["GETs"] == 0 and (base is None or ratio <= 1.0)
    return {"target": name, "status": "met" if ok else "NOT met",
            "measured": f"{noop['GETs']} GETs, {noop['wall s']:.2f} s vs {base_wall:.2f} s ({ratio:.2f}x)"}


def _ca_target(check_rows: Sequence[Row]) -> Row:
    """The TLS set measures verified connections: every client refused the server when not handed the CA."""
    name = "tls: every client refuses the server without the CA"
    if not check_rows:
        return {"target": name, "measured": "n/a", "status": "not measured"}
    accepted = [str(r["key"]) for r in check_rows if r["without the CA"] != "refused"]
    measured = f"{len(check_rows) - len(accepted)}/{len(check_rows)} refused"
    if accepted:
        measured += f" ({', '.join(accepted)} did not)"
    return {"target": name, "measured": measured, "status": "NOT met" if accepted else "met"}


def targets(rows: Sequence[Row], check_rows: Sequence[Row] = ()) -> list[Row]:
    """Every target with its measured value and status ("met", "NOT met" or "not measured")."""
    return [
        _ratio_target(rows, "small: client CPU ms/object <= 1.0x s5cmd (start-up included)", "small", "CPU ms/object",
                      "s5cmd", "<=", 1.0),
        _ratio_target(rows, "small: objects/s >= 1.0x tess-prev (the asyncio engine)", "small", "objects/s",
                      "tess-prev", ">=", 1.0),
        _ratio_target(rows, "latency (+20 ms): objects/s >= 1.0x s5cmd", "latency", "objects/s", "s5cmd", ">=", 1.0),
        _ratio_target(rows, "tls: objects/s >= 1.0x s5cmd", "tls", "objects/s", "s5cmd", ">=", 1.0),
        _ca_target(check_rows),
        _ratio_target(rows, "large: MB/s >= 0.8x s5cmd", "large", "MB/s", "s5cmd", ">=", 0.8),
        _ratio_target(rows, "large: peak RSS < 300 MB", "large", "peak RSS MB", None, "<", 300),
        _ratio_target(rows, "moto: objects/s >= 1.0x rclone", "moto", "objects/s", "rclone", ">=", 1.0),
        _noop_target(rows),
    ]
