"""Faults of the parts around the relay, as readiness and the log see them.

A broker that went away, a dead-letter topic that cannot be written, a schema registry that does not answer
as one, a topic that vanished: each is a *fault* with a key (what it concerns) and a text (what is wrong,
naming the setting or the part). The stage that notices one raises it; the stage that sees it cleared
clears it. Readiness lists every current fault; the log gets one line when a fault appears, a reminder at
most every :data:`REMIND_EVERY_S` while it lasts, and one line when it clears — not one line per record
or per poll.

Several threads raise and clear faults (the intake thread, the event loop) and the health server's thread
reads them, so the board is guarded by a lock; every call is a few dict operations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

log = structlog.get_logger(__name__)

#: While a fault lasts, its line is repeated this often (a long outage stays visible in the log).
REMIND_EVERY_S: Final = 30.0


@dataclass
class _Fault:
    text: str
    since: float
    reminded: float
    expires: float | None


class FaultBoard:
    """The current faults, by key; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def raise_fault(
        self, key: str, text: str, *, event: str, ttl_s: float | None = None, **fields: object
    ) -> None:
        """Note that ``key`` is faulty; log ``event`` (error) if it is new, or when a reminder is due.

        ``ttl_s``: the fault clears by itself unless raised again within this time (for faults seen only as
        repeated errors, such as a topic that no longer exists).
        """
        now = self._clock()
        with self._lock:
            fault = self._faults.get(key)
            expires = None if ttl_s is None else now + ttl_s
            if fault is not None and (fault.expires is None or fault.expires > now):
                fault.text, fault.expires = text, expires
                if now - fault.reminded < REMIND_EVERY_S:
                    return
                fault.reminded = now
                lasting = round(now - fault.since)
            else:
                self._faults[key] = _Fault(text, now, now, expires)
                lasting = 0
        log.error(event, problem=text, lasting_s=lasting, **fields)

    def clear(self, key: str, *, event: str, **fields: object) -> None:
        """``key`` works again; log ``event`` (info) if it was faulty."""
        with self._lock:
            fault = self._faults.pop(key, None)
        if fault is not None:
            log.info(event, after_s=round(self._clock() - fault.since, 1), was=fault.text, **fields)

    def is_raised(self, key: str) -> bool:
        return key in self._faults

    def lasting(self, key: str) -> float | None:
        """How long the fault ``key`` has lasted, in seconds; None when it is not raised."""
        with self._lock:
            fault = self._faults.get(key)
            return None if fault is None else self._clock() - fault.since

    def current(self) -> list[str]:
        """The text of every current fault, oldest first (expired ones dropped)."""
        now = self._clock()
        with self._lock:
            for key in [k for k, f in self._faults.items() if f.expires is not None and f.expires <= now]:
                del self._faults[key]
            return [fault.text for fault in sorted(self._faults.values(), key=lambda f: f.since)]
