"""Batch mode: the calls of one shop packed into ``visitorEvents`` batches.

A batch is sealed when full (count or bytes) or when the linger time has passed, and sent by a fixed pool
of sender tasks. Past its linger, a batch whose shop cannot send before a later slot of its rate limit
stays open until that slot: sealed, it would only wait in line with its visitors locked behind it, while
open it keeps taking records. Under a backlog at the rate limit, batches of a shop with few visitors at a
time were sealed by linger at 93% of their size on average; the shop's allowance is its rate times the
batch size (BENCHMARKS.md, the backlog figure).

Order per visitor. Records of one ordering key are never in flight twice: consecutive records of a key may
share the open batch (a batch is stored in the order given), but once that batch is sealed the key's later
records wait until it got its answer. This is the contract's rule: "send the next batch holding that
visitor only after the previous one got 200".

A batch answered 400 is re-sent as single calls, so only the events that really are bad fail. A batch
that gets a transient answer while another call of its shop is retrying is parked without a sender and
queued again once the retrying call is done.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from typing import Final

import structlog

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, TrackingConfig
from consumer.contract import BATCH_METHOD
from consumer.deliver import envelope
from consumer.deliver.base import DispatcherBase
from consumer.deliver.caller import EXPIRED, STEPPED_ASIDE, Clock, Done, DoneMany, Expired, Owns, Sleep
from consumer.metrics import RelayMetrics
from consumer.record import CallFailure, Record
from consumer.retry import Backoff
from consumer.tracking import Permanent, TrackingClient

log = structlog.get_logger(__name__)

#: A rate-limit slot this close is not worth keeping a batch open for (a timer costs more than it waits).
MIN_LINGER_EXTENSION_S: Final = 0.001


def _one_by_one(done: Done) -> DoneMany:
    def done_many(records: list[Record]) -> None:
        for record in records:
            done(record)

    return done_many


class _Batch:
    __slots__ = ("count", "keys", "payloads", "records", "releases", "sealed", "shop", "size", "timer")

    def __init__(self, shop: str, releases: int | None) -> None:
        self.shop = shop
        self.releases = releases  # the ledger's release count when the batch opened
        self.records: list[Record] = []
        self.payloads: list[bytes] = []  # the records' envelopes in order, joined once when sent
        self.keys: list[Hashable] = []
        self.count = 0
        self.size = envelope.BATCH_OVERHEAD
        self.sealed = False
        self.timer: asyncio.TimerHandle | None = None


class BatchDispatcher(DispatcherBase[_Batch]):
    """Packs records into batches per shop and reports each record once through ``done`` or ``done_many``."""

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
        done_many: DoneMany | None = None,
        releases: Callable[[], int] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``clock`` must be the clock the client's rate limiters run on (monotonic by default).

        ``releases`` counts the partitions released so far (``OffsetLedger.releases``): a batch sent while it
        has not moved since the batch opened holds only owned records, and skips checking each one.
        """
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
            pool=delivery.max_concurrent_batches,
        )
        self._max_events, self._max_bytes = delivery.batch_max_events, delivery.batch_max_bytes
        self._done_many = done_many or _one_by_one(done)
        self._releases = releases
        # the open batch per shop, and the batch each ordering key is in
        self._open: dict[str, _Batch] = {}
        self._holder: dict[Hashable, _Batch] = {}
        self.batches_sent = 0

    def flush(self) -> None:
        """Seal every open batch now (shutdown and revoke: nothing should wait for its linger)."""
        for batch in list(self._open.values()):
            self._seal(batch)

    def _place(self, record: Record, key: Hashable | None) -> None:
        if key is not None:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.append(record)  # earlier records of this key are still queued: keep the order
                return
            holder = self._holder.get(key)
            if holder is not None and holder.sealed:
                self._waiting[key] = deque((record,))
                return
        shop = record.shop
        assert shop is not None  # records with calls always carry their shop
        batch = self._open.get(shop)
        payloads = record.payloads
        # payload bytes plus the commas between them; most records carry one payload
        size = len(payloads[0]) + 1 if len(payloads) == 1 else record.size + len(payloads)
        if (
            batch is not None
            and batch.count
            and (batch.count + len(payloads) > self._max_events or batch.size + size > self._max_bytes)
        ):
            self._seal(batch)
            batch = None
            if key is not None and key in self._holder:
                self._waiting[key] = deque((record,))  # the key is in the batch just sealed
                return
        if batch is None:
            releases = None if self._releases is None else self._releases()
            batch = self._open[shop] = _Batch(shop, releases)
            linger = self._config.batch_linger_ms / 1000
            batch.timer = asyncio.get_running_loop().call_later(linger, self._lingered, batch)
        batch.records.append(record)
        batch.payloads += payloads
        batch.count += len(payloads)
        batch.size += size
        if key is not None and key not in self._holder:
            self._holder[key] = batch
            batch.keys.append(key)
        if batch.count >= self._max_events or batch.size >= self._max_bytes:
            self._seal(batch)

    def _lingered(self, batch: _Batch) -> None:
        """The batch's linger is over: seal it, unless its shop's next rate-limit slot is still to come."""
        wait = self._caller.client.limiters[batch.shop].next_slot() - self._caller.clock()
        if wait > MIN_LINGER_EXTENSION_S and not batch.sealed:
            batch.timer = asyncio.get_running_loop().call_later(wait, self._lingered, batch)
            return
        self._seal(batch)

    def _seal(self, batch: _Batch) -> None:
        if batch.sealed:
            return
        batch.sealed = True
        if batch.timer is not None:
            batch.timer.cancel()
        if self._open.get(batch.shop) is batch:
            del self._open[batch.shop]
        self._queue.put_nowait(batch)

    async def _serve(self) -> None:
        while True:
            batch = await self._queue.get()
            if self._park(batch.shop, batch):
                continue
            parked = False
            try:
                parked = await self._send_batch(batch)
            finally:
                if not parked:
                    self._release_batch(batch)
                self._unpark(batch.shop)

    async def _send_batch(self, batch: _Batch) -> bool:
        """Send a batch and settle its records; True when it was parked instead (see the module doc)."""
        releases = self._releases
        if releases is not None and batch.releases == releases():
            records = batch.records  # every record was owned when placed, and nothing was released since
            payloads = batch.payloads
        else:
            records = [record for record in batch.records if self._owns(record)]
            payloads = [p for record in records for p in record.payloads]
        if not records:
            return False
        payload = envelope.batch(payloads)
        timeout = self._tracking.batch_timeout
        try:
            outcome = await self._caller.call(
                batch.shop, BATCH_METHOD, payload, timeout, records, events=len(payloads), may_step_aside=True
            )
        except Expired as expired:
            outcome = Permanent(expired.last.status, f"{EXPIRED}: {expired.last.reason}")
        self.batches_sent += 1
        if outcome is STEPPED_ASIDE:
            self._park_stepped_aside(batch.shop, batch)
            return True
        if outcome is None:
            return False
        if type(outcome) is Permanent and outcome.status == 400:
            # The batch as a whole was refused; find the bad events by sending each on its own.
            log.info("deliver.batch_rejected_resending_singly", shop=batch.shop, events=batch.count)
            await self._resend_singly(records)
        elif type(outcome) is Permanent:
            for record in records:
                record.failed_calls.extend(
                    CallFailure(i, call.method, outcome.status, outcome.reason)
                    for i, call in record.sendable()
                )
        # Settlement checks ownership itself: a record revoked meanwhile is dropped there.
        self._done_many(records)
        return False

    async def _resend_singly(self, records: list[Record]) -> None:
        """Re-send a refused batch's records one call at a time: keys in parallel, each key in order."""
        by_key: dict[Hashable, list[Record]] = {}
        for record in records:
            key = self._key_of(record)
            by_key.setdefault(id(record) if key is None else key, []).append(record)
        timeout = self._tracking.single_timeout

        async def in_order(group: list[Record]) -> None:
            for record in group:
                await self._caller.deliver_singly(record, timeout, enveloped=True)

        await asyncio.gather(*(in_order(group) for group in by_key.values()))

    def _release_batch(self, batch: _Batch) -> None:
        """The batch got its final answer: its keys are free, and their waiting records move on."""
        holder, all_waiting = self._holder, self._waiting
        for key in batch.keys:
            if holder.get(key) is batch:
                del holder[key]
            waiting = all_waiting.pop(key, None)
            while waiting:
                record = waiting.popleft()
                if not self._owns(record):
                    continue  # revoked while it waited
                self._place(record, key)
                if key in self._waiting:
                    # The key landed in a sealed batch again: the rest keep waiting behind it.
                    self._waiting[key].extend(waiting)
                    break
