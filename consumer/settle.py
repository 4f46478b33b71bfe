"""Settle: the one stage that decides each record's outcome, and so what may be committed.

Every record leaves delivery (or the intake, when it has nothing to send) exactly once, and comes here:

* **delivered**: every call it implied got a 2xx (or it implied none): settled at once.
* **suspect**: every call that failed got 401/403, an answer that indicts the shop's credentials more than
  the record. It is held, unsettled (so uncommitted), until a call of its shop succeeds — then the key
  works, the record failed on its own and is **acquitted** into the dead-letter topic — or until the guard
  trips on the shop's failures and halts the relay.
* **dead-lettered**: a permanent failure (decode, translate, a 4xx of its own). Settled once the
  dead-letter topic confirmed the write; a write that fails keeps the record unsettled, holds its partition
  (paused) and is retried with backoff: a dead-letter topic that cannot be written is a fault of the setup,
  never a reason to commit past the record.
* **the guard** (``consumer.guard``): when too large a share of the recent records would be dead-lettered
  or held as suspects, the relay halts instead — nothing from that record on is committed.

Settled records move their partition's committable position in the :class:`~consumer.ledger.OffsetLedger`;
the intake thread only executes what it decides (commits the positions it publishes). A completion for a
partition that was revoked since — under an older assignment generation — changes nothing.

Besides outcomes, the settler decides which partitions are *held* (paused by the intake): those that feed a
shop whose circuit breaker is open, and those with a record the dead-letter topic refused. Their backlog
stays in Kafka, not in memory.

Everything here runs on the event loop; nothing blocks or awaits, so each rule can be exercised in-process,
one call at a time (``tests/test_settler.py``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter
from typing import Protocol

import structlog

from consumer.breaker import CircuitBreaker
from consumer.faults import FaultBoard
from consumer.guard import SHOP_WIDE_STATUSES, DeadLetterGuard
from consumer.handoff import Handoff
from consumer.ledger import OffsetLedger
from consumer.metrics import RelayMetrics
from consumer.record import METHOD, RUN, SOURCE, WEIGHT, Consumed, Entry, Record, TopicPartition
from consumer.retry import Backoff

log = structlog.get_logger(__name__)

#: Runs a callback after a delay (the loop's ``call_later``; a test's own list of due calls).
Schedule = Callable[[float, Callable[[], None]], object]


class DeadLetterSink(Protocol):
    """Where dead letters are written; each write's fate comes back as :meth:`Settler.dead_letter_written`
    or :meth:`Settler.dead_letter_failed` (``consumer.deadletter.DeadLetterWriter``)."""

    def send(self, record: Record) -> None: ...


class Settler:
    """Owns the ledger and every outcome rule; see the module docstring."""

    def __init__(
        self,
        ledger: OffsetLedger,
        guard: DeadLetterGuard,
        *,
        breakers: Mapping[str, CircuitBreaker],
        dead_letter_topics: Mapping[str, str],
        backoff: Backoff,
        schedule: Schedule,
        handoff: Handoff,
        halt: Callable[[], None],
        metrics: RelayMetrics | None = None,
        faults: FaultBoard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``handoff``: where the intake thread reads what to hold and how much each partition has in flight
        (the settler writes ``held`` and ``unsettled``); ``halt`` is called once, when the guard trips (the
        relay stops without committing past the halt)."""
        self.ledger = ledger
        self.guard = guard
        self._breakers = breakers
        self._dlq_topics = dead_letter_topics
        self._backoff = backoff
        self._schedule = schedule
        self._handoff = handoff
        self._halt = halt
        self._metrics = metrics or RelayMetrics()
        self._faults = faults or FaultBoard()
        self._clock = clock
        self._dead_letters: DeadLetterSink | None = None
        # shop -> records held because every failed call of theirs got 401/403
        self._suspects: dict[str, list[Record]] = {}
        # shop -> partitions its records came from: what to hold while the shop's breaker is open
        self._feeds: dict[str, set[TopicPartition]] = {}
        # partitions with a record the dead-letter topic refused: held until a write of theirs succeeds
        self._dlq_blocked: set[TopicPartition] = set()
        self.halt_reason: str | None = None
        self.delivered = 0
        self.dead_lettered = 0

    def bind_dead_letters(self, sink: DeadLetterSink) -> None:
        """The dead-letter writer, made after the settler because it reports back to it."""
        self._dead_letters = sink

    # --- reads ----------------------------------------------------------------------------------------

    @property
    def suspect_count(self) -> int:
        return sum(len(records) for records in self._suspects.values())

    @property
    def suspect_shops(self) -> list[str]:
        return sorted(self._suspects)

    @property
    def held(self) -> frozenset[TopicPartition]:
        """The partitions to keep paused now (see the module docstring)."""
        held: set[TopicPartition] = set(self._dlq_blocked)
        for shop, breaker in self._breakers.items():
            if breaker.state == "open":
                held |= self._feeds.get(shop, set())
        return frozenset(held)

    # --- assignment -----------------------------------------------------------------------------------

    def assign(self, partitions: Iterable[tuple[TopicPartition, int]]) -> None:
        for tp, generation in partitions:
            self.ledger.assign(tp, generation)

    def release(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Partitions revoked or lost: forget them and what was held of them; return their positions.

        Their suspects are dropped unsettled (the next owner reads them again), and a partition held for
        its dead-letter topic is no longer held here: its next owner meets the fault afresh.
        """
        partitions = list(partitions)
        positions = {tp: self.ledger.release(tp) for tp in partitions}
        for tp in partitions:
            self._drop_suspects(tp)
        if self._dlq_blocked.intersection(partitions):
            self._dlq_blocked.difference_update(partitions)
            self._publish_held()
        self._publish_unsettled()
        return positions

    # --- records in -------------------------------------------------------------------------------------

    def admit(self, records: list[Record]) -> list[Record]:
        """Track freshly consumed records; return those to deliver (still owned, and the relay not halted).

        After a halt nothing new is taken, so nothing past the halt is ever committed.
        """
        if self.halt_reason is not None:
            return []
        kept = self.ledger.track(records)
        feeds = self._feeds
        for tp, shop in {(record.tp, record.shop) for record in kept}:
            if shop is not None:
                feeds.setdefault(shop, set()).add(tp)
        self._publish_unsettled()
        return kept

    def admit_consumed(self, consumed: Consumed) -> Mapping[str, list[Entry]]:
        """The batch path's :meth:`admit`: track a consume() batch's runs, settle the records that failed
        decoding or translating (to the dead-letter topic), and return the entries still to deliver, per
        shop (nothing after a halt; nothing of a run read under a generation since revoked)."""
        if self.halt_reason is not None:
            return {}
        if not self.ledger.track_runs(consumed.runs):
            # A revoke came between reading and here (rare): keep what is still ours, entry by entry.
            lots = {
                shop: kept
                for shop, entries in consumed.lots.items()
                if (kept := [entry for entry in entries if _live(entry)])
            }
            consumed = Consumed(consumed.runs, lots, [r for r in consumed.failed if r.run and r.run.live])
        feeds = self._feeds
        for shop, entries in consumed.lots.items():
            runs = set(map(_runs, entries))
            tps = {run.tp for run in runs if run is not None}
            if None in runs:  # entries of Records (partly refused translations): their own partitions
                tps.update(entry[SOURCE].tp for entry in entries if entry[RUN] is None)  # type: ignore[union-attr]
            feeds.setdefault(shop, set()).update(tps)
        self._publish_unsettled()
        for record in consumed.failed:
            self.done(record)
        return consumed.lots

    # --- outcomes -------------------------------------------------------------------------------------

    def done(self, record: Record) -> None:
        """Delivery is finished with a record: settle it, dead-letter it, or hold it as a suspect."""
        if record.failure is None and not record.failed_calls:
            if self.ledger.settle(record):
                self.delivered += 1
                self.guard.note(False)
                self._count_settled(record, "delivered" if record.calls else "skipped")
                self._publish_unsettled()
            if self._suspects and record.calls and record.shop in self._suspects:
                self._acquit(record.shop)
            return
        if (
            record.failure is None
            and record.shop is not None
            and all(failure.status in SHOP_WIDE_STATUSES for failure in record.failed_calls)
        ):
            self._hold_suspect(record.shop, record)
            return
        self._dead_letter(record)

    def done_many(self, records: list[Record]) -> None:
        """A batch got its answer: settle its delivered records together, the others one by one."""
        delivered = []
        for record in records:
            if record.failure is None and not record.failed_calls:
                delivered.append(record)
            else:
                self.done(record)
        if not delivered:
            return
        settled = self.ledger.settle_many(delivered)
        self._publish_unsettled()
        self.delivered += settled
        self.guard.note_delivered(settled)
        metrics = self._metrics
        first = delivered[0]
        if all(r.tp[0] == first.tp[0] for r in delivered):
            metrics.settled[(first.tp[0], "delivered")] += settled
        else:
            for record in delivered:
                metrics.settled[(record.tp[0], "delivered")] += 1
        shop = first.shop
        for method, count in Counter([call.method for r in delivered for call in r.calls]).items():
            metrics.calls[(shop or "", method, "delivered")] += count
        if self._suspects and shop in self._suspects:
            self._acquit(shop)

    def batch_delivered(self, shop: str, entries: list[Entry]) -> None:
        """A batch of ``shop`` was accepted: its entries taken whole from Kafka settle by run, together."""
        counts = Counter(map(_runs, entries))
        settled = self.ledger.settle_runs(counts)
        if not settled:
            return
        self._publish_unsettled()
        self.delivered += settled
        self.guard.note_delivered(settled)
        metrics = self._metrics
        for run, count in counts.items():
            if run.live:
                metrics.settled[(run.tp[0], "delivered")] += count
        weights = list(map(_weights, entries))
        if sum(weights) == len(weights):
            methods = Counter(map(_methods, entries))
        else:
            methods = Counter()
            for entry, weight in zip(entries, weights, strict=True):
                methods[entry[METHOD]] += weight
        calls = metrics.calls
        for method, count in methods.items():
            calls[(shop, method, "delivered")] += count
        if self._suspects and shop in self._suspects:
            self._acquit(shop)

    def progress(self) -> dict[str, int]:
        """The figures of the periodic progress line."""
        return {
            "consumed": self._handoff.consumed,
            "delivered": self.delivered,
            "dead_lettered": self.dead_lettered,
            "in_flight": self.ledger.in_flight,
            "retries": sum(self._metrics.retries.values()),
            "partitions": len(self._handoff.assigned),
        }

    def halt(self, reason: str) -> None:
        """Stop taking records and stop the relay; the first reason is the one reported."""
        if self.halt_reason is None:
            self.halt_reason = reason
            log.error("relay.dead_letter_guard_tripped", reason=reason)
            self._halt()

    # --- dead letters -----------------------------------------------------------------------------------

    def _dead_letter(self, record: Record, *, counted: bool = False) -> None:
        if not self.ledger.owns(record) or self.halt_reason is not None:
            return
        if not counted:
            if self.guard.would_trip():
                self.halt(
                    f"{self.guard.ratio:.0%} of the most recent records were dead-lettered "
                    f"(last: {describe_failure(record)})"
                )
                return
            self.guard.note(True)
        assert self._dead_letters is not None, "bind_dead_letters() before the first record"
        self._dead_letters.send(record)

    def dead_letter_written(self, record: Record) -> None:
        """The dead-letter topic confirmed the record: it settles (and its partition is free again)."""
        if record.tp in self._dlq_blocked:
            self._dlq_blocked.discard(record.tp)
            self._publish_held()
            self._faults.clear(
                f"dlq:{self._dlq_topics[record.tp[0]]}",
                event="relay.dead_letter_writable",
                topic=record.tp[0],
            )
        if self.ledger.settle(record):
            self._publish_unsettled()
            self.dead_lettered += 1
            self._count_settled(record, "dead_lettered")
            stage, reason = failure_class(record)
            self._metrics.dead_lettered[(record.tp[0], stage, reason)] += 1
            log.info(
                "relay.dead_lettered",
                topic=record.tp[0],
                partition=record.tp[1],
                offset=record.offset,
                shop=record.shop,
                method=record.failed_calls[0].method if record.failed_calls else None,
                reason=describe_failure(record),
            )

    def dead_letter_failed(self, record: Record, reason: str) -> None:
        """The dead-letter topic refused the record: keep it unsettled, hold its partition, try again later.

        A dead-letter topic that cannot be written is a fault of the setup, not of the record: nothing
        behind the record is committed, readiness turns red, and the relay recovers by itself once a write
        goes through (the topic created, the ACL granted).
        """
        record.note_failure(self._clock())
        delay = self._backoff.delay(record.attempts)
        dlq = self._dlq_topics[record.tp[0]]
        if self.ledger.owns(record) and record.tp not in self._dlq_blocked:
            self._dlq_blocked.add(record.tp)
            self._publish_held()
        self._faults.raise_fault(
            f"dlq:{dlq}",
            f"dead-letter topic {dlq!r} cannot be written (topics.dead_letter_topic of {record.tp[0]!r}); "
            f"partitions held: {self._blocked_names(dlq)}: {reason}",
            event="relay.dead_letter_write_failed",
            topic=record.tp[0],
            partition=record.tp[1],
            offset=record.offset,
        )
        log.debug(
            "relay.dead_letter_retry", topic=record.tp[0], offset=record.offset, retry_in=round(delay, 2)
        )
        self._schedule(delay, lambda: self._dead_letter(record, counted=True))

    def _blocked_names(self, dlq: str) -> str:
        return ", ".join(f"{t}[{p}]" for t, p in sorted(self._dlq_blocked) if self._dlq_topics[t] == dlq)

    # --- suspects: records that failed for a reason that indicts the shop --------------------------

    def _hold_suspect(self, shop: str, record: Record) -> None:
        if self.guard.would_trip():
            status = record.failed_calls[0].status
            self.halt(
                f"shop {shop!r} answers HTTP {status} to every call: its apiKey/partnerId is wrong, "
                "revoked or disabled; nothing from the first failing record on was committed"
            )
            return
        self.guard.note(True)
        self._suspects.setdefault(shop, []).append(record)

    def _acquit(self, shop: str) -> None:
        """A call of the shop succeeded: its credentials work, so its suspects failed on their own."""
        for record in self._suspects.pop(shop, []):
            self._dead_letter(record, counted=True)

    def _drop_suspects(self, tp: TopicPartition) -> None:
        for shop, records in list(self._suspects.items()):
            kept = [r for r in records if r.tp != tp]
            if kept:
                self._suspects[shop] = kept
            else:
                del self._suspects[shop]

    # --- held partitions and metrics ------------------------------------------------------------------

    def breaker_changed(self, shop: str, state: str) -> None:
        """A shop's circuit breaker opened or closed: the partitions that feed it are held or let go."""
        self._publish_held()

    def _publish_held(self) -> None:
        self._handoff.held = self.held

    def _publish_unsettled(self) -> None:
        """The intake's backpressure reads these counts: a new snapshot whenever records came or went."""
        self._handoff.unsettled = self.ledger.unsettled_by_partition()

    def _count_settled(self, record: Record, outcome: str) -> None:
        metrics = self._metrics
        metrics.settled[(record.tp[0], outcome)] += 1
        shop = record.shop
        if not record.calls or shop is None:
            return
        calls = metrics.calls
        if not record.failed_calls:  # nearly every record (all of single mode's): no set, no index look-up
            for call in record.calls:
                calls[(shop, call.method, "delivered")] += 1
            return
        failed = {failure.index for failure in record.failed_calls}
        for index, call in enumerate(record.calls):
            calls[(shop, call.method, "permanent" if index in failed else "delivered")] += 1


def failure_class(record: Record) -> tuple[str, str]:
    """(stage, reason) for the dead-letter metric: few distinct values, never a record's own data."""
    if record.failure is not None:
        return record.failure.stage, type(record.failure).__name__
    failure = record.failed_calls[0]
    return failure.stage, "contract" if failure.status is None else f"http_{failure.status}"


def describe_failure(record: Record) -> str:
    if record.failure is not None:
        return f"{record.failure.stage}: {record.failure.reason}"
    failure = record.failed_calls[0]
    return f"deliver: {failure.method} {failure.reason}"


_runs = itemgetter(RUN)
_methods = itemgetter(METHOD)
_weights = itemgetter(WEIGHT)


def _live(entry: Entry) -> bool:
    run = entry[RUN]
    if run is None:
        run = entry[SOURCE].run  # type: ignore[union-attr]
    return run is not None and run.live
