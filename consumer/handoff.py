"""The hand-off between the intake thread and the event loop: everything that crosses, in one place.

Two threads run the flow: the intake thread owns the Kafka consumer (``consumer.intake``), the event loop
owns delivery and settlement (``consumer.deliver``, ``consumer.settle``). They share nothing else: what one
tells the other goes through this module, in one of three ways.

**Events, intake → loop**, in order, through the loop's own FIFO (``call_soon_threadsafe``): records
consumed, partitions assigned or lost, the intake stopped (:meth:`Handoff.to_loop`). One FIFO, so the loop
learns of an assignment before any record of it. A revoke is a question that waits for its answer
(:meth:`Handoff.ask_loop`): the intake thread blocks on it while the loop lets in-flight records settle.

**State, each field with one writer.** A field is replaced whole, never changed in place, so a reader on
another thread sees the old value or the new one, each complete (one attribute read under the GIL):

=================  ========  ===============================================================================
field              writer    what
=================  ========  ===============================================================================
``held``           loop      partitions to keep paused (a shop's breaker open, a dead-letter topic refused)
``unsettled``      loop      records in flight per owned partition: the intake's backpressure reads it
``assigned``       intake    the partitions the consumer owns now
``assigned_at``    intake    when each was assigned (wall clock): how old "never committed" is
``lag``            intake    records behind each partition's end (librdkafka's statistics, or the broker)
``commit_times``   intake    when each partition's offset was last acknowledged committed (wall clock)
``last_poll``      intake    when the consumer last polled (monotonic): liveness
``consumed``       intake    records consumed since start (progress)
=================  ========  ===============================================================================

**Positions to commit, loop → intake**, under a lock: the ledger offers each partition's new committable
position as it moves (:meth:`PositionChannel.offer`); the intake takes all offered since its last look
(:meth:`PositionChannel.take`) and commits them.

The health server's thread only reads the state fields.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from consumer.record import TopicPartition

T = TypeVar("T")

#: Positions as the ledger publishes them: ``{tp: (assignment generation, offset)}``.
Positions = dict[TopicPartition, tuple[int, int]]


class PositionChannel:
    """Committable positions, loop -> intake thread, under a lock (see the module docstring)."""

    def __init__(self) -> None:
        self._positions: Positions = {}
        self._lock = threading.Lock()

    def offer(self, positions: Positions) -> None:
        """The ledger's newly committable positions (loop)."""
        with self._lock:
            self._positions.update(positions)

    def withdraw(self, tp: TopicPartition) -> None:
        """A released partition's position is not to be committed from here any more (loop)."""
        with self._lock:
            self._positions.pop(tp, None)

    def take(self) -> Positions:
        """Every position offered since the last call (intake thread)."""
        with self._lock:
            positions, self._positions = self._positions, {}
        return positions


class Handoff:
    """The one channel between the intake thread and the event loop (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the event loop events go to (None for a settler tested without one)."""
        self._loop = loop
        # written by the loop
        self.held: frozenset[TopicPartition] = frozenset()
        self.unsettled: Mapping[TopicPartition, int] = {}
        # written by the intake thread
        self.assigned: frozenset[TopicPartition] = frozenset()
        self.assigned_at: Mapping[TopicPartition, float] = {}
        self.lag: Mapping[TopicPartition, int] = {}
        self.commit_times: Mapping[TopicPartition, float] = {}
        self.last_poll = time.monotonic()
        self.consumed = 0
        self.positions = PositionChannel()

    # --- events, intake -> loop ----------------------------------------------------------------------

    def to_loop(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop, after everything handed over before it."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    def ask_loop(self, question: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``question`` on the loop and wait for its answer (intake thread; raises on timeout)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(question, self._loop).result(timeout=timeout)
