"""The pipeline's own ceiling: consume and decode, nothing else (no translation, no HTTP, no commit).

    python -m tools.bench.ceiling --config relay.toml --warmup 30000 --count 300000 [--stage intake]

It uses the relay's own consumer settings (``consumer.intake.consumer_config``: the same ``consume()`` batch,
the same prefetch bounds) and the relay's own decoders (``consumer.decode.build_decoders``), so the relay's
batch-mode rate divided by this one is the share of the ceiling the rest of the pipeline leaves.

``--stage intake`` runs the relay's whole intake stage instead — decode, translate, encode into batch mode's
per-shop entries (``Intake._prepare_lots``; single mode: a :class:`~consumer.record.Record` per message,
``Intake._prepare``), with the relay's interpreter settings — which splits the relay's cost per event into
"intake" and "everything after the hand-off to the event loop".

It measures itself (wall clock and process CPU time, all threads) over the ``--count`` records after the
first ``--warmup``, prints a ``BENCH-RESULT`` line and exits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, Message

from consumer.handoff import Handoff
from consumer.intake import Intake, consumer_config
from consumer.interpreter import tune_interpreter
from tools.bench.child import Setup, parser, report


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser("consume + decode only: the relay pipeline's ceiling")
    arguments.add_argument("--warmup", type=int, required=True, help="records before the clock starts")
    arguments.add_argument("--count", type=int, required=True, help="records measured")
    arguments.add_argument("--stage", choices=("decode", "intake"), default="decode")
    args = arguments.parse_args(argv)
    setup = Setup(args.config)
    settings = setup.config.settings
    batch = settings.kafka.consume_batch
    deadline = time.monotonic() + args.deadline_s
    seen = 0
    start: tuple[float, float, int] | None = None
    consumer = Consumer(consumer_config(settings))
    try:
        consumer.subscribe([setup.topic])
        work = _decode_only(setup) if args.stage == "decode" else _intake_stage(setup, consumer)
        while seen < args.warmup + args.count:
            if time.monotonic() > deadline:
                raise SystemExit(f"ceiling: {seen:,} records within {args.deadline_s:.0f}s")
            messages = consumer.consume(num_messages=batch, timeout=0.1)
            if messages:
                work(messages)
                seen += len(messages)
            if start is None and seen >= args.warmup:
                start = (time.perf_counter(), time.process_time(), seen)
        assert start is not None
        report(
            events=seen - start[2],
            seconds=time.perf_counter() - start[0],
            cpu_s=time.process_time() - start[1],
        )
    finally:
        consumer.close()
    return 0


def _decode_only(setup: Setup) -> Callable[[list[Message]], None]:
    decode = setup.decoder.decode

    def work(messages: list[Message]) -> None:
        for message in messages:
            if message.error() is None:
                decode(message.value())

    return work


def _intake_stage(setup: Setup, consumer: Consumer) -> Callable[[list[Message]], None]:
    """The relay's intake, minus the hand-off: what it hands over is built and dropped (batch mode's
    per-shop entries, single mode's records), under the relay's interpreter settings."""
    loop = asyncio.new_event_loop()  # the intake wants one to hand records to; nothing runs on it here
    listener: Any = None
    intake = Intake(
        setup.config.settings,
        {setup.topic: setup.decoder},
        setup.translator,
        Handoff(loop),
        listener,
    )

    prepare = intake._prepare_lots if intake._batch_path else intake._prepare
    tune_interpreter()

    def work(messages: list[Message]) -> None:
        prepare(consumer, messages)

    return work


if __name__ == "__main__":
    raise SystemExit(main())
