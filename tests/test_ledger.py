"""The offset ledger: what may be committed is always the first unsettled offset."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from consumer.ledger import OffsetLedger, PartitionLedger
from consumer.record import Record

TP = ("events", 0)


def record(offset: int, generation: int = 1, tp: tuple[str, int] = TP) -> Record:
    message: Any = None  # the ledger never looks at the message
    return Record(tp, offset, generation, None, message)


def test_the_position_waits_for_the_first_unsettled_offset() -> None:
    ledger = PartitionLedger(generation=1)
    for offset in (10, 11, 12, 13):
        ledger.track(offset)
    assert ledger.settle(12) is None, "a later record settling first moves nothing"
    assert ledger.settle(11) is None
    assert ledger.settle(10) == 13, "once 10 settles, 10-12 are done: commit 13, the first unsettled"
    assert ledger.settle(13) == 14


def test_gaps_in_offsets_do_not_hold_the_position_back() -> None:
    # Compacted topics and transaction markers leave holes: only tracked offsets count.
    ledger = PartitionLedger(generation=1)
    for offset in (3, 7, 20):
        ledger.track(offset)
    assert ledger.settle(7) is None
    assert ledger.settle(3) == 20
    assert ledger.settle(20) == 21


@given(st.permutations(list(range(40))))
def test_in_any_settle_order_the_position_is_the_first_unsettled_offset(order: list[int]) -> None:
    ledger = PartitionLedger(generation=1)
    for offset in range(40):
        ledger.track(offset)
    settled: set[int] = set()
    last = None
    for offset in order:
        settled.add(offset)
        moved = ledger.settle(offset)
        first_unsettled = next((o for o in range(40) if o not in settled), 40)
        if moved is not None:
            last = moved
        assert ledger.position() == first_unsettled
        assert last is None or last <= first_unsettled
    assert last == 40


def test_a_completion_for_a_revoked_partition_is_dropped_even_if_it_came_back() -> None:
    ledger = OffsetLedger()
    ledger.assign(TP, generation=1)
    early = record(5, generation=1)
    assert ledger.track([early]) == [early]
    assert ledger.release(TP) == 5, "revoked with 5 unsettled: commit 5"
    ledger.assign(TP, generation=2)  # the partition comes back to this process
    assert ledger.settle(early) is False, "the old generation's completion is not ours to commit"
    assert ledger.positions.take() == {}
    assert ledger.in_flight == 0


def test_a_new_generation_without_a_revoke_first_releases_the_old_one() -> None:
    ledger = OffsetLedger()
    ledger.assign(TP, generation=1)
    old = record(3, generation=1)
    ledger.track([old])
    releases = ledger.releases
    ledger.assign(TP, generation=2)
    assert not ledger.owns(old)
    assert ledger.releases == releases + 1, "batches opened before must check their records again"
    assert ledger.in_flight == 0


def test_records_read_before_a_revoke_are_not_tracked_after_it() -> None:
    ledger = OffsetLedger()
    ledger.assign(TP, generation=1)
    ledger.release(TP)
    assert ledger.track([record(1, generation=1)]) == []
    assert ledger.in_flight == 0


def test_settled_positions_are_handed_to_the_intake_once_with_their_generation() -> None:
    ledger = OffsetLedger()
    ledger.assign(TP, generation=3)
    first, second = record(0, 3), record(1, 3)
    ledger.track([first, second])
    assert ledger.in_flight == 2
    assert ledger.settle(second)
    assert ledger.positions.take() == {}
    assert ledger.settle(first)
    assert ledger.positions.take() == {TP: (3, 2)}
    assert ledger.positions.take() == {}, "taken once"
    assert ledger.in_flight == 0


@given(st.permutations(list(range(30))), st.integers(min_value=1, max_value=30))
def test_settling_a_batch_at_once_moves_the_position_as_settling_one_by_one(
    order: list[int], size: int
) -> None:
    one, many = OffsetLedger(), OffsetLedger()
    for ledger in (one, many):
        ledger.assign(TP, generation=1)
    records = [record(offset) for offset in range(30)]
    one.track(records)
    many.track(records)
    for start in range(0, 30, size):
        chunk = [records[i] for i in order[start : start + size]]
        for item in chunk:
            one.settle(item)
        assert many.settle_many(chunk) == len(chunk)
        assert many.positions.take() == one.positions.take()
        assert many.in_flight == one.in_flight
    assert many.reached == one.reached == {TP: 30}


def test_a_partition_released_after_later_records_settled_counts_only_the_unsettled_ones() -> None:
    ledger = OffsetLedger()
    ledger.assign(TP, generation=1)
    records = [record(offset) for offset in range(5)]
    ledger.track(records)
    for later in records[2:]:
        assert ledger.settle(later)
    assert ledger.in_flight == 2, "offsets 0 and 1"
    assert ledger.unsettled_by_partition() == {TP: 2}
    assert ledger.release(TP) == 0
    assert ledger.in_flight == 0
    assert ledger.released_unsettled == 2, "what the next owner has to send that this one did not"


def test_a_record_settled_twice_is_counted_once() -> None:
    ledger = OffsetLedger()
    ledger.assign(TP, generation=1)
    first, second, third = record(0), record(1), record(2)
    ledger.track([first, second, third])
    assert ledger.settle(second)
    assert not ledger.settle(second), "out of order, twice"
    assert ledger.settle(first)
    assert not ledger.settle(first), "behind the position, twice"
    assert ledger.settle_many([first, second, third]) == 1, "only the third was still unsettled"
    assert ledger.in_flight == 0
    assert ledger.positions.take() == {TP: (1, 3)}
