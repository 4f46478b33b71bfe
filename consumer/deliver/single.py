"""Single mode: one call per event, sent by a fixed pool of worker tasks.

Order per visitor. A record whose ordering key has a record in flight waits behind it, and goes to the
ready queue only once that one got its final answer: one record per key in flight, records of a key in the
order consumed.

A record that gets a transient answer while another call of its shop is retrying is parked without a
worker, its key still busy so the key's later records keep waiting behind it, and queued again once the
retrying call is done.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, TrackingConfig
from consumer.deliver.base import DispatcherBase
from consumer.deliver.caller import Clock, Done, Owns, Sleep
from consumer.metrics import RelayMetrics
from consumer.record import Record
from consumer.retry import Backoff
from consumer.tracking import TrackingClient


class SingleDispatcher(DispatcherBase[Record]):
    """Sends each record's calls one by one and reports each record once through ``done``."""

    def __init__(
        self,
        client: TrackingClient,
        delivery: DeliveryConfig,
        tracking: TrackingConfig,
        backoff: Backoff,
        *,
        breakers: Mapping[str, CircuitBreaker],
        done: Done,
        owns: Owns,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``clock`` must be the clock the client's rate limiters run on (monotonic by default)."""
        super().__init__(
            client,
            delivery,
            tracking,
            backoff,
            breakers=breakers,
            done=done,
            owns=owns,
            clock=clock,
            sleep=sleep,
            metrics=metrics,
            pool=delivery.max_concurrent_calls,
        )
        # the keys with a record in flight (or parked)
        self._busy: set[Hashable] = set()
        # ordering key -> records of that key waiting for the key's record in flight to finish
        self._waiting: dict[Hashable, deque[Record]] = {}

    def submit(self, records: Iterable[Record]) -> None:
        """Take freshly consumed records (already tracked by the ledger), in consumption order."""
        place, key_of, done = self._place, self._key_of, self._done
        for record in records:
            if record.failure is not None or not record.payloads:
                done(record)  # nothing to send: straight to settlement (dead-letter or done)
            else:
                place(record, key_of(record))

    def _place(self, record: Record, key: Hashable | None) -> None:
        if key is None:
            self._queue.put_nowait(record)
        elif key in self._busy:
            self._waiting.setdefault(key, deque()).append(record)
        else:
            self._busy.add(key)
            self._queue.put_nowait(record)

    async def _serve(self) -> None:
        timeout = self._tracking.single_timeout
        while True:
            record = await self._queue.get()
            shop = record.shop or ""
            if self._park(shop, record):
                continue  # its key stays busy: the key's later records keep waiting behind it
            key = self._key_of(record)
            parked = False
            try:
                if self._owns(record):
                    if not await self._caller.deliver_singly(
                        record, timeout, enveloped=False, may_step_aside=True
                    ):
                        self._park_stepped_aside(shop, record)
                        parked = True
                    elif self._owns(record):
                        self._done(record)
            finally:
                if key is not None and not parked:
                    self._next_of(key)
                self._unpark(shop)

    def _next_of(self, key: Hashable) -> None:
        """The key's record got its final answer: the next owned record of the key goes to the queue."""
        waiting = self._waiting.get(key)
        while waiting:
            record = waiting.popleft()
            if self._owns(record):
                self._queue.put_nowait(record)
                if not waiting:
                    del self._waiting[key]
                return
        self._waiting.pop(key, None)
        self._busy.discard(key)
