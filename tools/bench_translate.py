"""Micro-benchmark: decode + translate per record, for each value format, on realistic generated traffic.

    python -m tools.bench_translate [--records 20000] [--repeat 5]

Encodes ``--records`` events of ``consumer_dev.sample.TrafficGenerator`` in each format (``confluent-avro``
against the client's in-memory ``mock://`` registry: after the first record of each type, its schemas come
from the decoder's cache), then times decoding all of them, translating all of them, and both together, and
prints the best of ``--repeat`` runs in microseconds per record. A measurement to read, not a test: figures
depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence

from confluent_kafka.schema_registry import SchemaRegistryClient
from pydantic import SecretStr

from consumer.config import ShopConfig
from consumer.decode import VALUE_FORMATS, Decoder, DomainEvent, ValueFormat, build_decoder, registry_client
from consumer.translate import Translator
from consumer_dev.sample import TrafficGenerator, build_encoder

SHOPS = ("shop1", "shop2", "shop3")


def _best_us_per_record(run: Callable[[], object], records: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - start)
    return best / records / 1000


def _decoders(fmt: ValueFormat, types: set[str], registry: SchemaRegistryClient) -> Callable[[str], Decoder]:
    """The decoder for a record of a type: ``avro`` has one per topic (= per type), the others one in all."""
    if fmt == "avro":
        per_type = {name: build_decoder("avro", record_name=name) for name in types}
        return per_type.__getitem__
    shared = build_decoder(fmt, registry=registry)
    return lambda _name: shared


def bench(fmt: ValueFormat, records: int, repeat: int) -> tuple[float, float, float]:
    registry = registry_client(f"mock://bench-{fmt}")
    traffic = list(TrafficGenerator(seed=42, shops=SHOPS, now_ms=1_700_000_000_000).events(records))
    encoder = build_encoder(fmt, registry=registry)
    decoder_of = _decoders(fmt, {name for name, _ in traffic}, registry)
    values = [(decoder_of(name), encoder.encode(name, fields)) for name, fields in traffic]
    translator = Translator({shop: ShopConfig(partner_id=shop, api_key=SecretStr("bench")) for shop in SHOPS})
    decoded: list[DomainEvent] = [decoder.decode(value) for decoder, value in values]  # warms the caches

    def decode_all() -> None:
        for decoder, value in values:
            decoder.decode(value)

    def translate_all() -> None:
        for event in decoded:
            translator.translate(event)

    def both() -> None:
        translate = translator.translate
        for decoder, value in values:
            translate(decoder.decode(value))

    try:
        return (
            _best_us_per_record(decode_all, records, repeat),
            _best_us_per_record(translate_all, records, repeat),
            _best_us_per_record(both, records, repeat),
        )
    finally:
        registry.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{args.records} generated records, best of {args.repeat}, µs per record")
    print(f"{'format':<16}{'decode':>8}{'translate':>11}{'both':>8}")
    for fmt in VALUE_FORMATS:
        decode, translate, both = bench(fmt, args.records, args.repeat)
        print(f"{fmt:<16}{decode:>8.2f}{translate:>11.2f}{both:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
