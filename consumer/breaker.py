"""A circuit breaker per shop: a long outage costs a handful of requests, not a retry storm.

Closed: calls go through. After ``threshold`` transient failures in a row the breaker *opens*: no call of the
shop goes out, except one *probe* at a time, at growing intervals (``probe_base_s`` doubling up to
``probe_cap_s``). The first answer that is not transient (delivered, or even a permanent 4xx: the API is up)
closes it, and every held call goes on. Each state change is logged once.

While a shop's breaker is open its records stay in flight, so the relay pauses the partitions that feed
that shop: the backlog stays in Kafka, not in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Literal

import structlog

from consumer.config import RetryConfig

log = structlog.get_logger(__name__)

State = Literal["closed", "open"]


class CircuitBreaker:
    @classmethod
    def per_shop(
        cls, shops: Iterable[str], retry: RetryConfig, on_change: Callable[[str, State], None]
    ) -> dict[str, CircuitBreaker]:
        """One breaker per shop, as ``retry`` configures them."""
        return {
            shop: cls(
                shop,
                threshold=retry.breaker_threshold,
                probe_base_s=retry.breaker_probe_base_s,
                probe_cap_s=retry.breaker_probe_cap_s,
                on_change=on_change,
            )
            for shop in shops
        }

    def __init__(
        self,
        shop: str,
        *,
        threshold: int,
        probe_base_s: float,
        probe_cap_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, State], None] | None = None,
    ) -> None:
        self.shop = shop
        self._threshold = threshold
        self._base = probe_base_s
        self._cap = probe_cap_s
        self._clock = clock
        self._on_change = on_change
        self.state: State = "closed"
        self.failures = 0
        self._interval = probe_base_s
        self._next_probe = 0.0
        self._probing = False
        self._closed = asyncio.Event()
        self._closed.set()
        self.probes = 0

    async def admit(self) -> bool:
        """Wait until a call may go; True when this call is the probe of an open breaker."""
        while self.state == "open":
            now = self._clock()
            if not self._probing and now >= self._next_probe:
                self._probing = True
                self.probes += 1
                return True
            # Wait for the breaker to close, or for the next probe slot (another waiter may take it).
            wait = max(self._next_probe - now, 0.0) if not self._probing else self._interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=max(wait, 0.001))
        return False

    def record(self, transient: bool, probe: bool) -> None:
        """Count an answer: ``transient`` for a timeout, connection error, 408/425/429/5xx."""
        if probe:
            self._probing = False
        if not transient:
            self.failures = 0
            if self.state == "open":
                self._change("closed")
                self._interval = self._base
                self._closed.set()
            return
        self.failures += 1
        if self.state == "closed" and self.failures >= self._threshold:
            self._interval = self._base
            self._next_probe = self._clock() + self._interval
            self._closed.clear()
            self._change("open")
        elif self.state == "open" and probe:
            self._interval = min(self._interval * 2, self._cap)
            self._next_probe = self._clock() + self._interval

    def _change(self, state: State) -> None:
        self.state = state
        if state == "open":
            log.warning("breaker.opened", shop=self.shop, failures=self.failures, probe_in=self._interval)
        else:
            log.info("breaker.closed", shop=self.shop, probes=self.probes)
        if self._on_change is not None:
            self._on_change(self.shop, state)
