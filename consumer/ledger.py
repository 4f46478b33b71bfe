"""The offset ledger: what may be committed, per partition and assignment generation.

Records settle out of order (different visitors finish at different times). Per partition the ledger keeps
the *runs* still open, in consumption order: a run is the records of the partition read in one ``consume()``
batch (``consumer.record.Run``), and settles as a count, so a batch of records settles in one step per run,
not one per record. The committable position is the first offset of the oldest open run (or the end of the
last closed one when none is open), so a commit never passes a record that is not yet delivered or safely
dead-lettered; it may stay up to one run behind the first unsettled record, which a restart sends again.
A record tracked on its own (single mode, a re-drive, a test) is a run of one, so there the position is
exactly the first unsettled offset.

Each assignment of a partition gets a new *generation*. A settlement carrying an older generation — a
completion that arrives after its partition was revoked, even if the partition came back since — is
dropped, never committed.

A record settles once (``Record.settled``) and a run's records are counted off it once each, so settling a
record twice, or releasing a partition whose later records settled first, changes nothing the ledger reports.

All methods run on the event loop thread. The positions to commit reach the intake thread through a
:class:`~consumer.handoff.PositionChannel`, the ledger's only way out of the loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from consumer.handoff import PositionChannel, Positions
from consumer.record import Record, Run, TopicPartition


class PartitionLedger:
    """The runs of one partition under one generation, oldest first (see :class:`~consumer.record.Run`)."""

    __slots__ = ("generation", "runs", "settled_end", "tracked_end", "unsettled")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.runs: deque[Run] = deque()
        #: The end of the last run closed with every run before it: the position when no run is open.
        self.settled_end: int | None = None
        #: The end of the last run tracked: every record before it was read.
        self.tracked_end: int | None = None
        #: Records tracked and not yet settled, kept as runs open and closed: never below zero, since a
        #: record settles once (``Record.settled``) and a run's batch is settled once by delivery.
        self.unsettled = 0

    def track(self, run: Run) -> int | None:
        """Add a run just read; return the new committable position if it moved (a run with nothing open)."""
        self.runs.append(run)
        self.unsettled += run.open
        self.tracked_end = run.end
        return self._advance() if run.open == 0 else None

    def settle(self, run: Run, count: int) -> int | None:
        """``count`` records of ``run`` settled; return the new committable position if it moved."""
        run.open -= count
        self.unsettled -= count
        if self.runs[0] is not run:
            return None
        if run.open == 0:
            return self._advance()
        return self.position() if run.open == len(run.records) else None

    def _advance(self) -> int | None:
        runs = self.runs
        moved = False
        while runs and runs[0].open == 0:
            self.settled_end = runs.popleft().end
            moved = True
        return self.position() if moved else None

    def position(self) -> int | None:
        """The offset to commit: within the oldest open run, its first record still open if only Records
        are (else the run's first offset); the end of the last closed run when none is open; None before
        any run closed."""
        if not self.runs:
            return self.settled_end
        head = self.runs[0]
        if head.records and head.open == len(head.records):
            return min(record.offset for record in head.records)
        return head.first

    def __len__(self) -> int:
        return self.unsettled


class OffsetLedger:
    """All partitions this process owns, and the positions waiting to be stored for commit."""

    def __init__(
        self,
        on_settled: Callable[[Record], None] | None = None,
        positions: PositionChannel | None = None,
    ) -> None:
        #: Called with each record once it settled (a re-drive records the outcome of each).
        self._on_settled = on_settled
        self._partitions: dict[TopicPartition, PartitionLedger] = {}
        #: Where each partition's newly committable position goes: to the intake thread, which commits it.
        self.positions = positions if positions is not None else PositionChannel()
        #: How many partitions were released (revoked or lost) so far: while it stays the same, every record
        #: found owned stays owned, so a batch of them need not be checked one by one again.
        self.releases = 0
        #: The latest committable position each partition reached (kept across revokes, for progress).
        self.reached: dict[TopicPartition, int] = {}
        #: Records given up unsettled when their partitions were released (revoked or lost), since start.
        self.released_unsettled = 0

    @property
    def in_flight(self) -> int:
        """Records consumed and not yet settled, over every partition owned now."""
        return sum(len(ledger) for ledger in list(self._partitions.values()))

    def unsettled_by_partition(self) -> dict[TopicPartition, int]:
        """Unsettled records per owned partition."""
        return {tp: len(ledger) for tp, ledger in list(self._partitions.items())}

    # --- assignment (driven by the intake thread's rebalance callbacks, run here on the loop) -------

    def assign(self, tp: TopicPartition, generation: int) -> None:
        if tp in self._partitions:
            self.release(tp)  # a new generation without a revoke first: the old one's records are not ours
        self._partitions[tp] = PartitionLedger(generation)

    def release(self, tp: TopicPartition) -> int | None:
        """Forget a revoked or lost partition; return its committable position (None: nothing settled)."""
        ledger = self._partitions.pop(tp, None)
        if ledger is None:
            return None
        self.releases += 1
        self.released_unsettled += len(ledger)
        for run in ledger.runs:
            run.live = False  # a completion of its records changes nothing now
        self.positions.withdraw(tp)
        return ledger.position()

    def owns(self, record: Record) -> bool:
        ledger = self._partitions.get(record.tp)
        return ledger is not None and ledger.generation == record.generation

    def in_flight_for(self, tp: TopicPartition) -> int:
        """Unsettled records of one partition."""
        ledger = self._partitions.get(tp)
        return 0 if ledger is None else len(ledger)

    def assigned(self) -> list[TopicPartition]:
        return list(self._partitions)

    def tracked_up_to(self, ends: Mapping[TopicPartition, int]) -> bool:
        """Whether every record of each partition before its end in ``ends`` was tracked (none to come)."""
        for tp, end in ends.items():
            ledger = self._partitions.get(tp)
            if ledger is None:
                return False
            if ledger.tracked_end is None or ledger.tracked_end < end:
                return False
        return True

    # --- the flow ---------------------------------------------------------------------------------------

    def track(self, records: list[Record]) -> list[Record]:
        """Start tracking freshly consumed records, each a run of its own unless it came in one; return
        those whose partition is still ours."""
        kept = []
        partitions = self._partitions
        moved: Positions = {}
        for record in records:
            ledger = partitions.get(record.tp)
            if ledger is None or ledger.generation != record.generation:
                continue  # read before a revoke that has since happened: the next owner reads it again
            if record.run is None:
                record.run = Run(record.tp, record.generation, record.offset, record.offset + 1, 1)
                position = ledger.track(record.run)
                if position is not None:
                    moved[record.tp] = (ledger.generation, position)
            kept.append(record)
        self._publish(moved)
        return kept

    def track_runs(self, runs: list[Run]) -> bool:
        """Start tracking the runs of one ``consume()`` batch; False when one was read under a generation
        that is no longer ours (it is marked not live, and its records are to be dropped)."""
        partitions = self._partitions
        moved: Positions = {}
        fresh = True
        for run in runs:
            ledger = partitions.get(run.tp)
            if ledger is None or ledger.generation != run.generation:
                run.live = False
                fresh = False
                continue
            position = ledger.track(run)
            if position is not None:
                moved[run.tp] = (ledger.generation, position)
        self._publish(moved)
        return fresh

    def settle(self, record: Record) -> bool:
        """Mark a record settled. False when its partition is no longer ours (the completion is dropped) or
        when it was settled before."""
        run = record.run
        if record.settled or run is None or not run.live:
            return False
        record.settled = True
        if record in run.records:  # (by identity) a Record made within a run
            run.records.remove(record)
        ledger = self._partitions[record.tp]
        position = ledger.settle(run, 1)
        if self._on_settled is not None:
            self._on_settled(record)
        if position is not None:
            self._publish({record.tp: (ledger.generation, position)})
        return True

    def settle_many(self, records: list[Record]) -> int:
        """Mark delivered records settled (a batch's worth); return how many were still ours and unsettled."""
        settled = 0
        for record in records:
            settled += self.settle(record)
        return settled

    def settle_runs(self, counts: Mapping[Run, int]) -> int:
        """Settle ``counts[run]`` records of each run (a batch's); return how many were still ours."""
        partitions = self._partitions
        moved: Positions = {}
        settled = 0
        for run, count in counts.items():
            if run is None or not run.live:
                continue  # its partition was released meanwhile (or the entry was a record: settled as one)
            ledger = partitions[run.tp]
            settled += count
            position = ledger.settle(run, count)
            if position is not None:
                moved[run.tp] = (ledger.generation, position)
        self._publish(moved)
        return settled

    def _publish(self, moved: Positions) -> None:
        if moved:
            for tp, (_, position) in moved.items():
                self.reached[tp] = position
            self.positions.offer(moved)
