"""Re-drive: send dead-lettered records through the same pipeline again, once the cause is fixed.

The re-drive is the relay itself, consuming a dead-letter topic in a consumer group of its own
(``<group>.redrive``, so it can be stopped and resumed), with this plan deciding, per record:

* whether to re-drive it at all: the filters (stage, HTTP status, source topic, time of the last failure)
  and the loop guard (a record already re-driven ``max_redrives`` times is left alone);
* what to decode: the original value, with the decoder of the original topic (``rr.dlq.source.topic``);
* what not to send again: the calls listed in ``rr.dlq.calls.delivered`` (an order's good items).

A record that fails again is dead-lettered again — to the same dead-letter topic — with
``rr.dlq.redrive.count`` one higher and its original source coordinates. The re-drive stops at the end
offsets the dead-letter topic had when it started, so it never chases its own output.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Protocol

import orjson

from consumer.record import Record

PREFIX: Final = "rr.dlq."
REDRIVE_COUNT: Final = PREFIX + "redrive.count"


class DeadLetterMessage(Protocol):
    def headers(self) -> list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None: ...
    def value(self) -> bytes | None: ...


def dlq_headers(message: DeadLetterMessage) -> dict[str, str]:
    """The ``rr.dlq.*`` headers of a dead-lettered record, decoded (the last one wins if repeated)."""
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    found: dict[str, str] = {}
    for key, value in pairs:
        if key.startswith(PREFIX) and value is not None:
            found[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return found


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
            when = _parse_time(headers.get(PREFIX + "last.failure"))
            if when is None:
                return False
            if self.failed_after is not None and when < self.failed_after:
                return False
            if self.failed_before is not None and when >= self.failed_before:
                return False
        return True


@dataclass
class RedrivePlan:
    """Prepares each dead-letter record for another pass (called on the intake thread)."""

    filters: RedriveFilter = field(default_factory=RedriveFilter)
    max_redrives: int = 3
    skipped_by_filter: int = 0
    skipped_by_guard: int = 0
    redriven: int = 0

    def prepare(
        self, record: Record, message: DeadLetterMessage
    ) -> tuple[str, bytes | None, frozenset[int]] | None:
        """Set the record's origin and count; return (source topic, value, delivered calls) or None (skip)."""
        headers = dlq_headers(message)
        count = int(headers.get(REDRIVE_COUNT, "0") or 0)
        if count >= self.max_redrives:
            self.skipped_by_guard += 1
            return None
        if not self.filters.matches(headers):
            self.skipped_by_filter += 1
            return None
        source = headers.get(PREFIX + "source.topic")
        if source is None:
            self.skipped_by_filter += 1  # not a record this relay dead-lettered
            return None
        record.origin = (
            source,
            int(headers.get(PREFIX + "source.partition", "-1")),
            int(headers.get(PREFIX + "source.offset", "-1")),
        )
        record.redrive_count = count + 1
        delivered = frozenset(orjson.loads(headers.get(PREFIX + "calls.delivered", "[]")))
        self.redriven += 1
        return source, message.value(), delivered


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None
