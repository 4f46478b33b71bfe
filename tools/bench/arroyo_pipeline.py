"""The same job built the way sentry-arroyo suggests: strategies, blocking HTTP on threads, commit after.

    python -m tools.bench.arroyo_pipeline --config relay.toml --records 20000 --shape record
    python -m tools.bench.arroyo_pipeline --config relay.toml --records 300000 --shape batch

``--shape record`` (single mode's rival): ``RunTaskInThreads`` runs, per record, decode + translate + one
blocking ``requests`` POST per call, on ``--concurrency`` threads (the relay's 64 by default), then
``CommitOffsets``. ``--shape batch`` (batch mode's rival): ``BatchStep`` gathers up to 500 records or 20 ms,
then ``RunTaskInThreads`` decodes, translates and POSTs each shop's calls as one ``visitorEvents`` request,
then ``CommitOffsets``. Both use the relay's decoder, translation and URLs, and arroyo's own Kafka consumer
and commit policy (once a second). Neither keeps per-visitor order or rate limits: arroyo gives them no help
with that, and leaving them out only favours arroyo.

It stops after ``--records`` records (or the deadline), on SIGTERM, and prints a ``BENCH-RESULT`` line.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import requests
from arroyo.backends.kafka import KafkaConsumer, KafkaPayload
from arroyo.backends.kafka.configuration import build_kafka_consumer_configuration
from arroyo.commit import ONCE_PER_SECOND
from arroyo.processing import StreamProcessor
from arroyo.processing.strategies import (
    BatchStep,
    CommitOffsets,
    ProcessingStrategy,
    ProcessingStrategyFactory,
    RunTaskInThreads,
)
from arroyo.processing.strategies.batching import ValuesBatch
from arroyo.types import Commit, Message, Partition, Topic

from consumer.contract import BATCH_METHOD
from tools.bench.child import Setup, parser, report

HEADERS = {"Content-Type": "application/json"}
BATCH_RECORDS = 500
BATCH_SECONDS = 0.02


class Job:
    """The work of one record or one batch, on a pool thread: each thread has its own HTTP session."""

    def __init__(self, setup: Setup) -> None:
        self._setup = setup
        self._urls = {key: str(url) for key, url in setup.urls.items()}
        self._local = threading.local()
        self._lock = threading.Lock()
        self.records = 0
        self.failed = 0

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _post(self, shop: str, method: str, body: bytes) -> bool:
        answer = self._session().post(self._urls[shop, method], data=body, headers=HEADERS, timeout=10)
        return answer.status_code == 200

    def one_record(self, message: Message[KafkaPayload]) -> None:
        setup = self._setup
        value = message.payload.value
        failed = 0
        for call in setup.translator.translate(setup.decoder.decode(value)):
            failed += not self._post(call.shop, call.method, orjson.dumps(call.body))
        self._count(1, failed)

    def one_batch(self, message: Message[ValuesBatch[KafkaPayload]]) -> None:
        setup = self._setup
        by_shop: dict[str, list[bytes]] = {}
        for item in message.payload:
            for call in setup.translator.translate(setup.decoder.decode(item.payload.value)):
                envelope = b'{"' + call.method.encode() + b'":' + orjson.dumps(call.body) + b"}"
                by_shop.setdefault(call.shop, []).append(envelope)
        failed = 0
        for shop, envelopes in by_shop.items():
            failed += not self._post(shop, BATCH_METHOD, b"[" + b",".join(envelopes) + b"]")
        self._count(len(message.payload), failed)

    def _count(self, records: int, failed: int) -> None:
        with self._lock:
            self.records += records
            self.failed += failed


class Factory(ProcessingStrategyFactory[KafkaPayload]):
    def __init__(self, job: Job, shape: str, concurrency: int) -> None:
        self._job = job
        self._shape = shape
        self._concurrency = concurrency

    def create_with_partitions(
        self, commit: Commit, partitions: Mapping[Partition, int]
    ) -> ProcessingStrategy[KafkaPayload]:
        commit_step: Any = CommitOffsets(commit)
        if self._shape == "record":
            return RunTaskInThreads(
                self._job.one_record, self._concurrency, self._concurrency * 16, commit_step
            )
        send: Any = RunTaskInThreads(
            self._job.one_batch, self._concurrency, self._concurrency * 2, commit_step
        )
        return BatchStep(BATCH_RECORDS, BATCH_SECONDS, send)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser("the relay's job as an arroyo pipeline")
    arguments.add_argument("--records", type=int, required=True, help="stop after this many records")
    arguments.add_argument("--shape", choices=("record", "batch"), default="record")
    arguments.add_argument("--concurrency", type=int, help="threads (default: 64 per record, 16 per batch)")
    args = arguments.parse_args(argv)
    setup = Setup(args.config)
    concurrency = args.concurrency or (64 if args.shape == "record" else 16)
    configuration = build_kafka_consumer_configuration(
        {},
        group_id=setup.group,
        auto_offset_reset="earliest",
        bootstrap_servers=[setup.bootstrap],
        strict_offset_reset=False,
    )
    job = Job(setup)
    processor = StreamProcessor(
        KafkaConsumer(configuration),
        Topic(setup.topic),
        Factory(job, args.shape, concurrency),
        commit_policy=ONCE_PER_SECOND,
    )
    signal.signal(signal.SIGTERM, lambda _signum, _frame: processor.signal_shutdown())
    deadline = time.monotonic() + args.deadline_s
    started = time.perf_counter()

    def watch() -> None:
        while job.records < args.records and time.monotonic() < deadline:
            time.sleep(0.05)  # the poll interval of a bounded wait
        processor.signal_shutdown()

    threading.Thread(target=watch, name="bench-watch", daemon=True).start()
    processor.run()
    report(records=job.records, failed=job.failed, seconds=time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
