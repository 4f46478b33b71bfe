"""The offset ledger: what may be committed, per partition and assignment generation.

Records settle out of order (different visitors finish at different times). Per partition the ledger keeps
the offsets still in flight, in consumption order; the committable position is always the first unsettled
offset (or the last settled + 1 when nothing is in flight), so a commit never passes a record that is not
yet delivered or safely dead-lettered.

Each assignment of a partition gets a new *generation*. A settlement carrying an older generation — a
completion that arrives after its partition was revoked, even if the partition came back since — is
dropped, never committed.

Every count the ledger gives is read off its own state — the offsets each partition still holds — never
kept as a running difference, so it cannot drift or go negative: settling a record twice, or releasing a
partition whose later records settled first, changes nothing it reports.

All methods run on the event loop thread. The positions to commit reach the intake thread through a
:class:`~consumer.handoff.PositionChannel`, the ledger's only way out of the loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from consumer.handoff import PositionChannel
from consumer.record import Record, TopicPartition


class PartitionLedger:
    """The in-flight offsets of one partition under one generation."""

    __slots__ = ("done", "generation", "last_settled", "pending")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.pending: deque[int] = deque()
        self.done: set[int] = set()
        self.last_settled: int | None = None

    def track(self, offset: int) -> None:
        self.pending.append(offset)

    def settle(self, offset: int) -> int | None:
        """Mark ``offset`` settled; return the new committable position if it moved.

        An offset settled before (behind the first unsettled one, or among the done) changes nothing.
        """
        pending = self.pending
        if not pending or offset < pending[0]:
            return None  # settled already: the position passed it
        if offset != pending[0]:
            self.done.add(offset)
            return None
        pending.popleft()
        self.last_settled = offset
        done = self.done
        while pending and pending[0] in done:
            self.last_settled = pending.popleft()
            done.discard(self.last_settled)
        return self.position()

    def position(self) -> int | None:
        """The offset to commit: the first unsettled one, or last settled + 1; None before any record."""
        if self.pending:
            return self.pending[0]
        return None if self.last_settled is None else self.last_settled + 1

    def __len__(self) -> int:
        """Records still unsettled: the tracked ones less those settled out of order (in ``done``)."""
        return len(self.pending) - len(self.done)


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
            if ledger.pending:
                last = ledger.pending[-1]  # settled records stay in pending until those before them settle
            elif ledger.last_settled is not None:
                last = ledger.last_settled
            else:
                return False
            if last + 1 < end:
                return False
        return True

    # --- the flow ---------------------------------------------------------------------------------------

    def track(self, records: list[Record]) -> list[Record]:
        """Start tracking freshly consumed records; return those whose partition is still ours."""
        kept = []
        partitions = self._partitions
        for record in records:
            ledger = partitions.get(record.tp)
            if ledger is None or ledger.generation != record.generation:
                continue  # read before a revoke that has since happened: the next owner reads it again
            ledger.track(record.offset)
            kept.append(record)
        return kept

    def settle(self, record: Record) -> bool:
        """Mark a record settled. False when its partition is no longer ours (the completion is dropped) or
        when it was settled before."""
        ledger = self._partitions.get(record.tp)
        if ledger is None or ledger.generation != record.generation:
            return False
        before = len(ledger)
        position = ledger.settle(record.offset)
        if len(ledger) == before:
            return False
        if self._on_settled is not None:
            self._on_settled(record)
        if position is not None:
            self.reached[record.tp] = position
            self.positions.offer({record.tp: (ledger.generation, position)})
        return True

    def settle_many(self, records: list[Record]) -> int:
        """Mark delivered records settled (a batch's worth); return how many were still ours and unsettled."""
        partitions = self._partitions
        settled = 0
        on_settled = self._on_settled
        moved: dict[TopicPartition, tuple[int, int]] = {}
        tp: TopicPartition | None = None
        ledger: PartitionLedger | None = None
        for record in records:
            if record.tp != tp:  # a batch holds runs of one partition: look each run's ledger up once
                tp = record.tp
                ledger = partitions.get(tp)
            if ledger is None or ledger.generation != record.generation:
                continue
            before = len(ledger)
            position = ledger.settle(record.offset)
            if len(ledger) == before:
                continue  # settled before (a duplicate completion): counted once
            settled += 1
            if on_settled is not None:
                on_settled(record)
            if position is not None:
                moved[tp] = (ledger.generation, position)
        if moved:
            for tp, (_, position) in moved.items():
                self.reached[tp] = position
            self.positions.offer(moved)
        return settled
