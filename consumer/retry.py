"""How long to wait before trying a transient failure again: exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads the retries of many workers
apart, so a recovering API is not met by all of them at once. A server's ``Retry-After`` is a floor: the
relay never calls back sooner than it was told.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from consumer.config import RetryConfig


class Backoff:
    def __init__(self, config: RetryConfig, draw: Callable[[float, float], float] = random.uniform) -> None:
        self.base = config.base_s
        self.cap = config.cap_s
        self.max_age = config.max_age_s
        self._draw = draw

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts failures so far, from 1)."""
        ceiling = min(self.cap, self.base * 2 ** min(attempt - 1, 62))
        wait = self._draw(0.0, ceiling)
        return wait if retry_after is None else max(wait, retry_after)

    def expired(self, first_failure: float | None, now: float) -> bool:
        """True when a configured maximum age has passed since the first failure (never, by default)."""
        return self.max_age is not None and first_failure is not None and now - first_failure >= self.max_age
