"""A bare prototype of the batch flow: what the job costs in Python with none of the relay's guarantees.

    python -m tools.bench.prototype --config relay.toml --records 400000

One thread and one event loop: ``consume()`` a batch (the relay's consumer settings), decode and translate
each record (the relay's decoder and translator), put its calls into one ``visitorEvents`` body per shop,
POST the bodies (up to ``--in-flight`` batches at once, over one aiohttp pool) and store the batch's offsets
once its answers are in, for the background commit. It keeps no per-visitor order, retries nothing,
dead-letters nothing, knows no rate limit, and stores offsets as batches finish, in any order, so a crash
could skip records: a reference for what the relay's machinery costs, not something to deploy.

It stops after ``--records`` records (or the deadline) and prints a ``BENCH-RESULT`` line; the harness
measures it by the emulator's counters, like every other contender.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import aiohttp
import orjson
from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from yarl import URL

from consumer.contract import BATCH_METHOD
from consumer.intake import consumer_config
from tools.bench.child import Setup, parser, report

HEADERS = {"Content-Type": "application/json"}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser("a bare prototype of the batch flow")
    arguments.add_argument("--records", type=int, required=True, help="stop after this many records")
    arguments.add_argument(
        "--in-flight", type=int, default=16, help="batches in flight (the relay's default)"
    )
    args = arguments.parse_args(argv)
    setup = Setup(args.config)
    started = time.perf_counter()
    records, failed = asyncio.run(
        run(setup, args.records, args.in_flight, time.monotonic() + args.deadline_s)
    )
    report(records=records, failed=failed, seconds=time.perf_counter() - started)
    return 0


async def run(setup: Setup, limit: int, in_flight: int, deadline: float) -> tuple[int, int]:
    kafka = setup.config.settings.kafka
    # The bare sketch stores offsets and lets librdkafka commit them (the relay commits them itself).
    auto_commit = {"enable.auto.commit": True, "auto.commit.interval.ms": kafka.commit_interval_ms}
    urls = {shop: setup.urls[shop, BATCH_METHOD] for shop, _ in setup.urls}
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[int]] = set()
    records = failed = 0
    batch = setup.config.settings.kafka.consume_batch
    consumer = Consumer({**consumer_config(setup.config.settings), **auto_commit})
    try:
        consumer.subscribe([setup.topic])
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=in_flight * len(urls)), headers=HEADERS
        ) as session:
            while records < limit and time.monotonic() < deadline:
                messages = consumer.consume(num_messages=batch, timeout=0.01)
                if not messages:
                    await asyncio.sleep(0)  # let the answers in
                    continue
                bodies = _bodies(setup, messages)
                await slots.acquire()
                task = asyncio.create_task(
                    _send(session, urls, bodies, consumer, _positions(messages), slots)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                records += len(messages)
            for done in await asyncio.gather(*tasks):
                failed += done
    finally:
        consumer.close()
    return records, failed


def _bodies(setup: Setup, messages: list[Message]) -> dict[str, bytes]:
    by_shop: dict[str, list[bytes]] = {}
    decode, translate = setup.decoder.decode, setup.translator.translate
    for message in messages:
        if message.error() is not None:
            continue
        for call in translate(decode(message.value())):
            envelope = b'{"' + call.method.encode() + b'":' + orjson.dumps(call.body) + b"}"
            by_shop.setdefault(call.shop, []).append(envelope)
    return {shop: b"[" + b",".join(envelopes) + b"]" for shop, envelopes in by_shop.items()}


def _positions(messages: list[Message]) -> list[KafkaTopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        if message.error() is None:
            last[(message.topic(), message.partition())] = message.offset()  # type: ignore[index,assignment]
    return [KafkaTopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]


async def _send(
    session: aiohttp.ClientSession,
    urls: dict[str, URL],
    bodies: dict[str, bytes],
    consumer: Consumer,
    positions: list[KafkaTopicPartition],
    slots: asyncio.Semaphore,
) -> int:
    """POST a batch's bodies; store its offsets; return how many answers were not 200."""
    try:
        answers = await asyncio.gather(*(_post(session, urls[shop], body) for shop, body in bodies.items()))
        with contextlib.suppress(KafkaException):  # a partition revoked meanwhile: nothing to store
            consumer.store_offsets(offsets=positions)
        return sum(status != 200 for status in answers)
    finally:
        slots.release()


async def _post(session: aiohttp.ClientSession, url: URL, body: bytes) -> int:
    async with session.post(url, data=body) as response:
        await response.read()
        return response.status


if __name__ == "__main__":
    raise SystemExit(main())
