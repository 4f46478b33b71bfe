"""Batch mode: the calls of one shop packed into ``visitorEvents`` batches.

A batch is sealed when full (count or bytes) or when the linger time has passed, and sent by a fixed pool
of sender tasks. Past its linger, a batch whose shop cannot send before a later slot of its rate limit
stays open until that slot: sealed, it would only wait in line with its visitors locked behind it, while
open it keeps taking records. Under a backlog at the rate limit, batches of a shop with few visitors at a
time were sealed by linger at 93% of their size on average; the shop's allowance is its rate times the
batch size (BENCHMARKS.md, the backlog figure).

Batches of entries. What travels is a per-shop list of entries (``consumer.record.Entry``: a record's
envelope bytes, its ordering key, its run and its message, in one tuple), placed into the open batch a
slice at a time; a delivered batch settles by run (``Settler.batch_delivered``). A :class:`Record` is made of
an entry only when the batch got a permanent answer (a 400 re-sent singly, or a refusal to dead-letter),
by reading its envelope back; a Record handed in whole (a re-drive, a partly refused translation, a test)
travels as an entry whose source is the record, and settles as one.

Order per visitor. Records of one ordering key are never in flight twice: consecutive records of a key may
share the open batch (a batch is stored in the order given), but once that batch is sealed the key's later
records wait until it got its answer. This is the contract's rule: "send the next batch holding that
visitor only after the previous one got 200". The keys of a shop's sealed batches are one set, so a slice
is checked against it in one set operation, not record by record; only the entries that must wait are
looked at one by one.

A batch answered 400 is re-sent as single calls, so only the events that really are bad fail. A batch
that gets a transient answer while another call of its shop is retrying is parked without a sender and
queued again once the retrying call is done.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from itertools import accumulate, compress
from operator import itemgetter, not_
from typing import Final

import orjson
import structlog

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, TrackingConfig
from consumer.contract import BATCH_METHOD, TrackingCall
from consumer.deliver import envelope
from consumer.deliver.base import DispatcherBase
from consumer.deliver.caller import EXPIRED, STEPPED_ASIDE, Clock, Done, DoneMany, Expired, Owns, Sleep
from consumer.metrics import RelayMetrics
from consumer.record import ELEMENT, KEY, RUN, SOURCE, WEIGHT, CallFailure, Entry, Record, TopicPartition
from consumer.retry import Backoff
from consumer.tracking import Permanent, TrackingClient

log = structlog.get_logger(__name__)

#: A rate-limit slot this close is not worth keeping a batch open for (a timer costs more than it waits).
MIN_LINGER_EXTENSION_S: Final = 0.001


#: Reports a delivered batch's entries taken whole from Kafka, by shop (``Settler.batch_delivered``).
DeliveredEntries = Callable[[str, list[Entry]], None]

_elements = itemgetter(ELEMENT)
_keys = itemgetter(KEY)
_weights = itemgetter(WEIGHT)
_runs = itemgetter(RUN)


def _one_by_one(done: Done) -> DoneMany:
    def done_many(records: list[Record]) -> None:
        for record in records:
            done(record)

    return done_many


class _Batch:
    """One ``visitorEvents`` request in the making, and what its retries are counted on (``Tries``)."""

    __slots__ = (
        "attempts",
        "count",
        "entries",
        "first_failure",
        "keys",
        "last_failure",
        "records",
        "releases",
        "sealed",
        "shop",
        "size",
        "timer",
    )

    def __init__(self, shop: str, releases: int | None) -> None:
        self.shop = shop
        self.releases = releases  # the ledger's release count when the batch opened
        self.entries: list[Entry] = []
        self.keys: set[Hashable | None] = set()
        self.records = 0  # entries whose source is a Record
        self.count = 0  # events
        self.size = envelope.BATCH_OVERHEAD
        self.sealed = False
        self.timer: asyncio.TimerHandle | None = None
        self.attempts = 0
        self.first_failure: float | None = None
        self.last_failure: float | None = None

    # Where its first record came from, for the log line of a retry (``Tries``).
    @property
    def tp(self) -> TopicPartition:
        return _origin(self.entries[0])[0]

    @tp.setter
    def tp(self, value: TopicPartition) -> None:
        raise AttributeError("a batch's origin is its first entry's")

    @property
    def offset(self) -> int:
        return _origin(self.entries[0])[1]

    @offset.setter
    def offset(self, value: int) -> None:
        raise AttributeError("a batch's origin is its first entry's")

    def note_failure(self, now: float) -> None:
        self.attempts += 1
        if self.first_failure is None:
            self.first_failure = now
        self.last_failure = now


def _origin(entry: Entry) -> tuple[TopicPartition, int]:
    source, run = entry[SOURCE], entry[RUN]
    if isinstance(source, Record):
        return source.tp, source.offset
    assert run is not None
    return run.tp, source.offset() or 0


class BatchDispatcher(DispatcherBase[_Batch]):
    """Packs entries into batches per shop; reports entries taken whole from Kafka through ``delivered``
    when their batch was accepted, and every Record once through ``done`` or ``done_many``."""

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
        delivered: DeliveredEntries | None = None,
        releases: Callable[[], int] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``clock`` must be the clock the client's rate limiters run on (monotonic by default).

        ``releases`` counts the partitions released so far (``OffsetLedger.releases``): a batch sent while it
        has not moved since the batch opened holds only owned records, and skips checking each one.
        ``delivered`` settles the entries of an accepted batch that are not Records (the relay's settler).
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
        self._delivered = delivered
        self._releases = releases
        self._ordered = delivery.ordering != "unordered"
        # per shop: the open batch, the keys of its sealed batches, and the entries waiting for such a key
        self._open: dict[str, _Batch] = {}
        self._busy: dict[str, set[Hashable | None]] = {}
        self._waits: dict[str, dict[Hashable | None, deque[Entry]]] = {}
        self.batches_sent = 0

    def flush(self) -> None:
        """Seal every open batch now (shutdown and revoke: nothing should wait for its linger)."""
        for batch in list(self._open.values()):
            self._seal(batch)

    # --- in ------------------------------------------------------------------------------------------

    def submit(self, records: Iterable[Record]) -> None:
        """Records handed in whole (a re-drive, a test): each travels as an entry of its own record."""
        lots: dict[str, list[Entry]] = {}
        for record in records:
            if record.failure is not None or not record.payloads:
                self._done(record)  # nothing to send: straight to settlement (dead-letter or done)
                continue
            assert record.shop is not None  # records with calls always carry their shop
            key = self._key_of(record)
            # the key within the shop: batches are per shop already
            within = None if key is None else key[1]  # type: ignore[index]
            entry: Entry = (b",".join(record.payloads), within, None, None, record, len(record.payloads))
            lots.setdefault(record.shop, []).append(entry)
        self.submit_lots(lots)

    def submit_lots(self, lots: Mapping[str, list[Entry]]) -> None:
        """Take a consume() batch's entries, per shop, in consumption order."""
        for shop, entries in lots.items():
            self._place_entries(shop, entries)

    def _place_entries(self, shop: str, entries: list[Entry]) -> None:
        """Put entries into the shop's open batch, in order; those whose key is in a sealed batch, or has
        entries waiting already, wait behind it."""
        busy = self._busy.get(shop)
        if busy is None:
            busy = self._busy[shop] = set()
            self._waits[shop] = {}
        waits = self._waits[shop]
        while entries:
            if self._ordered and (busy or waits):
                keys = list(map(_keys, entries))
                blocked = busy.intersection(keys)
                if waits:
                    blocked |= waits.keys() & set(keys)
                if blocked:
                    held = list(map(blocked.__contains__, keys))
                    for entry in compress(entries, held):
                        waiting = waits.get(entry[KEY])
                        if waiting is None:
                            waiting = waits[entry[KEY]] = deque()
                        waiting.append(entry)
                    entries = list(compress(entries, map(not_, held)))
            entries = self._fill(shop, entries)

    def _fill(self, shop: str, entries: list[Entry]) -> list[Entry]:
        """Add as many of ``entries`` as fit to the shop's open batch; return the rest (it was sealed)."""
        if not entries:
            return entries
        batch = self._open.get(shop)
        if batch is None:
            releases = None if self._releases is None else self._releases()
            batch = self._open[shop] = _Batch(shop, releases)
            linger = self._config.batch_linger_ms / 1000
            batch.timer = asyncio.get_running_loop().call_later(linger, self._lingered, batch)
        weights = list(map(_weights, entries))
        sizes = list(accumulate(map(len, map(_elements, entries))))  # bytes of the first k: sizes[k-1] + k
        fits = self._fits(batch, weights, sizes)
        if fits < len(entries):
            taken, rest = entries[:fits], entries[fits:]
        else:
            taken, rest = entries, []
        if taken:
            batch.entries += taken
            batch.count += sum(weights[:fits]) if rest else sum(weights)
            batch.size += sizes[fits - 1] + fits
            if None in map(_runs, taken):  # entries of Records among them (rare): they settle as records
                batch.records += sum(entry[RUN] is None for entry in taken)
            if self._ordered:
                batch.keys.update(map(_keys, taken))
        if rest or batch.count >= self._max_events or batch.size >= self._max_bytes:
            self._seal(batch)
        return rest

    def _fits(self, batch: _Batch, weights: list[int], sizes: list[int]) -> int:
        """How many of the entries (their weights, their cumulative sizes) the batch has room for; an empty
        batch takes at least one, however large."""
        n = len(weights)
        room_events = self._max_events - batch.count
        room_bytes = self._max_bytes - batch.size
        if sum(weights) == n:
            fits = min(n, max(room_events, 0))
        else:
            fits = 0
            for total in accumulate(weights):
                if total > room_events:
                    break
                fits += 1
        if fits and sizes[fits - 1] + fits > room_bytes:
            low, high = 0, fits  # the largest k with sizes[k-1] + k <= room_bytes
            while low < high:
                middle = (low + high + 1) // 2
                if sizes[middle - 1] + middle <= room_bytes:
                    low = middle
                else:
                    high = middle - 1
            fits = low
        if fits == 0 and batch.count == 0:
            return 1
        return fits

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
        if self._ordered:
            batch.keys.discard(None)  # a record without a key is ordered with nothing
            self._busy[batch.shop] |= batch.keys
        self._queue.put_nowait(batch)

    # --- out -----------------------------------------------------------------------------------------

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

    def _owned(self, entry: Entry) -> bool:
        run = entry[RUN]
        return run.live if run is not None else self._owns(entry[SOURCE])  # type: ignore[arg-type]

    async def _send_batch(self, batch: _Batch) -> bool:
        """Send a batch and settle its entries; True when it was parked instead (see the module doc)."""
        releases = self._releases
        entries = batch.entries
        events = batch.count
        if releases is None or batch.releases != releases():
            entries = [entry for entry in entries if self._owned(entry)]  # a partition was released since
            events = sum(map(_weights, entries))
        if not entries:
            return False
        payload = b"[" + b",".join(map(_elements, entries)) + b"]"
        try:
            outcome = await self._caller.call(
                batch.shop,
                BATCH_METHOD,
                payload,
                self._tracking.batch_timeout,
                [batch],
                events=events,
                may_step_aside=True,
                owned=lambda: any(map(self._owned, entries)),
            )
        except Expired as expired:
            outcome = Permanent(expired.last.status, f"{EXPIRED}: {expired.last.reason}")
        self.batches_sent += 1
        if outcome is STEPPED_ASIDE:
            self._park_stepped_aside(batch.shop, batch)
            return True
        if outcome is None:
            return False
        if type(outcome) is not Permanent:
            self._settle_delivered(batch, entries)
            return False
        records = [self._record_of(batch, entry) for entry in entries]
        if outcome.status == 400:
            # The batch as a whole was refused; find the bad events by sending each on its own.
            log.info("deliver.batch_rejected_resending_singly", shop=batch.shop, events=events)
            await self._resend_singly(records)
        else:
            for record in records:
                record.failed_calls.extend(
                    CallFailure(i, call.method, outcome.status, outcome.reason)
                    for i, call in record.sendable()
                )
        # Settlement checks ownership itself: a record revoked meanwhile is dropped there.
        self._done_many(records)
        return False

    def _settle_delivered(self, batch: _Batch, entries: list[Entry]) -> None:
        if not batch.records:
            whole = entries
            records: list[Record] = []
        else:
            whole = [entry for entry in entries if entry[RUN] is not None]
            records = [entry[SOURCE] for entry in entries if entry[RUN] is None]  # type: ignore[misc]
        if whole:
            assert self._delivered is not None, "entries taken whole need a settler to report to"
            self._delivered(batch.shop, whole)
        if records:
            self._done_many(records)

    def _record_of(self, batch: _Batch, entry: Entry) -> Record:
        """The Record of an entry whose batch got a permanent answer, its calls read back from its envelope.

        It carries the batch's attempts: its dead letter says how often it was tried."""
        source, run = entry[SOURCE], entry[RUN]
        if isinstance(source, Record):
            record = source
        else:
            assert run is not None
            message = source
            events = orjson.loads(b"[" + entry[ELEMENT] + b"]")
            calls = [
                TrackingCall(batch.shop, method, body) for event in events for method, body in event.items()
            ]
            record = Record(
                run.tp,
                message.offset() or 0,
                run.generation,
                message.key(),
                message,
                shop=batch.shop,
                calls=calls,
                payloads=[envelope.encode(call) for call in calls],
                run=run,
            )
            run.records.append(record)  # it settles as a record now: the run's position can be exact
        record.attempts += batch.attempts
        if batch.first_failure is not None:
            record.first_failure = min(record.first_failure or batch.first_failure, batch.first_failure)
            record.last_failure = max(record.last_failure or 0.0, batch.last_failure or 0.0)
        return record

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
        """The batch got its final answer: its keys are free, and their waiting entries move on."""
        if not self._ordered:
            return
        shop = batch.shop
        self._busy[shop] -= batch.keys
        waits = self._waits[shop]
        if not waits:
            return
        for key in batch.keys & waits.keys():
            waiting = waits.pop(key)
            self._place_entries(shop, [entry for entry in waiting if self._owned(entry)])
