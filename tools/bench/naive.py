"""The naive consumer: poll one record, POST its calls one by one (blocking), commit it, next.

    python -m tools.bench.naive --config relay.toml --records 3000

What a first attempt at this service usually looks like, and correct as far as it goes (at-least-once: the
commit follows the answer). It uses the relay's decoder, translation and URLs, and ``requests`` with a
keep-alive session. Every record pays a full HTTP round trip and a synchronous commit round trip to the
broker, one after the other, which is what the figure is there to show.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
import requests
from confluent_kafka import Consumer

from tools.bench.child import Setup, parser, report

HEADERS = {"Content-Type": "application/json"}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser("a naive consumer: poll, one blocking POST per call, commit, per record")
    arguments.add_argument("--records", type=int, required=True, help="stop after this many records")
    args = arguments.parse_args(argv)
    setup = Setup(args.config)
    consumer = Consumer(
        {
            "bootstrap.servers": setup.bootstrap,
            "group.id": setup.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    session = requests.Session()
    urls = {key: str(url) for key, url in setup.urls.items()}
    deadline = time.monotonic() + args.deadline_s
    done = failed = 0
    started = time.perf_counter()
    try:
        consumer.subscribe([setup.topic])
        while done < args.records and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            for call in setup.translator.translate(setup.decoder.decode(message.value())):
                answer = session.post(
                    urls[call.shop, call.method], data=orjson.dumps(call.body), headers=HEADERS, timeout=10
                )
                failed += answer.status_code != 200
            consumer.commit(message=message, asynchronous=False)
            done += 1
        report(records=done, failed=failed, seconds=time.perf_counter() - started)
    finally:
        session.close()
        consumer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
