"""Failure handling end to end: poison records, outages, 429, partial orders, batch 400, a revoked key.
Guarantees 2, 3 and 4 of the design brief (the broker's, registry's and dead-letter topic's: test_faults)."""

from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal

import orjson
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro import parse_schema, schemaless_writer

from consumer_dev.emulator import EmulatorThread, Faults
from consumer_dev.sample import build_encoder
from tests.kafka import committed_offsets, end_offsets, produce, unique_name, wait_for
from tests.relay import (
    SHOPS,
    RelayProcess,
    SchemaRegistry,
    Stack,
    dead_letters,
    event,
    expected_calls,
    generate,
    received,
)


def foreign_record(client: SchemaRegistryClient, name: str) -> bytes:
    """A record of another team's type (``com.other.<name>``, registered), in the Confluent wire format."""
    schema = {
        "type": "record",
        "name": name,
        "namespace": "com.other",
        "fields": [{"name": "x", "type": "int"}],
    }
    schema_id = client.register_schema(f"com.other.{name}", Schema(orjson.dumps(schema).decode(), "AVRO"))
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(schema), {"x": 7})
    return b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()


def test_every_kind_of_poison_record_is_dead_lettered_once_and_good_ones_still_flow(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    client = registry.client()
    encoder = build_encoder("confluent-avro", registry=client)
    valid = encoder.encode("ProductViewed", event("ProductViewed", productId=1, groupId=None))
    mystery = foreign_record(client, "Mystery")
    order = event(
        "OrderPlaced",
        orderId="o-1",
        lines=[
            {"productId": 10, "quantity": 1, "unitPrice": Decimal("9.99")},
            {"productId": 11, "quantity": 0, "unitPrice": Decimal("5.00")},  # breaks the contract: quantity 0
            {"productId": 12, "quantity": 2, "unitPrice": Decimal("1.50")},
        ],
    )
    poison: dict[str, tuple[bytes | None, str, str]] = {
        # name: (value, stage, error class)
        "empty": (b"", "decode", "DecodeError"),
        "tombstone": (None, "decode", "DecodeError"),
        "wrong magic byte": (b"\x07" + valid[1:], "decode", "DecodeError"),
        "truncated": (valid[: len(valid) // 2], "decode", "DecodeError"),
        "trailing garbage": (valid + b"\x01\x02\x03", "decode", "DecodeError"),
        "unknown schema id": (b"\x00" + (987654).to_bytes(4, "big") + valid[5:], "decode", "SchemaNotFound"),
        "unknown record type": (
            mystery,
            "decode",
            "UnknownEventType",
        ),
        "bad session id": (
            encoder.encode(
                "ProductViewed", event("ProductViewed", productId=1, groupId=None, sessionId="not-letters!")
            ),
            "translate",
            "TranslateError",
        ),
        "unknown shop": (
            encoder.encode(
                "ProductViewed", event("ProductViewed", productId=1, groupId=None, shopId="nowhere")
            ),
            "translate",
            "TranslateError",
        ),
        "order with a bad line": (encoder.encode("OrderPlaced", order), "translate", "TranslateError"),
    }
    good = generate(600, registry=client, seed=61)
    records: list[tuple[bytes | None, bytes | None]] = []
    names = list(poison)
    for i, (key, value) in enumerate(good.records):
        records.append((key, value))
        if i % 60 == 30:  # one poison record after every 60 good ones
            records.append((names[i // 60].encode(), poison[names[i // 60]][0]))
    poison_positions = {
        key.decode(): offset
        for offset, (key, _) in enumerate(records)
        if key is not None and key.decode() in poison
    }
    assert set(poison_positions) == set(poison)
    topic = stack.topic("poison")
    dlq = f"{topic}.dlq"
    produce(kafka_bootstrap, topic, records)
    group = unique_name("group")
    config = stack.config([topic], group=group)
    relay = relays(config)

    letters = dead_letters(kafka_bootstrap, dlq, len(poison))
    expected = good.expected + expected_calls([("OrderPlaced", order)])
    wait_for(lambda: not expected - received(emulator), deadline_s=60, what="every good call")
    wait_for(
        lambda: committed_offsets(kafka_bootstrap, group, topic, 1) == {0: len(records)},
        deadline_s=30,
        what="the partition committed to its end",
    )
    assert relay.terminate() == 0

    assert received(emulator) == expected, "good records delivered once; only the order's bad line withheld"
    by_key = {letter["key"].decode(): letter for letter in letters}
    assert set(by_key) == set(poison)
    for name, (value, stage, error_class) in poison.items():
        headers = by_key[name]["headers"]
        assert by_key[name]["value"] == value, f"{name}: the original value is kept"
        assert headers["rr.dlq.source.topic"] == topic
        assert headers["rr.dlq.source.partition"] == "0"
        assert headers["rr.dlq.source.offset"] == str(poison_positions[name])
        assert headers["rr.dlq.stage"] == stage, name
        assert headers["rr.dlq.error.class"] == error_class, name
        assert headers["rr.dlq.error.message"], name
        assert headers["rr.dlq.service.version"]
    failed = orjson.loads(by_key["order with a bad line"]["headers"]["rr.dlq.calls.failed"])
    assert [(f["index"], f["method"]) for f in failed] == [(1, "order")]
    assert "quantity" in failed[0]["reason"]
    assert orjson.loads(by_key["order with a bad line"]["headers"]["rr.dlq.calls.delivered"]) == [0, 2]
    assert "nowhere" in by_key["unknown shop"]["headers"]["rr.dlq.error.message"]
    for _, key in SHOPS.values():
        assert all(key not in str(letter) for letter in letters), "no apiKey in any dead-letter record"


def test_an_outage_dead_letters_nothing_loses_nothing_and_costs_few_requests(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(3000, registry=registry.client(), seed=71)
    topic = stack.topic("outage", partitions=3)
    dlq = f"{topic}.dlq"
    group = unique_name("group")
    concurrency, threshold, probe_base = 4, 5, 0.5
    config = stack.config(
        [topic],
        group=group,
        sections={
            "delivery": {"max_concurrent_batches": concurrency},
            "retry": {
                "base_s": 0.05,
                "cap_s": 1.0,
                "breaker_threshold": threshold,
                "breaker_probe_base_s": probe_base,
                "breaker_probe_cap_s": 2.0,
            },
        },
    )
    emulator.set_faults(Faults(outage="503"))
    produce(kafka_bootstrap, topic, traffic.records)
    relay = relays(config)

    def answered_503() -> int:
        return int(emulator.counters["requests"].get("visitorEvents", {}).get("503", 0))

    # Phase 1: every call answered 503, until the breakers opened and have probed a few times.
    wait_for(
        lambda: len(relay.log_events("breaker.opened")) == 2, deadline_s=60, what="both breakers to open"
    )
    opened_at = answered_503()
    wait_for(lambda: answered_503() >= opened_at + 4, deadline_s=60, what="a few probes")
    # Phase 2: connections refused. Its length is the test's stimulus, not a wait for a result.
    emulator.set_faults(Faults(outage="refuse"))
    phase_1 = [r["at"] for r in emulator.request_log() if r["status"] == 503]
    time.sleep(3)  # an outage of three seconds, on purpose (noqa: sleep-ok)
    emulator.set_faults(Faults())

    got = _wait_all(emulator, traffic.expected, relay)
    assert relay.terminate() == 0
    assert got == traffic.expected, "nothing lost, nothing twice: an outage stores nothing"
    assert committed_offsets(kafka_bootstrap, group, topic, 3) == end_offsets(kafka_bootstrap, topic, 3)
    assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 0}, (
        "no transient failure reaches the dead-letter topic"
    )
    assert len(relay.log_events("breaker.closed")) == 2, "the first success closed each shop's breaker"
    # The bound per shop: the failures that open the breaker, the calls already in flight then, and one probe
    # per probe interval (which only grows) over the outage's length.
    seconds = phase_1[-1] - phase_1[0]
    bound = 2 * (threshold + concurrency + math.ceil(seconds / probe_base) + 1)
    print(
        f"503 phase: {len(phase_1)} requests in {seconds:.1f}s (bound {bound}); breaker probes after open: "
        f"{len(phase_1) - opened_at}"
    )
    assert len(phase_1) <= bound


def _wait_all(
    emulator: EmulatorThread, expected: Counter[tuple[str, str, bytes]], relay: RelayProcess
) -> Counter[tuple[str, str, bytes]]:
    def done() -> Counter[tuple[str, str, bytes]] | None:
        if not relay.running():
            raise AssertionError(relay.output()[-3000:])
        got = received(emulator)
        return got if not expected - got else None

    result = wait_for(done, deadline_s=120, what="every call", interval_s=0.2)
    assert result is not None
    return result


def test_after_a_429_with_retry_after_no_request_goes_to_that_shop_before_the_time_it_named(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(300, registry=registry.client(), seed=81, shops=("demo",))
    topic = stack.topic("throttled")
    config = stack.config(
        [topic],
        sections={"delivery": {"max_concurrent_batches": 1, "batch_max_events": 50}},
    )
    retry_after = 2
    emulator.set_faults(Faults(error_rate=1.0, error_status=429, retry_after=retry_after))
    produce(kafka_bootstrap, topic, traffic.records)
    relay = relays(config)
    wait_for(lambda: any(r["status"] == 429 for r in emulator.request_log()), deadline_s=60, what="a 429")
    emulator.set_faults(Faults())
    got = _wait_all(emulator, traffic.expected, relay)
    assert relay.terminate() == 0
    assert got == traffic.expected

    log = emulator.request_log()
    throttled = [r["at"] for r in log if r["status"] == 429]
    for answer in throttled:
        too_soon = [r for r in log if answer < r["at"] < answer + retry_after - 0.01]
        assert not too_soon, (
            f"a request came {too_soon[0]['at'] - answer:.3f}s after a 429 that said {retry_after}s"
        )


def test_a_refused_batch_is_resent_singly_so_only_the_bad_event_is_dead_lettered(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    client = registry.client()
    encoder = build_encoder("confluent-avro", registry=client)
    bad_product = 999_999_001
    events = [
        ("ProductViewed", event("ProductViewed", productId=p, groupId=None, sessionId=f"v{p}"))
        for p in (1, 2, bad_product, 3, 4)
    ]
    topic = stack.topic("batch400")
    dlq = f"{topic}.dlq"
    produce(kafka_bootstrap, topic, [(f["sessionId"].encode(), encoder.encode(n, f)) for n, f in events])
    # The server refuses a product the relay cannot know is bad (say, one missing from the feed).
    emulator.set_faults(Faults(reject_product_ids=(bad_product,)))
    config = stack.config(
        [topic],
        sections={"delivery": {"batch_linger_ms": 200}},  # one batch holds all five
    )
    relay = relays(config)
    letters = dead_letters(kafka_bootstrap, dlq, 1)
    good = expected_calls([e for e in events if e[1]["productId"] != bad_product])
    wait_for(lambda: not good - received(emulator), deadline_s=30, what="the four good events")
    assert relay.terminate() == 0

    assert received(emulator) == good, "every good event delivered exactly once"
    assert emulator.counters["requests"]["visitorEvents"] == {"400": 1}
    headers = letters[0]["headers"]
    assert headers["rr.dlq.stage"] == "deliver"
    assert headers["rr.dlq.http.status"] == "400"
    assert headers["rr.dlq.method"] == "view"


def test_a_revoked_key_halts_the_service_without_committing_and_a_fixed_key_delivers_everything(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(2000, registry=registry.client(), seed=91, shops=("demo",))
    topic = stack.topic("revoked", partitions=2)
    dlq = f"{topic}.dlq"
    produce(kafka_bootstrap, topic, traffic.records)
    group = unique_name("group")
    config = stack.config([topic], group=group, shops=("demo",))

    revoked = relays(config, name="revoked", RR_API_KEY_DEMO="a-key-retail-rocket-revoked")
    status = revoked.wait_exit(60)

    assert status == 3, revoked.output()[-3000:]
    halt = revoked.log_events("relay.dead_letter_guard_tripped")
    assert halt, "the guard logged why it halted"
    assert "demo" in halt[0]["reason"]
    assert "401" in halt[0]["reason"]
    assert "a-key-retail-rocket-revoked" not in revoked.output()
    assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 0}, "nothing was dead-lettered for a shop-wide fault"
    committed = committed_offsets(kafka_bootstrap, group, topic, 2)
    assert all(offset in (-1001, 0) for offset in committed.values()), (
        f"committed past a failure: {committed}"
    )

    fixed = relays(config, name="fixed")
    got = _wait_all(emulator, traffic.expected, fixed)
    assert fixed.terminate() == 0
    assert got == traffic.expected
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == end_offsets(kafka_bootstrap, topic, 2)


def test_a_transient_failure_older_than_the_maximum_age_is_dead_lettered(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    client = registry.client()
    encoder = build_encoder("confluent-avro", registry=client)
    view = event("ProductViewed", productId=5, groupId=None)
    topic = stack.topic("maxage")
    dlq = f"{topic}.dlq"
    produce(kafka_bootstrap, topic, [(b"visitor42", encoder.encode("ProductViewed", view))])
    emulator.set_faults(Faults(outage="503"))
    config = stack.config(
        [topic],
        sections={"retry": {"base_s": 0.05, "cap_s": 0.2, "max_age_s": 1.0, "breaker_threshold": 1000}},
    )
    relay = relays(config)
    letters = dead_letters(kafka_bootstrap, dlq, 1)
    assert relay.terminate() == 0
    headers = letters[0]["headers"]
    assert headers["rr.dlq.http.status"] == "503"
    assert "max_age" in headers["rr.dlq.error.message"]
    assert int(headers["rr.dlq.attempts"]) >= 2


def test_an_unknown_event_type_is_skipped_and_committed_when_so_configured(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    client = registry.client()
    encoder = build_encoder("confluent-avro", registry=client)
    scrolled = foreign_record(client, "PageScrolled")
    view = event("ProductViewed", productId=8, groupId=None)
    topic = stack.topic("skip")
    dlq = f"{topic}.dlq"
    group = unique_name("group")
    produce(
        kafka_bootstrap,
        topic,
        [
            (b"scroller", scrolled),
            (b"visitor42", encoder.encode("ProductViewed", view)),
        ],
    )
    config = stack.config([topic], group=group, sections={"delivery": {"unknown_event": "skip"}})
    relay = relays(config)
    wait_for(
        lambda: committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 2},
        deadline_s=60,
        what="both records committed",
    )
    assert relay.terminate() == 0
    assert received(emulator) == expected_calls([("ProductViewed", view)])
    assert end_offsets(kafka_bootstrap, dlq, 1) == {0: 0}, "skipped, not dead-lettered"
