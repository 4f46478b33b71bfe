"""The offset ledger: what may be committed is never past a record not yet settled."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from consumer.ledger import OffsetLedger, PartitionLedger
from consumer.record import Record, Run

TP = ("events", 0)


def record(offset: int, generation: int = 1, tp: tuple[str, int] = TP) -> Record:
    message: Any = None  # the ledger never looks at the message
    return Record(tp, offset, generation, None, message)


def runs_of_one(ledger: PartitionLedger, offsets: tuple[int, ...] | range) -> dict[int, Run]:
    """Track each offset as a run of its own (single mode, a re-drive): the ledger is exact per record."""
    runs = {offset: Run(TP, 1, offset, offset + 1, 1) for offset in offsets}
    for run in runs.values():
        ledger.track(run)
    return runs


def test_the_position_waits_for_the_first_unsettled_offset() -> None:
    ledger = PartitionLedger(generation=1)
    runs = runs_of_one(ledger, (10, 11, 12, 13))
    assert ledger.settle(runs[12], 1) is None, "a later record settling first moves nothing"
    assert ledger.settle(runs[11], 1) is None
    assert ledger.settle(runs[10], 1) == 13, "once 10 settles, 10-12 are done: commit 13, the first unsettled"
    assert ledger.settle(runs[13], 1) == 14


def test_gaps_in_offsets_do_not_hold_the_position_back() -> None:
    # Compacted topics and transaction markers leave holes: only tracked offsets count.
    ledger = PartitionLedger(generation=1)
    runs = runs_of_one(ledger, (3, 7, 20))
    assert ledger.settle(runs[7], 1) is None
    assert ledger.settle(runs[3], 1) == 20
    assert ledger.settle(runs[20], 1) == 21


@given(st.permutations(list(range(40))))
def test_in_any_settle_order_the_position_is_the_first_unsettled_offset(order: list[int]) -> None:
    ledger = PartitionLedger(generation=1)
    runs = runs_of_one(ledger, range(40))
    settled: set[int] = set()
    last = None
    for offset in order:
        settled.add(offset)
        moved = ledger.settle(runs[offset], 1)
        first_unsettled = next((o for o in range(40) if o not in settled), 40)
        if moved is not None:
            last = moved
        assert ledger.position() == first_unsettled
        assert last is None or last <= first_unsettled
    assert last == 40


def test_a_run_holds_the_position_at_its_first_offset_until_every_record_of_it_settled() -> None:
    ledger = PartitionLedger(generation=1)
    first, second = Run(TP, 1, 0, 100, 80), Run(TP, 1, 100, 200, 100)  # 20 of the first implied no call
    assert ledger.track(first) is None
    assert ledger.track(second) is None
    assert ledger.settle(second, 100) is None, "a later run closing first moves nothing"
    assert ledger.settle(first, 79) is None, "one record of the run is still open: commit nothing past 0"
    assert ledger.position() == 0
    assert len(ledger) == 1
    assert ledger.settle(first, 1) == 200, "both runs closed: commit past the second"
    assert len(ledger) == 0


def test_a_run_with_nothing_to_send_moves_the_position_as_it_is_tracked() -> None:
    ledger = PartitionLedger(generation=1)
    assert ledger.track(Run(TP, 1, 0, 50, 0)) == 50, "every record skipped: committable at once"
    open_run = Run(TP, 1, 50, 60, 3)
    assert ledger.track(open_run) is None
    assert ledger.track(Run(TP, 1, 60, 70, 0)) is None, "behind an open run it waits for it"
    assert ledger.settle(open_run, 3) == 70


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=12), st.randoms())
def test_runs_settled_in_any_order_and_pieces_never_commit_past_an_open_record(
    sizes: list[int], random: Any
) -> None:
    """Any runs, their records settled in any order and in pieces: the position is never past the first
    offset of a run with a record open, and reaches the last run's end once all settled."""
    ledger = OffsetLedger()
    ledger.assign(TP, generation=1)
    runs, start = [], 0
    for size in sizes:
        runs.append(Run(TP, 1, start, start + size + 1, size))  # one record of each skipped
        start += size + 1
    ledger.track_runs(runs)
    pieces = [run for run in runs for _ in range(run.open)]
    random.shuffle(pieces)
    for run in pieces:
        ledger.settle_runs({run: 1})
        position = ledger.reached.get(TP, 0)
        first_open = next((r.first for r in runs if r.open), start)
        assert position <= first_open
    assert ledger.reached.get(TP) == start
    assert ledger.in_flight == 0


def test_runs_of_a_released_partition_settle_nothing() -> None:
    ledger = OffsetLedger()
    ledger.assign(TP, generation=1)
    run = Run(TP, 1, 0, 10, 10)
    assert ledger.track_runs([run])
    assert ledger.release(TP) == 0
    ledger.assign(TP, generation=2)
    assert ledger.settle_runs({run: 10}) == 0, "the old generation's batch is not ours to commit"
    assert ledger.positions.take() == {}
    stale = Run(TP, 1, 10, 20, 10)
    assert not ledger.track_runs([stale]), "read under the old generation: not tracked"
    assert not stale.live
    assert ledger.in_flight == 0


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
    # Each ledger its own records: a record carries its run and whether it settled.
    singly, together = [record(offset) for offset in range(30)], [record(offset) for offset in range(30)]
    one.track(singly)
    many.track(together)
    for start in range(0, 30, size):
        for i in order[start : start + size]:
            one.settle(singly[i])
        assert many.settle_many([together[i] for i in order[start : start + size]]) == len(
            order[start : start + size]
        )
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
