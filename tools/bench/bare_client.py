"""The reference of single mode: a bare aiohttp client sending the relay's own requests, nothing else.

    python -m tools.bench.bare_client --config relay.toml --warmup 5000 --count 40000 [--concurrency 64]

First, untimed, it reads records of the topic and turns them into the exact requests the relay would send
in single mode (the relay's decoder, translation and JSON encoding; the relay's URLs). Then it sends them
over one keep-alive pool of ``--concurrency`` connections from as many workers: no Kafka, no ordering, no
rate limiter, no retries, no bookkeeping. It times the ``--count`` answers after the first ``--warmup``
itself (it may finish in a fraction of a second in the smoke version, quicker than anyone could poll it)
and prints a ``BENCH-RESULT`` line; single mode's share of its rate is what the relay's machinery costs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
import orjson
from confluent_kafka import Consumer
from yarl import URL

from consumer.intake import consumer_config
from tools.bench.child import Setup, parser, report

Request = tuple[URL, bytes]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser("a bare aiohttp client sending the relay's single-mode requests")
    arguments.add_argument("--warmup", type=int, required=True, help="requests before the clock starts")
    arguments.add_argument("--count", type=int, required=True, help="requests measured")
    arguments.add_argument("--concurrency", type=int, default=64, help="connections and workers")
    args = arguments.parse_args(argv)
    setup = Setup(args.config)
    deadline = time.monotonic() + args.deadline_s
    # Every record implies at least one call, so this many records give enough requests.
    requests = read_requests(setup, args.warmup + args.count, deadline)
    window = asyncio.run(send_all(requests, args.concurrency, args.warmup, args.count, deadline))
    report(**window)
    return 0


def read_requests(setup: Setup, records: int, deadline: float) -> list[Request]:
    """The single-mode requests of the first ``records`` records, as the relay would encode them."""
    requests: list[Request] = []
    seen = 0
    consumer = Consumer(consumer_config(setup.config.settings))
    try:
        consumer.subscribe([setup.topic])
        while seen < records:
            if time.monotonic() > deadline:
                raise SystemExit(f"bare client: read {seen:,} of {records:,} records before the deadline")
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is not None or seen >= records:
                    continue
                seen += 1
                for call in setup.translator.translate(setup.decoder.decode(message.value())):
                    requests.append((setup.urls[call.shop, call.method], orjson.dumps(call.body)))
    finally:
        consumer.close()
    return requests


async def send_all(
    requests: list[Request], concurrency: int, warmup: int, count: int, deadline: float
) -> dict[str, float]:
    """Send the requests, ``concurrency`` at a time; time answers ``warmup`` to ``warmup + count``.

    It times itself, like the emulator's counters time the relay: from the answer that ends the warm-up to
    the one that ends the window, with the process's CPU time over the same span.
    """
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    pending = iter(requests[: warmup + count])
    answered = 0
    failed = 0
    marks: list[tuple[float, float]] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal answered, failed
        for url, body in pending:
            if time.monotonic() > deadline:
                return
            async with session.post(url, data=body) as response:
                await response.read()
                failed += response.status != 200
            answered += 1
            if answered in (warmup, warmup + count):
                marks.append((time.perf_counter(), time.process_time()))

    async with aiohttp.ClientSession(
        connector=connector,
        headers={"Content-Type": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    if len(marks) != 2:
        raise SystemExit(f"bare client: {answered:,} of {warmup + count:,} requests answered in time")
    (start, start_cpu), (end, end_cpu) = marks
    return {"events": count, "seconds": end - start, "cpu_s": end_cpu - start_cpu, "failed": failed}


if __name__ == "__main__":
    raise SystemExit(main())
