"""Deliver: get every record's calls to the tracking API, in order per visitor, as fast as the API allows.

Two modes share one shape — records come in with :meth:`Dispatcher.submit`, each record leaves exactly once
through the ``done`` callback, with ``record.failed_calls`` naming any call that got a permanent answer:

* ``batch`` packs the calls of one shop into ``visitorEvents`` batches, sealed when full (count or bytes) or
  when the linger time has passed, and sent by a fixed pool of sender tasks.
* ``single`` sends one call per event through a fixed pool of worker tasks.

Order per visitor. The *ordering key* of a record is ``(shop, record key)`` in ``key`` mode,
``(shop, partition)`` in ``partition`` mode, and none in ``unordered`` mode. Records of one ordering key
are never in flight twice: in batch mode, consecutive records of a key may share the open batch (a batch is
stored in the order given), but once that batch is sealed the key's later records wait until it got its
answer. This is the
contract's rule: "send the next batch holding that visitor only after the previous one got 200".

There is no task, future or lock per record: records move between plain deques and dicts on the event loop,
and the pools of senders/workers are fixed at start.

Transient answers are retried here with backoff (``consumer.retry``) for as long as it takes, or until a
configured maximum age, holding the ordering key; a batch answered 400 is re-sent as single calls, so only
the events that really are bad fail.

One shop's trouble does not take the pool from the others. While a call of a shop is retrying (the API
answered it 429 or 5xx, or its circuit breaker is open), that call alone waits for the shop: another batch
or record of the shop that gets a transient answer, or comes up meanwhile, is parked without a sender and
queued again once the retrying call is done. Senders and workers stay free for the shops that answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Final

import orjson
import structlog

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, TrackingConfig
from consumer.contract import BATCH_METHOD
from consumer.metrics import RelayMetrics
from consumer.record import CallFailure, Record
from consumer.retry import Backoff
from consumer.tracking import Outcome, Permanent, TrackingClient, Transient

log = structlog.get_logger(__name__)

Done = Callable[[Record], None]
#: Reports a whole batch's records at once: settlement per batch, not per record, on the hot path.
DoneMany = Callable[[list[Record]], None]
Owns = Callable[[Record], bool]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

#: A ``Transient`` outcome that outlived ``retry.max_age_s`` is reported with this reason.
EXPIRED: Final = "transient failure outlived retry.max_age_s"


class _SteppedAside:
    """Internal: a call got a transient answer while another call of its shop was retrying already."""


STEPPED_ASIDE: Final = _SteppedAside()


class Expired(Exception):
    """Internal: a call kept failing transiently past the configured maximum age."""

    def __init__(self, last: Transient) -> None:
        super().__init__(EXPIRED)
        self.last = last


def _one_by_one(done: Done) -> DoneMany:
    def done_many(records: list[Record]) -> None:
        for record in records:
            done(record)

    return done_many


def ordering_key(mode: str) -> Callable[[Record], Hashable | None]:
    if mode == "key":
        return lambda record: None if record.key is None else (record.shop, record.key)
    if mode == "partition":
        # Per shop too: batches are per shop, and Retail Rocket orders events per shop, not across shops.
        return lambda record: (record.shop, record.tp)
    return lambda record: None


class _Caller:
    """One call with retries: the part both modes share."""

    def __init__(
        self,
        client: TrackingClient,
        backoff: Backoff,
        breakers: Mapping[str, CircuitBreaker],
        owns: Owns,
        clock: Clock,
        sleep: Sleep,
        metrics: RelayMetrics,
    ) -> None:
        self.client = client
        self.breakers = breakers
        self.metrics = metrics
        self.backoff = backoff
        self.owns = owns
        self.clock = clock
        self.sleep = sleep
        #: Shops with a call in its retry loop: the one call that waits for the shop.
        self.retrying: set[str] = set()

    async def call(
        self,
        shop: str,
        method: str,
        payload: bytes,
        timeout: float,
        records: list[Record],
        events: int = 1,
        *,
        may_step_aside: bool = False,
    ) -> Outcome | _SteppedAside | None:
        """Send until the answer is final. ``None`` when every record was revoked meanwhile.

        ``events``: how many events the payload carries (a batch's size, for its metric).
        ``may_step_aside``: on a transient answer while another call of the shop is retrying, return
        :data:`STEPPED_ASIDE` (the caller parks the work) instead of retrying alongside it.
        """
        breaker = self.breakers[shop]
        retrier = False
        try:
            while True:
                # admit() only ever waits while the breaker is open; skip the coroutine on the common path.
                probe = await breaker.admit() if breaker.state == "open" else False
                started = time.perf_counter()
                outcome = await self.client.send_raw(shop, method, payload, timeout=timeout)
                elapsed = time.perf_counter() - started
                self.metrics.observe_request(shop, method, outcome.status, elapsed, events)
                breaker.record(type(outcome) is Transient, probe)
                if type(outcome) is not Transient:
                    return outcome
                wall = time.time()  # failure times are reported (dead-letter headers): wall clock
                for record in records:
                    record.note_failure(wall)
                if self.backoff.expired(records[0].first_failure, wall):
                    raise Expired(outcome)
                if not retrier:
                    if may_step_aside and shop in self.retrying:
                        return STEPPED_ASIDE
                    retrier = shop not in self.retrying
                    self.retrying.add(shop)
                await self._wait_to_retry(shop, method, outcome, records)
                if not any(self.owns(record) for record in records):
                    return None  # the partitions were revoked while we waited; the next owner sends them
        finally:
            if retrier:
                self.retrying.discard(shop)

    async def _wait_to_retry(self, shop: str, method: str, outcome: Transient, records: list[Record]) -> None:
        attempt = records[0].attempts
        delay = self.backoff.delay(attempt, outcome.retry_after)
        if outcome.retry_after is not None:
            # The server named a time: no call to this shop before it, from any sender. The hold is
            # on the client's clock (the one its rate limiters run on).
            self.client.limiters[shop].hold_until(self.clock() + outcome.retry_after)
        self.metrics.retries[shop] += 1
        first = records[0]
        log.debug(
            "deliver.retry",
            topic=first.tp[0],
            partition=first.tp[1],
            offset=first.offset,
            shop=shop,
            method=method,
            status=outcome.status,
            reason=outcome.reason,
            attempt=attempt,
            delay=round(delay, 3),
        )
        await self.sleep(delay)

    async def deliver_singly(
        self, record: Record, timeout: float, *, encoded: bool, may_step_aside: bool = False
    ) -> bool:
        """Send a record's calls one by one, in order; permanent answers are noted on the record.

        ``encoded``: the record's payloads are bare bodies (single mode) and are sent as they are; batch
        envelopes (a refused batch re-sent singly) are encoded again as bodies. ``may_step_aside``: its
        first call may step aside (see :meth:`call`); then nothing was sent and False is returned.
        """
        for position, (index, call) in enumerate(record.sendable()):
            payload = record.payloads[position] if encoded else orjson.dumps(call.body)
            shop = record.shop or call.shop
            try:
                outcome = await self.call(
                    shop,
                    call.method,
                    payload,
                    timeout,
                    [record],
                    may_step_aside=may_step_aside and not position,
                )
            except Expired as expired:
                outcome = Permanent(expired.last.status, f"{EXPIRED}: {expired.last.reason}")
            if outcome is STEPPED_ASIDE:
                return False
            if outcome is None:
                return True
            if type(outcome) is Permanent:
                record.failed_calls.append(CallFailure(index, call.method, outcome.status, outcome.reason))
        return True


class _Batch:
    __slots__ = ("count", "keys", "payloads", "records", "releases", "sealed", "shop", "size", "timer")

    def __init__(self, shop: str, releases: int | None) -> None:
        self.shop = shop
        self.releases = releases  # the ledger's release count when the batch opened
        self.records: list[Record] = []
        self.payloads: list[bytes] = []  # the records' payloads in order, joined once when sent
        self.keys: list[Hashable] = []
        self.count = 0
        self.size = 2  # the brackets of the JSON array
        self.sealed = False
        self.timer: asyncio.TimerHandle | None = None


class Dispatcher:
    """Schedules records for delivery and reports each one once through ``done``."""

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
        self._config = delivery
        self._max_events, self._max_bytes = delivery.batch_max_events, delivery.batch_max_bytes
        self._tracking = tracking
        self._done = done
        self._done_many = done_many or _one_by_one(done)
        self._owns = owns
        self._releases = releases
        self._key_of = ordering_key(delivery.ordering)
        self._caller = _Caller(client, backoff, breakers, owns, clock, sleep, metrics or RelayMetrics())
        self._tasks: list[asyncio.Task[None]] = []
        # ordering key -> records of that key waiting for the key's in-flight work to finish
        self._waiting: dict[Hashable, deque[Record]] = {}
        # batch mode: the open batch per shop, and the batch each ordering key is in
        self._open: dict[str, _Batch] = {}
        self._holder: dict[Hashable, _Batch] = {}
        self._sealed: asyncio.Queue[_Batch] = asyncio.Queue()
        # single mode: records ready to send, and the keys with a record in flight
        self._ready: asyncio.Queue[Record] = asyncio.Queue()
        self._busy: set[Hashable] = set()
        # shop -> batches or records waiting, without a sender, for the shop's retrying call to be done
        self._parked: dict[str, list[_Batch | Record]] = {}
        self.batches_sent = 0

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._config.mode == "batch":
            workers = [self._batch_sender() for _ in range(self._config.max_concurrent_batches)]
        else:
            workers = [self._single_worker() for _ in range(self._config.max_concurrent_calls)]
        self._tasks = [asyncio.create_task(worker) for worker in workers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def flush(self) -> None:
        """Seal every open batch now (shutdown and revoke: nothing should wait for its linger)."""
        for batch in list(self._open.values()):
            self._seal(batch)

    # --- intake side ---------------------------------------------------------------------------------

    def submit(self, records: Iterable[Record]) -> None:
        """Take freshly consumed records (already tracked by the ledger), in consumption order."""
        place = self._place_in_batch if self._config.mode == "batch" else self._place_single
        key_of, done = self._key_of, self._done
        for record in records:
            if record.failure is not None or not record.payloads:
                done(record)  # nothing to send: straight to settlement (dead-letter or done)
            else:
                place(record, key_of(record))

    # --- batch mode ----------------------------------------------------------------------------------

    def _place_in_batch(self, record: Record, key: Hashable | None) -> None:
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
            batch.timer = asyncio.get_running_loop().call_later(linger, self._seal, batch)
        batch.records.append(record)
        batch.payloads += payloads
        batch.count += len(payloads)
        batch.size += size
        if key is not None and key not in self._holder:
            self._holder[key] = batch
            batch.keys.append(key)
        if batch.count >= self._max_events or batch.size >= self._max_bytes:
            self._seal(batch)

    def _seal(self, batch: _Batch) -> None:
        if batch.sealed:
            return
        batch.sealed = True
        if batch.timer is not None:
            batch.timer.cancel()
        if self._open.get(batch.shop) is batch:
            del self._open[batch.shop]
        self._sealed.put_nowait(batch)

    async def _batch_sender(self) -> None:
        while True:
            batch = await self._sealed.get()
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
        payload = b"[" + b",".join(payloads) + b"]"
        timeout = self._tracking.batch_timeout
        try:
            outcome = await self._caller.call(
                batch.shop, BATCH_METHOD, payload, timeout, records, events=len(payloads), may_step_aside=True
            )
        except Expired as expired:
            outcome = Permanent(expired.last.status, f"{EXPIRED}: {expired.last.reason}")
        self.batches_sent += 1
        if outcome is STEPPED_ASIDE:
            self._parked.setdefault(batch.shop, []).append(batch)
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
                await self._caller.deliver_singly(record, timeout, encoded=False)

        await asyncio.gather(*(in_order(group) for group in by_key.values()))

    def _park(self, shop: str, item: _Batch | Record) -> bool:
        """Park ``item`` without sending it while a call of its shop is retrying."""
        if shop not in self._caller.retrying:
            return False
        self._parked.setdefault(shop, []).append(item)
        return True

    def _unpark(self, shop: str) -> None:
        """A call of ``shop`` is done: unless one still retries for it, queue the shop's parked work again."""
        if shop in self._caller.retrying or shop not in self._parked:
            return
        for item in self._parked.pop(shop):
            if isinstance(item, _Batch):
                self._sealed.put_nowait(item)
            else:
                self._ready.put_nowait(item)

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
                self._place_in_batch(record, key)
                if key in self._waiting:
                    # The key landed in a sealed batch again: the rest keep waiting behind it.
                    self._waiting[key].extend(waiting)
                    break

    # --- single mode ---------------------------------------------------------------------------------

    def _place_single(self, record: Record, key: Hashable | None) -> None:
        if key is None:
            self._ready.put_nowait(record)
        elif key in self._busy:
            self._waiting.setdefault(key, deque()).append(record)
        else:
            self._busy.add(key)
            self._ready.put_nowait(record)

    async def _single_worker(self) -> None:
        timeout = self._tracking.single_timeout
        while True:
            record = await self._ready.get()
            shop = record.shop or ""
            if self._park(shop, record):
                continue  # its key stays busy: the key's later records keep waiting behind it
            key = self._key_of(record)
            parked = False
            try:
                if self._owns(record):
                    if not await self._caller.deliver_singly(
                        record, timeout, encoded=True, may_step_aside=True
                    ):
                        self._parked.setdefault(shop, []).append(record)
                        parked = True
                    elif self._owns(record):
                        self._done(record)
            finally:
                if key is not None and not parked:
                    self._next_of(key)
                self._unpark(shop)

    def _next_of(self, key: Hashable) -> None:
        waiting = self._waiting.get(key)
        while waiting:
            record = waiting.popleft()
            if self._owns(record):
                self._ready.put_nowait(record)
                if not waiting:
                    del self._waiting[key]
                return
        self._waiting.pop(key, None)
        self._busy.discard(key)
