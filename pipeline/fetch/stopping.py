"""Ctrl-C and SIGTERM during a fetch: noted by the signal handler, acted on at a safe point.

A signal handler that raised at once could land between a record leaving the mirror's queue and its
entry in the key index, and a blob already in the cache would be fetched again next time. So
:func:`deferred` makes SIGINT and SIGTERM only set a flag, and the fetch loop calls
:func:`raise_if_requested` where nothing is in hand (``pipeline.fetch.mirror_loop``): it raises
:class:`KeyboardInterrupt` or :class:`Terminated`, every ``finally`` runs, and what finished is indexed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM: ended like Ctrl-C (exit 143)."""


_requested: list[int] = []


def _note(signum: int, frame: object) -> None:
    if signum == signal.SIGINT and _requested:
        raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for a safe point
    _requested.append(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are noted instead of raising (main thread only; elsewhere a no-op).
    The handlers before are restored after, and nothing noted outlives the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        _requested.clear()


def raise_if_requested() -> None:
    """Raise what a noted signal asks for (call where an exception loses nothing)."""
    if _requested:
        raise Terminated() if _requested[0] == signal.SIGTERM else KeyboardInterrupt()
