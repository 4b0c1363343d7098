"""Backoff between attempts, one home for its constants: full jitter, exponential, capped.

The mirror retries objects and the listing retries pages with it; each counts its own attempts.
"""

from __future__ import annotations

import random

BASE_S = 0.2
CAP_S = 5.0
BUDGET_S = 60.0  # no retry starts after this many seconds on one object or page


def backoff(attempt: int, *, base_s: float = BASE_S, cap_s: float = CAP_S) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): uniform in [0, min(cap, base * 2^n)]."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))
