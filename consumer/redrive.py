"""Re-drive: send dead-lettered records through the same pipeline again, once the cause is fixed.

The re-drive is the relay itself, consuming a dead-letter topic in a consumer group of its own
(``<group>.redrive``), with this plan deciding, per record, one outcome:

* **already re-driven**: the record's dead-letter coordinates are in the resolution log
  (:mod:`consumer.resolution`, ``<dead-letter topic>.resolved``): it is passed over;
* **left alone by the filters** (stage, HTTP status, source topic, time of the last failure): passed over,
  and *not* recorded, so a later run with other filters (or none) still takes it;
* **cannot be re-driven**: a header it needs is missing or malformed (``rr.dlq.source.partition`` not a
  number, ``rr.dlq.calls.delivered`` not a JSON list of indices, ...), or its source topic is not a topic
  of this configuration (there is no decoder for it). Passed over with the reason and its coordinates;
  never an exception on the intake thread;
* **left alone by the loop guard**: already re-driven ``max_redrives`` times;
* **re-driven**: decoded with the decoder of its original topic (``rr.dlq.source.topic``), sending only the
  calls not listed in ``rr.dlq.calls.delivered`` (an order's good items are not sent again). Once it has
  settled — every call delivered, or dead-lettered again to the same dead-letter topic with
  ``rr.dlq.redrive.count`` one higher, its original source coordinates and ``rr.dlq.redrive.from.*``
  naming the record it came from — :meth:`RedrivePlan.settled` writes that outcome to the resolution log.

The re-drive stops at the end offsets the dead-letter topic had when it started, so it never chases its own
output. It is at-least-once: a record whose outcome was not yet written when the run was killed is
re-driven again by the next run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Protocol

import orjson
import structlog

from consumer.record import Record, TopicPartition

if TYPE_CHECKING:
    from consumer.decode import Decoder
    from consumer.settle import Settler

log = structlog.get_logger(__name__)

PREFIX: Final = "rr.dlq."
REDRIVE_COUNT: Final = PREFIX + "redrive.count"
#: On a record dead-lettered again by a re-drive: the partition and offset, in the same dead-letter topic,
#: of the record it was re-driven from.
REDRIVE_FROM_PARTITION: Final = PREFIX + "redrive.from.partition"
REDRIVE_FROM_OFFSET: Final = PREFIX + "redrive.from.offset"
#: How many records of each per-record list (cannot be re-driven, dead-lettered again) a plan keeps to
#: report; the rest are counted.
KEEP_REPORTED: Final = 1000

#: (dead-letter topic, partition, offset)
Coordinates = tuple[str, int, int]


class DeadLetterMessage(Protocol):
    def headers(self) -> list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None: ...
    def value(self) -> bytes | None: ...


def dlq_headers(message: DeadLetterMessage) -> dict[str, str]:
    """The ``rr.dlq.*`` headers of a dead-lettered record, decoded (the last one wins if repeated)."""
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    found: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(key, str) and key.startswith(PREFIX) and value is not None:
            found[key] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return found


def where(coordinates: Coordinates) -> str:
    """``topic[partition]@offset``: how every line about a dead-letter record names it."""
    topic, partition, offset = coordinates
    return f"{topic}[{partition}]@{offset}"


@dataclass(frozen=True)
class Origin:
    """What a re-drive reads from a dead-letter record's headers, validated."""

    source_topic: str
    source_partition: int
    source_offset: int
    redrive_count: int
    delivered: frozenset[int]


def parse_origin(headers: Mapping[str, str], sources: Collection[str]) -> Origin | str:
    """The record's :class:`Origin`, or why it cannot be re-driven (one line, naming the header)."""
    if not headers:
        return "no rr.dlq headers: not a record the relay dead-lettered"
    source = headers.get(PREFIX + "source.topic")
    if not source:
        return "rr.dlq.source.topic is missing"
    if source not in sources:
        return f"its source topic {source!r} is not a topic of this configuration"
    partition = _natural(headers, "source.partition")
    if isinstance(partition, str):
        return partition
    offset = _natural(headers, "source.offset")
    if isinstance(offset, str):
        return offset
    count = _natural(headers, "redrive.count", default=0)
    if isinstance(count, str):
        return count
    delivered = parse_indices(headers.get(PREFIX + "calls.delivered"))
    if isinstance(delivered, str):
        return f"rr.dlq.calls.delivered {delivered}"
    return Origin(source, partition, offset, count, delivered)


def parse_indices(text: str | None) -> frozenset[int] | str:
    """A JSON list of call indices (absent: none), or what is wrong with it."""
    if text is None:
        return frozenset()
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return f"is not JSON: {text!r}"
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        return f"is not a list of call indices: {text!r}"
    return frozenset(value)


def _natural(headers: Mapping[str, str], name: str, default: int | None = None) -> int | str:
    text = headers.get(PREFIX + name)
    if text is None:
        return default if default is not None else f"rr.dlq.{name} is missing"
    if not text.isascii() or not text.isdigit():
        return f"rr.dlq.{name} is not a whole number: {text!r}"
    return int(text)


@dataclass(frozen=True)
class RedriveFilter:
    """Which dead-lettered records to re-drive; an empty collection means any."""

    stages: Collection[str] = ()
    statuses: Collection[str] = ()
    source_topics: Collection[str] = ()
    failed_after: datetime | None = None
    failed_before: datetime | None = None

    def matches(self, headers: Mapping[str, str]) -> bool:
        if self.stages and headers.get(PREFIX + "stage") not in self.stages:
            return False
        if self.statuses and headers.get(PREFIX + "http.status") not in self.statuses:
            return False
        if self.source_topics and headers.get(PREFIX + "source.topic") not in self.source_topics:
            return False
        if self.failed_after is not None or self.failed_before is not None:
            when = parse_time(headers.get(PREFIX + "last.failure"))
            if when is None:
                return False
            if self.failed_after is not None and when < self.failed_after:
                return False
            if self.failed_before is not None and when >= self.failed_before:
                return False
        return True


@dataclass(frozen=True)
class Outcome:
    """How a re-driven record settled: what the resolution log records about it."""

    where: Coordinates
    #: ``delivered`` (every call it still had was accepted) or ``dead-lettered`` (failed again, copied).
    outcome: str
    #: When it settled (epoch seconds).
    at: float
    #: Which re-drive of the record this was (1 for a record the relay dead-lettered itself).
    redrive: int
    #: How many calls this re-drive sent, and how many of them failed.
    sent: int
    failed: int
    #: Why it failed again (empty when delivered).
    reason: str = ""


class OutcomeLog(Protocol):
    """Where a plan writes the outcome of each re-driven record (:class:`consumer.resolution.Writer`)."""

    def write(self, outcome: Outcome) -> None: ...


@dataclass
class RedrivePlan:
    """Prepares each dead-letter record for another pass (on the intake thread) and notes how it settled
    (on the event loop). Every record read gets exactly one of the outcomes in the module docstring."""

    filters: RedriveFilter = field(default_factory=RedriveFilter)
    max_redrives: int = 3
    #: The topics of this configuration, which have decoders: a record from any other is not re-driven.
    sources: Collection[str] = ()
    #: Dead-letter offsets already re-driven, per partition (from the resolution log).
    resolved: Mapping[TopicPartition, Collection[int]] = field(default_factory=dict)
    #: Where outcomes are written; None: nowhere (unit tests).
    log: OutcomeLog | None = None
    skipped_resolved: int = 0
    skipped_by_filter: int = 0
    skipped_by_guard: int = 0
    #: Records that cannot be re-driven: how many, and the first KEEP_REPORTED with the reason.
    unredrivable: int = 0
    unredrivable_reasons: list[tuple[Coordinates, str]] = field(default_factory=list)
    #: Records handed to the pipeline.
    redriven: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    dead_lettered_reasons: list[tuple[Coordinates, str]] = field(default_factory=list)
    #: The record being prepared: named when the run stops on an error.
    current: Coordinates | None = None

    @property
    def unsettled(self) -> int:
        """Records handed to the pipeline whose outcome is not known (a run that stopped early)."""
        return max(0, self.redriven - self.delivered - self.dead_lettered)

    def prepare(
        self, record: Record, message: DeadLetterMessage
    ) -> tuple[str, bytes | None, frozenset[int]] | None:
        """Set the record's origin and count; return (source topic, value, delivered calls) or None (skip).

        Never raises: a record that cannot be re-driven is skipped with the reason."""
        coordinates = (record.tp[0], record.tp[1], record.offset)
        self.current = coordinates
        done = self.resolved.get(record.tp)
        if done is not None and record.offset in done:
            self.skipped_resolved += 1
            return None
        headers = dlq_headers(message)
        if not self.filters.matches(headers):
            self.skipped_by_filter += 1
            return None
        origin = parse_origin(headers, self.sources)
        if isinstance(origin, str):
            self.unredrivable += 1
            if len(self.unredrivable_reasons) < KEEP_REPORTED:
                self.unredrivable_reasons.append((coordinates, origin))
            return None
        if origin.redrive_count >= self.max_redrives:
            self.skipped_by_guard += 1
            return None
        record.origin = (origin.source_topic, origin.source_partition, origin.source_offset)
        record.redrive_count = origin.redrive_count + 1
        self.redriven += 1
        return origin.source_topic, message.value(), origin.delivered

    def settled(self, record: Record) -> None:
        """The ledger settled ``record`` (on the loop): note a re-driven record's outcome and log it."""
        if record.origin is None:
            return  # passed over by prepare(): nothing was done, nothing is recorded
        coordinates = (record.tp[0], record.tp[1], record.offset)
        sent = len(record.send_index) if record.send_index is not None else len(record.calls)
        if record.failure is None and not record.failed_calls:
            self.delivered += 1
            outcome = Outcome(coordinates, "delivered", time.time(), record.redrive_count, sent, 0)
        else:
            self.dead_lettered += 1
            reason = describe_failure(record)
            if len(self.dead_lettered_reasons) < KEEP_REPORTED:
                self.dead_lettered_reasons.append((coordinates, reason))
            failed = sum(1 for f in record.failed_calls if f.stage == "deliver")
            outcome = Outcome(
                coordinates, "dead-lettered", time.time(), record.redrive_count, sent, failed, reason
            )
        if self.log is not None:
            self.log.write(outcome)


def describe_failure(record: Record) -> str:
    """Why a record failed, in one line: the stage and the reason of its (first) failure."""
    if record.failure is not None:
        return f"{record.failure.stage}: {record.failure.reason}"
    if record.failed_calls:
        first = record.failed_calls[0]
        status = f" HTTP {first.status}" if first.status is not None else ""
        return f"{first.stage}: {first.method}{status} {first.reason}"
    return "unknown"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass
class Redrive:
    """What turns the relay into a re-drive of dead-letter topics (see the module docstring)."""

    plan: RedrivePlan
    #: Decoders of the original topics, by name: a dead-lettered value is decoded as its topic's were.
    decoders: dict[str, Decoder]
    #: Stop once every one of these partitions settled up to its offset (the end when the re-drive began).
    stop_at: dict[TopicPartition, int]
    on_progress: Callable[[int], None] | None = None

    async def stop_when_caught_up(self, settler: Settler, stop: Callable[[], None]) -> None:
        """A re-drive ends at the end offsets it started with: it never chases its own output."""
        redrive, ledger = self, settler.ledger
        while True:
            # Suspects (401/403) wait for a call of their shop to succeed; with none to come, none will.
            if (
                settler.suspect_count
                and ledger.in_flight <= settler.suspect_count
                and ledger.tracked_up_to(redrive.stop_at)
            ):
                shops = ", ".join(map(repr, settler.suspect_shops))
                settler.halt(f"shop {shops} still answers HTTP 401/403: fix its key, then re-drive again")
                return
            reached = ledger.reached
            done = sum(min(reached.get(tp, 0), end) for tp, end in redrive.stop_at.items())
            if redrive.on_progress is not None:
                redrive.on_progress(done)
            if all(reached.get(tp, 0) >= end for tp, end in redrive.stop_at.items()) and not ledger.in_flight:
                log.info(
                    "redrive.caught_up",
                    redriven=redrive.plan.redriven,
                    skipped_by_filter=redrive.plan.skipped_by_filter,
                    skipped_by_guard=redrive.plan.skipped_by_guard,
                )
                stop()
                return
            await asyncio.sleep(0.2)
