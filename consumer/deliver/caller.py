"""One call to the tracking API with retries: the part both delivery modes share.

Transient answers are retried with backoff (``consumer.retry``) for as long as it takes, or until a
configured maximum age, holding the caller's ordering key. While a call of a shop is retrying, that call
alone waits for the shop: another call of the shop that gets a transient answer may *step aside*
(:data:`STEPPED_ASIDE`) so its dispatcher parks the work instead of holding a sender or worker with it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Final, Protocol

import structlog

from consumer.breaker import CircuitBreaker
from consumer.deliver import envelope
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


class Tries(Protocol):
    """What a call's retries are counted on: a record, or a batch on the batch path."""

    tp: tuple[str, int]
    offset: int
    attempts: int
    first_failure: float | None

    def note_failure(self, now: float) -> None: ...


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


def ordering_key(mode: str) -> Callable[[Record], Hashable | None]:
    if mode == "key":
        return lambda record: None if record.key is None else (record.shop, record.key)
    if mode == "partition":
        # Per shop too: batches are per shop, and Retail Rocket orders events per shop, not across shops.
        return lambda record: (record.shop, record.tp)
    return lambda record: None


class Caller:
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
        records: Sequence[Tries],
        events: int = 1,
        *,
        may_step_aside: bool = False,
        owned: Callable[[], bool] | None = None,
    ) -> Outcome | _SteppedAside | None:
        """Send until the answer is final. ``None`` when every record was revoked meanwhile.

        ``records``: what the attempts are counted on; ``owned``: whether any of the work is still ours
        (by default, whether any of ``records`` is).

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
                if not (owned() if owned is not None else any(map(self.owns, records))):  # type: ignore[arg-type]
                    return None  # the partitions were revoked while we waited; the next owner sends them
        finally:
            if retrier:
                self.retrying.discard(shop)

    async def _wait_to_retry(
        self, shop: str, method: str, outcome: Transient, records: Sequence[Tries]
    ) -> None:
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
        self, record: Record, timeout: float, *, enveloped: bool, may_step_aside: bool = False
    ) -> bool:
        """Send a record's calls one by one, in order; permanent answers are noted on the record.

        ``enveloped``: the record's payloads are ``visitorEvents`` envelopes (a refused batch re-sent
        singly), each sent as the body it wraps; else they are bare bodies (single mode), sent as they are.
        ``may_step_aside``: its first call may step aside (see :meth:`call`); then nothing was sent and
        False is returned.
        """
        for position, (index, call) in enumerate(record.sendable()):
            payload = record.payloads[position]
            if enveloped:
                payload = envelope.bare(call.method, payload)
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
