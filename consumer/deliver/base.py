"""What both dispatchers share: taking records in, the fixed pool of tasks, and parking per shop."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Generic, TypeVar

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, TrackingConfig
from consumer.deliver.caller import Caller, Clock, Done, Owns, Sleep, ordering_key
from consumer.metrics import RelayMetrics
from consumer.retry import Backoff
from consumer.tracking import TrackingClient

#: The unit of work a dispatcher queues for its pool: a sealed batch, or a record.
Work = TypeVar("Work")


class DispatcherBase(ABC, Generic[Work]):
    """Work out through a queue served by ``pool`` tasks; each class takes its records in its own way."""

    def __init__(
        self,
        client: TrackingClient,
        delivery: DeliveryConfig,
        tracking: TrackingConfig,
        backoff: Backoff,
        *,
        breakers: Mapping[str, CircuitBreaker],
        done: Done,
        owns: Owns,
        clock: Clock,
        sleep: Sleep,
        metrics: RelayMetrics | None,
        pool: int,
    ) -> None:
        self._config = delivery
        self._tracking = tracking
        self._done = done
        self._owns = owns
        self._key_of = ordering_key(delivery.ordering)
        self._caller = Caller(client, backoff, breakers, owns, clock, sleep, metrics or RelayMetrics())
        self._pool = pool
        self._tasks: list[asyncio.Task[None]] = []
        # work ready for the pool
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        # shop -> work waiting, without a sender, for the shop's retrying call to be done
        self._parked: dict[str, list[Work]] = {}

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._serve()) for _ in range(self._pool)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def flush(self) -> None:
        """Send whatever waits for more company now (shutdown and revoke); nothing does by default."""

    @abstractmethod
    async def _serve(self) -> None:
        """One task of the pool: take work from the queue and send it, forever."""

    # --- parking -------------------------------------------------------------------------------------

    def _park(self, shop: str, work: Work) -> bool:
        """Park ``work`` without sending it while a call of its shop is retrying."""
        if shop not in self._caller.retrying:
            return False
        self._parked.setdefault(shop, []).append(work)
        return True

    def _park_stepped_aside(self, shop: str, work: Work) -> None:
        """Park ``work`` whose call stepped aside for the shop's retrying call."""
        self._parked.setdefault(shop, []).append(work)

    def _unpark(self, shop: str) -> None:
        """A call of ``shop`` is done: unless one still retries for it, queue the shop's parked work again."""
        if shop in self._caller.retrying or shop not in self._parked:
            return
        for work in self._parked.pop(shop):
            self._queue.put_nowait(work)
