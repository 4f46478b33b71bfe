"""Deliver: get every record's calls to the tracking API, in order per visitor, as fast as the API allows.

Two modes, two classes behind one small interface (:class:`Dispatcher`) — records come in with
:meth:`Dispatcher.submit`, each record leaves exactly once through the ``done`` callback (or, in batch mode,
``done_many``), with ``record.failed_calls`` naming any call that got a permanent answer:

* ``batch`` (:class:`~consumer.deliver.batching.BatchDispatcher`) packs the calls of one shop into
  ``visitorEvents`` batches (:mod:`consumer.deliver.envelope`) and sends them by a fixed pool of senders.
* ``single`` (:class:`~consumer.deliver.single.SingleDispatcher`) sends one call per event through a fixed
  pool of workers.

:func:`make_dispatcher` picks the class by ``delivery.mode``.

Order per visitor. The *ordering key* of a record is ``(shop, record key)`` in ``key`` mode,
``(shop, partition)`` in ``partition`` mode, and none in ``unordered`` mode. Records of one ordering key
are never in flight twice; each class's module says how it keeps that.

There is no task, future or lock per record: records move between plain deques and dicts on the event loop,
and the pools of senders/workers are fixed at start.

Transient answers are retried with backoff (:mod:`consumer.deliver.caller`) for as long as it takes, or
until a configured maximum age, holding the ordering key.

One shop's trouble does not take the pool from the others. While a call of a shop is retrying (the API
answered it 429 or 5xx, or its circuit breaker is open), that call alone waits for the shop: another batch
or record of the shop that gets a transient answer, or comes up meanwhile, is parked without a sender and
queued again once the retrying call is done. Senders and workers stay free for the shops that answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from consumer.breaker import CircuitBreaker
from consumer.config import DeliveryConfig, TrackingConfig
from consumer.deliver.batching import BatchDispatcher, DeliveredEntries
from consumer.deliver.caller import Clock, Done, DoneMany, Owns, Sleep
from consumer.deliver.single import SingleDispatcher
from consumer.metrics import RelayMetrics
from consumer.record import Record
from consumer.retry import Backoff
from consumer.tracking import TrackingClient

__all__ = ["BatchDispatcher", "Dispatcher", "SingleDispatcher", "make_dispatcher"]


class Dispatcher(Protocol):
    """What the relay asks of a dispatcher, whichever the mode."""

    def start(self) -> None:
        """Start the pool of senders/workers (on the running loop)."""

    def submit(self, records: Iterable[Record]) -> None:
        """Take freshly consumed records (already tracked by the ledger), in consumption order."""

    def flush(self) -> None:
        """Send now whatever waits for more company (shutdown and revoke: nothing should linger)."""

    async def close(self) -> None:
        """Stop the pool of senders/workers."""


def make_dispatcher(
    client: TrackingClient,
    delivery: DeliveryConfig,
    tracking: TrackingConfig,
    backoff: Backoff,
    *,
    breakers: Mapping[str, CircuitBreaker],
    done: Done,
    owns: Owns,
    done_many: DoneMany | None = None,
    delivered: DeliveredEntries | None = None,
    releases: Callable[[], int] | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    metrics: RelayMetrics | None = None,
) -> Dispatcher:
    """The dispatcher of ``delivery.mode``; ``done_many``, ``delivered`` and ``releases`` only matter in
    batch mode.

    ``clock`` must be the clock the client's rate limiters run on (monotonic by default). ``releases``
    counts the partitions released so far (``OffsetLedger.releases``), see :class:`BatchDispatcher`.
    """
    if delivery.mode == "batch":
        return BatchDispatcher(
            client,
            delivery,
            tracking,
            backoff,
            breakers=breakers,
            done=done,
            owns=owns,
            done_many=done_many,
            delivered=delivered,
            releases=releases,
            clock=clock,
            sleep=sleep,
            metrics=metrics,
        )
    return SingleDispatcher(
        client,
        delivery,
        tracking,
        backoff,
        breakers=breakers,
        done=done,
        owns=owns,
        clock=clock,
        sleep=sleep,
        metrics=metrics,
    )
