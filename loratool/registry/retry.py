"""Bounded retries with exponential backoff, full jitter and ``Retry-After``."""

from __future__ import annotations

import email.utils
import os
import random
import time
from dataclasses import dataclass

# Statuses worth another try (REGISTRY.md §1.6: back off on 429 and 5xx, never other 4xx).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait. ``LORATOOL_BACKOFF_BASE`` shrinks waits (tests)."""

    attempts: int = 5
    base: float = 1.0
    cap: float = 30.0
    max_retry_after: float = 120.0

    @classmethod
    def from_env(cls, attempts: int | None = None) -> RetryPolicy:
        base = _env_float("LORATOOL_BACKOFF_BASE", 1.0)
        return cls(attempts=5 if attempts is None else attempts, base=base, cap=max(base, 30.0 * base))

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (0-based): full jitter in [d/2, d]."""
        d = min(self.cap, self.base * (2**attempt))
        return random.uniform(d / 2, d)

    def delay(self, attempt: int, retry_after: str | None) -> float | None:
        """Seconds to wait, or None when ``Retry-After`` asks for longer than we accept."""
        wait = self.backoff(attempt)
        asked = parse_retry_after(retry_after)
        if asked is not None:
            if asked > self.max_retry_after:
                return None
            wait = max(wait, asked)
        return wait

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
