"""The dead-letter guard: a systemic fault halts the service instead of draining the topic into the DLQ.

Two signals, both cheap per record:

* The share of dead-lettered records among the most recent settled ones. A run of bad records is normal
  (a bad deploy upstream); most of the traffic failing is not.
* Authentication answers (401, 403) say something about the *shop*, not the record: a revoked or rotated
  ``apiKey`` turns every call into 401. A record that got one is held as a *suspect* — neither
  dead-lettered nor committed — until a call of the same shop succeeds (then the fault was the record's,
  and it is dead-lettered) or the suspects are enough to trip the guard (then the service halts, and the
  committed offsets stop before the first suspect: after the key is fixed, everything is delivered).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from consumer.config import DeadLetterConfig

#: Statuses that indict the shop's credentials rather than the record.
SHOP_WIDE_STATUSES: Final = frozenset({401, 403})


class GuardTripped(Exception):
    """The dead-letter guard halted the service; the message names the cause and the shop."""


class DeadLetterGuard:
    def __init__(self, config: DeadLetterConfig) -> None:
        self._max_ratio = config.max_ratio
        self._min = config.min_dead_lettered
        self._window: deque[bool] = deque(maxlen=config.window_records)
        self._dead = 0

    def note(self, dead: bool) -> None:
        """Count one settled (or held) record."""
        window = self._window
        if len(window) == window.maxlen and window[0]:
            self._dead -= 1
        window.append(dead)
        if dead:
            self._dead += 1

    def note_delivered(self, count: int) -> None:
        """Count ``count`` records that settled without a dead letter (a batch's worth)."""
        window = self._window
        size = window.maxlen or 0
        if count >= size:
            window.clear()
            window.extend([False] * size)
            self._dead = 0
            return
        for _ in range(min(count, len(window) + count - size)):
            if window.popleft():
                self._dead -= 1
        window.extend([False] * count)

    def would_trip(self, extra_dead: int = 1) -> bool:
        """Would ``extra_dead`` more dead-lettered records cross the threshold?"""
        dead = self._dead + extra_dead
        total = min(len(self._window) + extra_dead, self._window.maxlen or 0)
        dead = min(dead, total)
        return dead >= self._min and dead / total > self._max_ratio

    @property
    def ratio(self) -> float:
        return self._dead / len(self._window) if self._window else 0.0
