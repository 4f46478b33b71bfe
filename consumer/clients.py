"""Closing librdkafka clients deterministically.

Every client the project makes is closed (an ``AdminClient``, which has no ``close()``: its last reference
dropped) by the code that made it, while its broker is still there, never left to the garbage collector:
librdkafka's destroy, run by a collection at some later point after the broker had gone, waited for good on
a broker thread and hung the whole test suite (issue 12).
"""

from __future__ import annotations

from confluent_kafka import Producer


def close_producer(producer: Producer, timeout_s: float) -> int:
    """Deliver what is queued within ``timeout_s``, purge the rest, destroy the producer; return how many
    records were purged unconfirmed (their delivery reports say so: ``_PURGE_QUEUE``, ``_PURGE_INFLIGHT``).

    ``Producer.close()`` alone flushes without a deadline: a broker that went away would hold it for the
    records' whole ``message.timeout.ms``.
    """
    remaining: int = producer.flush(timeout_s)
    if remaining:
        producer.purge()
        producer.flush(0)  # serves the purged records' delivery reports
    producer.close()
    return remaining
