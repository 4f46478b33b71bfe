"""What ``/healthz`` and ``/readyz`` answer: the relay's liveness and readiness, as lists of problems.

Read on the health server's thread (``consumer.health``), so every input is a field of the hand-off
(``consumer.handoff``) or of a part that is safe to read from anywhere (the fault board, a breaker's state):
each read is one attribute, never a structure another thread changes in place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Final

from consumer.breaker import CircuitBreaker
from consumer.faults import FaultBoard
from consumer.handoff import Handoff

#: How often the event loop ticks (:meth:`Probes.beat`).
HEARTBEAT_EVERY_S: Final = 1.0
#: /healthz turns red when the loop has not ticked for this long.
HEARTBEAT_STALE_S: Final = 10.0


class Probes:
    """Liveness and readiness of one relay process."""

    def __init__(
        self,
        handoff: Handoff,
        faults: FaultBoard,
        breakers: Mapping[str, CircuitBreaker],
        *,
        stall_after_s: float,
    ) -> None:
        self._handoff = handoff
        self._faults = faults
        self._breakers = breakers
        self._stall_after_s = stall_after_s
        #: When the event loop last ticked (written by the loop's heartbeat task only).
        self.heartbeat = time.monotonic()
        #: Set once the relay is shutting down (written by the loop only).
        self.stopping = False

    async def beat(self) -> None:
        """The loop's heartbeat task: a loop that stops ticking (blocked, or starved) fails liveness."""
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    def liveness(self) -> list[str]:
        """What makes this process dead: a stuck event loop, or an intake thread that stopped polling."""
        now = time.monotonic()
        problems = []
        if now - self.heartbeat > HEARTBEAT_STALE_S:
            problems.append(f"the event loop has not ticked for {now - self.heartbeat:.0f}s")
        stall = self._stall_after_s
        last_poll = self._handoff.last_poll
        if now - last_poll > stall:
            problems.append(f"the Kafka consumer has not polled for {now - last_poll:.0f}s")
        # librdkafka reconnects by itself, but not always: after a broker was restarted and then frozen, its
        # consumer stayed without a connection (broker state INIT) for minutes in about a third of the
        # test runs, while the broker answered others. A relay without a broker for this long asks to be
        # restarted; if the broker is really gone, the restart's start-up check says so and waits.
        lost = self._faults.lasting("kafka")
        if lost is not None and lost > stall:
            problems.append(f"no Kafka broker has answered this process for {lost:.0f}s")
        return problems

    def readiness(self) -> list[str]:
        """What keeps this process from moving events, though alive."""
        problems = self.liveness()
        if self.stopping:
            problems.append("stopping")
        if not self._handoff.assigned:
            problems.append("no partitions assigned")
        problems.extend(self._faults.current())  # broker, registry, dead-letter topic, consume errors
        problems.extend(
            f"circuit breaker open for shop {shop!r}"
            for shop, b in self._breakers.items()
            if b.state == "open"
        )
        problems.extend(self._stalled_partitions())
        return problems

    def _stalled_partitions(self) -> list[str]:
        """Partitions with records behind their committed offset that has not moved for ``stall_after_s``.

        The age runs from the last commit, or from the assignment when the partition was never committed
        here; a partition with nothing behind its commit is idle, not stalled.
        """
        handoff = self._handoff
        lag, commits, assigned, unsettled = (
            handoff.lag,
            handoff.commit_times,
            handoff.assigned_at,
            handoff.unsettled,
        )
        now = time.time()
        stalled = []
        for tp, since in assigned.items():
            # Kafka's lag counts from the committed offset (unknown before a first commit); in flight here
            # are records consumed and not yet settled: either is work that waits.
            behind = max(lag.get(tp, 0), unsettled.get(tp, 0))
            age = now - max(commits.get(tp, 0.0), since)
            if behind > 0 and age > self._stall_after_s:
                stalled.append(
                    f"partition {tp[0]}[{tp[1]}] has not committed for {age:.0f}s "
                    f"with {behind} record(s) behind it"
                )
        return stalled
