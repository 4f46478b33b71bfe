"""The settle stage in-process: every outcome rule, and the interleavings the guarantees name.

The settler runs on the event loop and never blocks or awaits, so each test drives it one call at a time:
records are admitted as the intake would hand them over, delivery's verdicts come in as ``done`` and
``done_many``, the dead-letter topic's answers as ``dead_letter_written`` / ``dead_letter_failed``. What it
decides is read where the intake thread reads it: the positions offered to commit and the partitions held,
on the hand-off. The dead-letter writer itself, and the broker behind it, are exercised end to end in
tests/test_failures.py and tests/test_faults.py; here a list stands in for the topic's queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from consumer.breaker import CircuitBreaker
from consumer.config import DeadLetterConfig, RetryConfig
from consumer.contract import TrackingCall
from consumer.errors import DecodeError
from consumer.faults import FaultBoard
from consumer.guard import DeadLetterGuard
from consumer.handoff import Handoff
from consumer.ledger import OffsetLedger
from consumer.metrics import RelayMetrics
from consumer.record import CallFailure, Consumed, Entry, Record, Run, TopicPartition
from consumer.retry import Backoff
from consumer.settle import Settler

TP: TopicPartition = ("events", 0)
OTHER: TopicPartition = ("events", 1)
DLQ = "events.dlq"


class Sink:
    """The dead-letter writer's side the settler sees: what it was asked to write, in order."""

    def __init__(self) -> None:
        self.sent: list[Record] = []

    def send(self, record: Record) -> None:
        self.sent.append(record)


class Harness:
    def __init__(self, *, window: int = 200, minimum: int = 50, ratio: float = 0.5) -> None:
        self.handoff = Handoff()
        self.ledger = OffsetLedger(positions=self.handoff.positions)
        self.faults = FaultBoard()
        self.metrics = RelayMetrics()
        self.sink = Sink()
        self.scheduled: list[tuple[float, Callable[[], None]]] = []
        self.halts = 0
        self.breakers = {
            "demo": CircuitBreaker(
                "demo",
                threshold=2,
                probe_base_s=1.0,
                probe_cap_s=1.0,
                on_change=lambda shop, state: self.settler.breaker_changed(shop, state),
            )
        }
        self.settler = Settler(
            self.ledger,
            DeadLetterGuard(
                DeadLetterConfig(max_ratio=ratio, window_records=window, min_dead_lettered=minimum)
            ),
            breakers=self.breakers,
            dead_letter_topics={"events": DLQ},
            backoff=Backoff(RetryConfig(base_s=0.5, cap_s=0.5)),
            schedule=self._schedule,
            handoff=self.handoff,
            halt=self._halt,
            metrics=self.metrics,
            faults=self.faults,
        )
        self.settler.bind_dead_letters(self.sink)

    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        self.scheduled.append((delay, callback))

    def _halt(self) -> None:
        self.halts += 1

    def run_scheduled(self) -> None:
        due, self.scheduled = self.scheduled, []
        for _, callback in due:
            callback()

    def assign(self, *partitions: TopicPartition, generation: int = 1) -> None:
        self.settler.assign([(tp, generation) for tp in partitions])

    def admit(self, *records: Record) -> list[Record]:
        return self.settler.admit(list(records))

    def committable(self) -> dict[TopicPartition, int]:
        """What the intake thread would commit now (offset per partition)."""
        return {tp: offset for tp, (_, offset) in self.handoff.positions.take().items()}


def record(offset: int, *, tp: TopicPartition = TP, generation: int = 1, shop: str | None = "demo") -> Record:
    message: Any = None  # the settler never looks at the message (the dead-letter writer does)
    calls = [TrackingCall(shop, "view", {"itemId": offset})] if shop is not None else []
    return Record(
        tp, offset, generation, None, message, shop=shop, calls=calls, payloads=[b"{}"] * len(calls)
    )


def refused(offset: int, status: int, **kwargs: Any) -> Record:
    """A record delivery finished with: its one call got a permanent ``status``."""
    failed = record(offset, **kwargs)
    failed.failed_calls = [CallFailure(0, "view", status, f"HTTP {status}")]
    return failed


def poison(offset: int, **kwargs: Any) -> Record:
    bad = record(offset, shop=None, **kwargs)
    bad.failure = DecodeError("not Avro")
    return bad


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.assign(TP, OTHER)
    return harness


# --- delivered --------------------------------------------------------------------------------------


def test_delivered_records_settle_and_the_position_is_the_first_unsettled_one(h: Harness) -> None:
    first, second, third = h.admit(record(10), record(11), record(12))
    assert h.handoff.unsettled == {TP: 3, OTHER: 0}, "the intake's backpressure sees what is in flight"
    h.settler.done(third)
    assert h.committable() == {}, "a later record settling first moves nothing"
    h.settler.done_many([first, second])
    assert h.committable() == {TP: 13}
    assert h.handoff.unsettled == {TP: 0, OTHER: 0}
    assert h.settler.delivered == 3
    assert h.metrics.settled[("events", "delivered")] == 3
    assert h.metrics.calls[("demo", "view", "delivered")] == 3


def test_a_duplicate_completion_counts_once(h: Harness) -> None:
    (one,) = h.admit(record(5))
    h.settler.done(one)
    h.settler.done(one)
    h.settler.done_many([one])
    assert h.settler.delivered == 1
    assert h.committable() == {TP: 6}


def test_a_completion_after_its_partition_was_revoked_and_reassigned_commits_nothing(h: Harness) -> None:
    (early,) = h.admit(record(7))
    assert h.settler.release([TP]) == {TP: 7}, "the revoke commits up to the unsettled record, not past it"
    h.assign(TP, generation=2)
    (again,) = h.admit(record(7, generation=2))
    h.settler.done(early)  # the old generation's answer arrives late
    h.settler.done_many([early])
    assert h.committable() == {}, "a late completion from before the revoke is dropped"
    assert h.settler.delivered == 0
    h.settler.done(again)
    assert h.committable() == {TP: 8}


def test_records_of_a_partition_no_longer_owned_are_not_admitted(h: Harness) -> None:
    h.settler.release([OTHER])
    kept = h.admit(record(1), record(2, tp=OTHER))
    assert [r.tp for r in kept] == [TP]


# --- dead-lettered -------------------------------------------------------------------------------


def test_a_poison_record_settles_only_once_the_dead_letter_topic_confirmed_it(h: Harness) -> None:
    bad, good = h.admit(poison(1), record(2))
    h.settler.done(bad)
    h.settler.done(good)
    assert h.sink.sent == [bad]
    assert h.committable() == {}, "not committed past the record before its dead letter is written"
    h.settler.dead_letter_written(bad)
    assert h.committable() == {TP: 3}
    assert h.settler.dead_lettered == 1
    assert h.metrics.dead_lettered[("events", "decode", "DecodeError")] == 1


def test_a_400_of_its_own_is_dead_lettered_with_its_status(h: Harness) -> None:
    (bad,) = h.admit(refused(1, 400))
    h.settler.done_many([bad])
    assert h.sink.sent == [bad]
    h.settler.dead_letter_written(bad)
    assert h.metrics.dead_lettered[("events", "deliver", "http_400")] == 1
    assert h.metrics.calls[("demo", "view", "permanent")] == 1


def test_a_dead_letter_write_that_fails_holds_the_partition_and_recovers_by_itself(h: Harness) -> None:
    bad, behind = h.admit(poison(1), record(2))
    h.settler.done(bad)
    h.settler.done(behind)
    h.settler.dead_letter_failed(bad, "Broker: Unknown topic or partition")
    assert h.handoff.held == frozenset({TP}), "its partition is paused: nothing more is read behind it"
    (problem,) = h.faults.current()
    assert DLQ in problem
    assert "topics.dead_letter_topic" in problem
    assert "events[0]" in problem
    assert h.committable() == {}, "nothing committed past a record whose dead letter was not written"
    assert len(h.scheduled) == 1
    assert 0 < h.scheduled[0][0] <= 0.5, "after the backoff (jittered, within retry.cap_s)"
    h.run_scheduled()
    assert h.sink.sent == [bad, bad], "the write is retried after the backoff"
    h.settler.dead_letter_written(bad)
    assert h.handoff.held == frozenset(), "the partition is let go once a write went through"
    assert h.faults.current() == []
    assert h.committable() == {TP: 3}
    assert h.settler.dead_lettered == 1


def test_a_refused_dead_letter_of_a_revoked_partition_no_longer_holds_it(h: Harness) -> None:
    (bad,) = h.admit(poison(1))
    h.settler.done(bad)
    h.settler.dead_letter_failed(bad, "timed out")
    assert h.handoff.held == frozenset({TP})
    h.settler.release([TP])
    assert h.handoff.held == frozenset(), "its next owner meets the fault afresh"
    h.run_scheduled()
    assert h.sink.sent == [bad], "the retry of a record no longer owned writes nothing"
    h.settler.dead_letter_written(bad)
    assert h.settler.dead_lettered == 0


def test_the_guard_halts_instead_of_draining_the_topic_into_the_dead_letter_topic() -> None:
    h = Harness(window=10, minimum=3, ratio=0.5)
    h.assign(TP)
    records = h.admit(*(poison(offset) for offset in range(5)))
    for bad in records:
        h.settler.done(bad)
    assert len(h.sink.sent) == 2, "the third dead letter in a row would trip the guard"
    assert h.halts == 1
    assert h.settler.halt_reason is not None
    assert "dead-lettered" in h.settler.halt_reason
    assert "decode: not Avro" in h.settler.halt_reason
    for written in h.sink.sent:
        h.settler.dead_letter_written(written)
    assert h.committable() == {TP: 2}, "committed up to the record the guard stopped on, not past it"
    assert h.admit(record(5)) == [], "a halted relay takes nothing more"


# --- suspects: 401/403 -----------------------------------------------------------------------------


def test_a_suspect_is_held_until_its_shop_proves_its_key_then_dead_lettered(h: Harness) -> None:
    suspect, good = h.admit(refused(1, 401), record(2))
    h.settler.done(suspect)
    assert h.sink.sent == [], "a 401 indicts the key first: held, not dead-lettered"
    assert h.settler.suspect_count == 1
    assert h.settler.suspect_shops == ["demo"]
    h.settler.done_many([good])
    assert h.sink.sent == [suspect], "a call of the shop succeeded: the suspect failed on its own"
    assert h.settler.suspect_count == 0
    assert h.committable() == {}
    h.settler.dead_letter_written(suspect)
    assert h.committable() == {TP: 3}


def test_a_shop_that_answers_401_to_everything_halts_the_relay_with_nothing_committed() -> None:
    h = Harness(window=10, minimum=3, ratio=0.5)
    h.assign(TP)
    for suspect in h.admit(*(refused(offset, 401) for offset in range(4))):
        h.settler.done(suspect)
    assert h.halts == 1
    assert h.settler.halt_reason is not None
    assert "'demo'" in h.settler.halt_reason
    assert "401" in h.settler.halt_reason
    assert h.sink.sent == [], "no suspect is dead-lettered"
    assert h.committable() == {}, "nothing from the first failing record on is committed"


def test_suspects_of_a_revoked_partition_are_dropped_not_dead_lettered_later(h: Harness) -> None:
    mine, theirs = h.admit(refused(1, 403), refused(1, 403, tp=OTHER))
    h.settler.done(mine)
    h.settler.done(theirs)
    h.settler.release([OTHER])
    assert h.settler.suspect_count == 1
    (good,) = h.admit(record(2))
    h.settler.done(good)
    assert h.sink.sent == [mine], "only the suspect still owned is acquitted into the dead-letter topic"


def test_a_record_with_a_401_and_a_400_is_dead_lettered_at_once(h: Harness) -> None:
    (mixed,) = h.admit(record(1))
    mixed.failed_calls = [CallFailure(0, "view", 401, "HTTP 401"), CallFailure(1, "view", 400, "HTTP 400")]
    h.settler.done(mixed)
    assert h.sink.sent == [mixed]
    assert h.settler.suspect_count == 0


# --- held partitions ---------------------------------------------------------------------------------


def test_an_open_breaker_holds_exactly_the_partitions_that_feed_its_shop(h: Harness) -> None:
    h.admit(record(1), record(1, tp=OTHER, shop=None))  # OTHER fed no record of the shop
    breaker = h.breakers["demo"]
    breaker.record(transient=True, probe=False)
    assert h.handoff.held == frozenset()
    breaker.record(transient=True, probe=False)
    assert breaker.state == "open"
    assert h.handoff.held == frozenset({TP})
    breaker.record(transient=False, probe=True)
    assert h.handoff.held == frozenset()


# --- the batch path: runs and entries ----------------------------------------------------------------


def consumed_run(h: Harness, first: int, end: int, *, tp: TopicPartition = TP) -> tuple[Run, list[Entry]]:
    """A partition run read in one consume() batch, tracked, and its entries (one view each)."""
    run = Run(tp, 1, first, end, end - first)
    entries: list[Entry] = [(b"{}", None, run, "view", None, 1) for _ in range(first, end)]  # type: ignore[misc]
    h.settler.admit_consumed(Consumed([run], {"demo": entries}, []))
    return run, entries


def test_a_delivered_batch_settles_by_run_and_commits_each_runs_end(h: Harness) -> None:
    _, early = consumed_run(h, 10, 14)
    _, other = consumed_run(h, 0, 3, tp=OTHER)
    assert h.handoff.unsettled == {TP: 4, OTHER: 3}
    h.settler.batch_delivered("demo", early[:2] + other)
    assert h.committable() == {OTHER: 3}, "a run half delivered holds its partition at its first offset"
    h.settler.batch_delivered("demo", early[2:])
    assert h.committable() == {TP: 14}
    assert h.handoff.unsettled == {TP: 0, OTHER: 0}
    assert h.settler.delivered == 7
    assert h.metrics.settled[("events", "delivered")] == 7
    assert h.metrics.calls[("demo", "view", "delivered")] == 7


def test_an_entry_carrying_several_calls_counts_each_call_and_settles_once(h: Harness) -> None:
    run = Run(TP, 1, 0, 2, 2)
    entries: list[Entry] = [
        (b"{},{}", None, run, "order", None, 2),  # type: ignore[list-item]  # an order of two products
        (b"{}", None, run, "view", None, 1),  # type: ignore[list-item]
    ]
    h.settler.admit_consumed(Consumed([run], {"demo": entries}, []))
    h.settler.batch_delivered("demo", entries)
    assert h.settler.delivered == 2, "records, not calls"
    assert h.metrics.calls[("demo", "order", "delivered")] == 2
    assert h.metrics.calls[("demo", "view", "delivered")] == 1
    assert h.committable() == {TP: 2}


def test_a_batch_delivered_after_its_run_was_revoked_commits_nothing(h: Harness) -> None:
    _, entries = consumed_run(h, 5, 8)
    assert h.settler.release([TP]) == {TP: 5}, "the revoke commits up to the run, not into it"
    h.assign(TP, generation=2)
    h.settler.batch_delivered("demo", entries)  # the old generation's answer arrives late
    assert h.committable() == {}
    assert h.settler.delivered == 0


def test_a_run_read_before_a_revoke_is_not_admitted(h: Harness) -> None:
    run = Run(TP, 1, 0, 2, 2)
    entries: list[Entry] = [(b"{}", None, run, "view", None, 1)] * 2  # type: ignore[list-item]
    h.settler.release([TP])
    h.assign(TP, generation=2)
    admitted = h.settler.admit_consumed(Consumed([run], {"demo": entries}, []))
    assert admitted == {}, "the next owner reads it again"
    assert not run.live


def test_an_entry_refused_in_its_batch_holds_the_position_exactly_at_it_until_dead_lettered(
    h: Harness,
) -> None:
    run, entries = consumed_run(h, 10, 15)
    refused_entry = refused(12, 400)  # the Record the dispatcher makes of an entry whose batch was refused
    refused_entry.run = run
    run.records.append(refused_entry)
    h.settler.batch_delivered("demo", entries[:2] + entries[3:])
    assert h.committable() == {TP: 12}, "committed up to the refused record, exactly"
    h.settler.done_many([refused_entry])
    assert h.sink.sent == [refused_entry]
    assert h.committable() == {}
    h.settler.dead_letter_written(refused_entry)
    assert h.committable() == {TP: 15}
    assert h.settler.delivered == 4
    assert h.settler.dead_lettered == 1


def test_a_delivered_batch_proves_its_shops_key_and_acquits_a_suspect(h: Harness) -> None:
    (suspect,) = h.admit(refused(1, 401, tp=OTHER))
    h.settler.done(suspect)
    assert h.settler.suspect_count == 1
    _, entries = consumed_run(h, 0, 2)
    h.settler.batch_delivered("demo", entries)
    assert h.sink.sent == [suspect], "the shop's key works: the suspect failed on its own"
    assert h.settler.suspect_count == 0


def test_an_open_breaker_holds_the_partition_whose_run_fed_its_shop(h: Harness) -> None:
    consumed_run(h, 0, 1, tp=OTHER)
    breaker = h.breakers["demo"]
    breaker.record(transient=True, probe=False)
    breaker.record(transient=True, probe=False)
    assert h.handoff.held == frozenset({OTHER}), "the partition whose run fed the shop is held"


def test_a_consumed_record_that_failed_goes_to_the_dead_letter_topic_and_holds_its_run(h: Harness) -> None:
    run = Run(TP, 1, 0, 3, 3)
    bad = poison(1)
    bad.run = run
    run.records.append(bad)
    entries: list[Entry] = [(b"{}", None, run, "view", None, 1)] * 2  # type: ignore[list-item]
    lots = h.settler.admit_consumed(Consumed([run], {"demo": entries}, [bad]))
    assert lots == {"demo": entries}
    assert h.sink.sent == [bad], "a record decoding refused is dead-lettered at once"
    h.settler.batch_delivered("demo", entries)
    assert h.committable() == {TP: 1}, "committed up to the record whose dead letter is not yet written"
    h.settler.dead_letter_written(bad)
    assert h.committable() == {TP: 3}
