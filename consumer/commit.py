"""Commit: the one place that decides what is committed to the group, and when.

librdkafka's auto-commit is off. The intake thread hands every settled position it takes from the ledger to
the :class:`Committer`, which commits them asynchronously every ``commit_interval_ms``, and synchronously
when partitions are revoked or the consumer closes. Auto-commit had a second writer — librdkafka committing
its stored offsets on its own timer and again on unassign — and a stored offset older than the one a revoke
had just committed landed after it, so the next owner re-sent what was settled already.

Per partition and assignment generation the committer remembers the highest offset it committed and never
commits a lower or equal one; after a partition's final commit (its revoke) nothing more is committed for
it under that generation. The broker processes one client's commits in the order they were sent, so an
asynchronous commit sent before the revoke's synchronous one cannot overtake it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition

from consumer.record import TopicPartition

log = structlog.get_logger(__name__)

#: How long the revoke's look at what the broker holds may take.
COMMITTED_QUERY_TIMEOUT_S = 5.0
#: A commit refused for these is refused only until the group's rebalance is through.
REFUSED_DURING_REBALANCE = frozenset((KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION))


class Committer:
    """Commits settled positions: periodically, on revoke and at close, never backwards."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = clock() + interval_s
        #: tp -> (generation, offset): settled positions not yet committed
        self._due: dict[TopicPartition, tuple[int, int]] = {}
        #: tp -> (generation, offset): the highest offset committed for the partition's current generation
        self._committed: dict[TopicPartition, tuple[int, int]] = {}
        #: tp -> generation whose final commit was made: nothing more is committed for it
        self._sealed: dict[TopicPartition, int] = {}
        #: tp -> (generation, offset) the broker acknowledged last
        self._confirmed: dict[TopicPartition, tuple[int, int]] = {}

    def note(self, positions: Mapping[TopicPartition, tuple[int, int]]) -> None:
        """Positions the ledger reached (``{tp: (generation, offset)}``), to be committed when due."""
        due = self._due
        for tp, position in positions.items():
            known = due.get(tp)
            if known is None or known[0] != position[0] or position[1] > known[1]:
                due[tp] = position

    def commit_due(self, consumer: Consumer, current: Mapping[TopicPartition, int]) -> None:
        """Commit what is due, asynchronously, once per interval (``current``: owned tp -> generation)."""
        now = self._clock()
        if now < self._next_at:
            return
        self._next_at = now + self._interval_s
        offsets = self._take(current)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:
                # Not committed now: the next interval commits a position at least as far.
                log.warning("intake.commit_failed", error=str(exc))

    def commit_now(self, consumer: Consumer, current: Mapping[TopicPartition, int]) -> bool:
        """Commit what is due synchronously (shutdown). False when a rebalance in progress refused it: the
        offsets are due again, to be committed once the rebalance is through."""
        offsets = self._take(current)
        # An asynchronous commit sent but not yet acknowledged may still be refused (a rebalance began):
        # the shutdown commits every owned position the broker has not acknowledged, again.
        listed = {(o.topic, o.partition) for o in offsets}
        for tp, (generation, offset) in self._committed.items():
            confirmed = self._confirmed.get(tp)
            if (
                tp not in listed
                and current.get(tp) == generation
                and self._sealed.get(tp) != generation
                and (confirmed is None or confirmed[0] != generation or confirmed[1] < offset)
            ):
                offsets.append(KafkaTopicPartition(tp[0], tp[1], offset))
        if not offsets:
            return True
        try:
            acknowledged = _offsets(consumer.commit(offsets=offsets, asynchronous=False))
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            retry = error is not None and error.code() in REFUSED_DURING_REBALANCE
            log.log(logging.WARNING if retry else logging.ERROR, "intake.commit_failed", error=str(exc))
            self.failed(offsets)
            return not retry
        for tp, offset in acknowledged.items():
            self._confirmed[tp] = (current[tp], offset)
        return True

    def commit_final(
        self,
        consumer: Consumer,
        final: Mapping[TopicPartition, tuple[int, int | None]],
        *,
        ask: bool = True,
    ) -> dict[TopicPartition, int | None]:
        """A revoke: commit each partition's final position synchronously, then commit nothing more for it.

        ``final``: ``{tp: (generation, position or None)}``. The final position is committed even when it
        was committed before (an asynchronous commit may have failed since), so what the broker acknowledges
        is what it holds. Returns that per partition (``None``: no committed offset); for a partition with no
        position (nothing consumed), or when the commit failed, the broker's answer when asked (``ask``; not
        while the consumer closes, when librdkafka no longer serves the question), else ``None``.
        """
        offsets = []
        for tp, (generation, position) in final.items():
            self._due.pop(tp, None)
            if position is not None and not self._behind(tp, generation, position):
                offsets.append(KafkaTopicPartition(tp[0], tp[1], position))
            self._sealed[tp] = generation
        held: dict[TopicPartition, int | None] = {}
        if offsets:
            try:
                acknowledged = _offsets(consumer.commit(offsets=offsets, asynchronous=False))
            except KafkaException as exc:
                log.error("intake.revoke_commit_failed", partitions=_names(final), error=str(exc))
            else:
                held.update(acknowledged)
                for tp, offset in acknowledged.items():
                    self._committed[tp] = self._confirmed[tp] = (final[tp][0], offset)
        rest = [tp for tp in final if tp not in held]
        if rest and ask:
            held.update(self.held(consumer, rest))
        for tp in rest:
            confirmed = self._confirmed.get(tp)
            if held.get(tp) is None and confirmed is not None and confirmed[0] == final[tp][0]:
                held[tp] = confirmed[1]  # acknowledged by an earlier commit of this generation
        return {tp: held.get(tp) for tp in final}

    def confirm(
        self, partitions: Iterable[KafkaTopicPartition], generation: Mapping[TopicPartition, int]
    ) -> None:
        """The broker acknowledged these offsets (an asynchronous commit's report)."""
        for partition in partitions:
            tp = (partition.topic, partition.partition)
            if tp in generation:
                self._confirmed[tp] = (generation[tp], partition.offset)

    def failed(self, partitions: Iterable[KafkaTopicPartition]) -> None:
        """An asynchronous commit of these offsets failed: they are due again (unless overtaken or sealed)."""
        for partition in partitions:
            tp = (partition.topic, partition.partition)
            known = self._committed.get(tp)
            if known is None or known[1] != partition.offset:
                continue  # a later commit was sent since: it carries a position at least as far
            del self._committed[tp]
            if self._sealed.get(tp) != known[0]:
                self.note({tp: known})

    def held(
        self, consumer: Consumer, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        """The offsets the broker holds for ``partitions`` (``None``: none committed, or the query failed)."""
        tps = list(partitions)
        if not tps:
            return {}
        try:
            found = consumer.committed(
                [KafkaTopicPartition(t, p) for t, p in tps], timeout=COMMITTED_QUERY_TIMEOUT_S
            )
        except KafkaException as exc:
            log.warning("intake.committed_query_failed", partitions=_names(tps), error=str(exc))
            return dict.fromkeys(tps)
        return {tp: _offsets(found).get(tp) for tp in tps}

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions lost (another member may own them): nothing of theirs is committed from here."""
        for tp in tps:
            self._due.pop(tp, None)

    def _take(self, current: Mapping[TopicPartition, int]) -> list[KafkaTopicPartition]:
        due, self._due = self._due, {}
        offsets = []
        for tp, (generation, offset) in due.items():
            if current.get(tp) != generation or self._sealed.get(tp) == generation:
                continue  # revoked or lost since it settled: the revoke committed its final position
            if self._advances(tp, generation, offset):
                offsets.append(KafkaTopicPartition(tp[0], tp[1], offset))
                self._committed[tp] = (generation, offset)
        return offsets

    def _advances(self, tp: TopicPartition, generation: int, offset: int) -> bool:
        """Whether ``offset`` is past everything committed for this partition's generation."""
        known = self._committed.get(tp)
        return known is None or known[0] != generation or offset > known[1]

    def _behind(self, tp: TopicPartition, generation: int, offset: int) -> bool:
        """Whether ``offset`` is before something committed for this partition's generation."""
        known = self._committed.get(tp)
        return known is not None and known[0] == generation and offset < known[1]


def _offsets(partitions: list[KafkaTopicPartition]) -> dict[TopicPartition, int]:
    """The valid offsets of a commit's or a query's answer."""
    return {(p.topic, p.partition): p.offset for p in partitions if p.error is None and p.offset >= 0}


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return [f"{t}[{p}]" for t, p in partitions]
