"""The event loop every request of a process runs on: one asyncio loop in a daemon thread per process.

The mirror, the listing and the streaming dataset all submit their coroutines here (:func:`run`), so
connections, kept alive across calls, always belong to the loop that opened them. Made on first use
and never crossing a fork: a DataLoader worker gets a loop of its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """One asyncio loop in a daemon thread per process."""

    _lock = threading.Lock()
    _current: tuple[int, LoopThread] | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tess-loop", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> LoopThread:
        cur = cls._current
        if cur is None or cur[0] != os.getpid():
            with cls._lock:
                cur = cls._current
                if cur is None or cur[0] != os.getpid():
                    cls._current = cur = (os.getpid(), LoopThread())
        return cur[1]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on this process's loop and wait for its result (from any thread but the loop's)."""
    lt = LoopThread.get()
    if threading.current_thread() is lt.thread:
        raise RuntimeError("transport.loop.run called from the loop's own thread; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coro, lt.loop).result()
