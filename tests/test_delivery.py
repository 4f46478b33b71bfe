"""The delivery engine end to end: a real broker, the relay as its own process, the emulator as Retail Rocket.

Each test states a guarantee of the design brief: every event delivered as the contract says, order per
visitor, nothing lost on kill -9, nothing lost across a rebalance, bounded memory, replay from offsets.
"""

from __future__ import annotations

import random
import threading
import zlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.events import short_name
from consumer_dev.emulator import EmulatorShop, EmulatorThread, Faults
from tests.kafka import Topics, committed_offsets, end_offsets, produce, unique_name, wait_for
from tests.relay import (
    SHOPS,
    RelayProcess,
    SchemaRegistry,
    Stack,
    calls_per_record,
    canonical,
    expected_calls,
    generate,
    produce_traffic,
    received,
    wait_delivered,
    write_config,
)


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_every_event_type_arrives_exactly_as_the_contract_says(
    mode: str,
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(1500, registry=registry.client())
    kinds = {short_name(name) for name, _ in traffic.events}
    assert kinds == {"ProductViewed", "CategoryViewed", "SearchPerformed", "ItemAddedToBasket", "OrderPlaced"}
    methods = {method for _, method, _ in traffic.expected}
    assert methods == {"view", "groupView", "categoryView", "search", "addToBasket", "order"}
    topic = stack.topic(f"events-{mode}", partitions=3)
    produce_traffic(kafka_bootstrap, topic, traffic)
    group = unique_name("group")
    config = stack.config([topic], group=group, sections={"delivery": {"mode": mode}})
    relay = relays(config)

    got = wait_delivered(emulator, traffic.expected, relays=[relay])

    assert relay.terminate() == 0
    assert got == traffic.expected, "no call missing, none extra, none twice"
    assert committed_offsets(kafka_bootstrap, group, topic, 3) == end_offsets(kafka_bootstrap, topic, 3)
    if mode == "batch":
        assert set(emulator.counters["requests"]) == {"visitorEvents"}
    else:
        assert "visitorEvents" not in emulator.counters["requests"]


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_each_visitors_events_arrive_in_the_order_they_were_produced(
    mode: str,
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    # Few visitors, many events each, spread over 6 partitions; random latency reorders anything unordered.
    traffic = generate(3000, registry=registry.client(), visitors=60, seed=11)
    emulator.set_faults(Faults(latency_ms=1, latency_jitter_ms=15))
    topic = stack.topic(f"order-{mode}", partitions=6)
    produce_traffic(kafka_bootstrap, topic, traffic)
    config = stack.config(
        [topic],
        sections={"delivery": {"mode": mode, "batch_max_events": 25, "batch_linger_ms": 2}},
    )
    relay = relays(config)

    wait_delivered(emulator, traffic.expected, relays=[relay])
    assert relay.terminate() == 0

    arrived: dict[str, list[tuple[str, bytes]]] = {}
    for event in emulator.events():
        body = event["body"]
        arrived.setdefault(body["sessionExternalId"], []).append((event["method"], canonical(body)))
    busiest = max(len(calls) for calls in traffic.expected_by_session.values())
    assert busiest >= 50, "the test needs visitors with long histories"
    for session, calls in traffic.expected_by_session.items():
        assert arrived[session] == calls, f"visitor {session} saw its events out of order"


def test_nothing_is_lost_when_the_relay_is_killed_again_and_again(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(30_000, registry=registry.client(), visitors=5000, seed=23)
    emulator.set_faults(Faults(latency_ms=5, latency_jitter_ms=10))  # slow enough to kill mid-flight
    partitions = 6
    topic = stack.topic("crash", partitions=partitions)
    # Each record's partition is chosen here, so each one's offset is known: (partition, offset) per record.
    placed = [(key, value, zlib.crc32(key) % partitions) for key, value in traffic.records]
    produce(kafka_bootstrap, topic, placed)
    next_offset = [0] * partitions
    coordinates = []
    for _, _, partition in placed:
        coordinates.append((partition, next_offset[partition]))
        next_offset[partition] += 1
    record_calls = calls_per_record(traffic.events)
    group = unique_name("group")
    # A small in-flight cap: what a kill can leave delivered but uncommitted stays small.
    in_flight_cap, consume_batch = 500, 100
    config = stack.config(
        [topic],
        group=group,
        sections={
            "delivery": {"max_in_flight_records": in_flight_cap, "batch_max_events": 200},
            "kafka": {"consume_batch": consume_batch},
        },
    )
    total = sum(traffic.expected.values())
    rng = random.Random(5)
    # Per kill: the calls that were delivered but whose records were not committed. The next member starts
    # at the committed offsets and sends each of them again; nothing else may be sent twice.
    resendable: list[int] = []
    relay = relays(config, name="crashing")
    for share in sorted(rng.uniform(0.1, 0.8) for _ in range(4)):
        # Kill at a random point of the run: once this share of all calls has arrived.
        wait_for(
            lambda s=share: emulator.counters["events_accepted"] >= s * total,  # type: ignore[misc]
            deadline_s=120,
            what=f"{share:.0%} of the calls",
        )
        relay.kill()
        committed = committed_offsets(kafka_bootstrap, group, topic, partitions)
        relay = relays(config, name="crashing")
        assigned = wait_for(lambda r=relay: r.log_events("intake.assigned"), deadline_s=60, what="assigned")
        # The killed member's last calls landed within its latency; the next one sends nothing before it is
        # assigned: what arrived before then is what the killed one delivered.
        until = datetime.fromisoformat(assigned[0]["timestamp"]).timestamp()
        delivered = {
            (e["partnerId"], e["method"], canonical(e["body"]))
            for e in emulator.events()
            if e["received_at"] < until
        }
        resendable.append(
            sum(
                1
                for (partition, offset), calls in zip(coordinates, record_calls, strict=True)
                if offset >= max(committed[partition], 0)
                for call in calls
                if call in delivered
            )
        )

    survivor = relay
    wait_delivered(emulator, traffic.expected, relays=[survivor])
    # Every call having arrived is not the survivor being done: a killed member may have delivered records
    # past one that held its partition's commit back, and the survivor sends those again from the commit.
    # It is done when its commits reach the end of every partition (and may not stop short of it).
    ends = end_offsets(kafka_bootstrap, topic, partitions)

    def at_the_end() -> bool:
        assert survivor.running(), f"the survivor exited:\n{survivor.output()[-3000:]}"
        return committed_offsets(kafka_bootstrap, group, topic, partitions) == ends

    wait_for(at_the_end, deadline_s=120, what="the survivor's commits at the end of every partition")
    got = received(emulator)
    assert survivor.terminate() == 0

    assert not traffic.expected - got, "every event's calls reached the emulator"
    duplicates = sum((got - traffic.expected).values())
    print(
        f"kills={len(resendable)} calls={total} duplicates={duplicates} delivered-not-committed {resendable}"
    )
    assert duplicates <= sum(resendable), "only what was delivered and not yet committed at a kill is re-sent"
    assert committed_offsets(kafka_bootstrap, group, topic, 6) == end_offsets(kafka_bootstrap, topic, 6)


def test_nothing_is_lost_when_a_second_member_joins_and_the_first_leaves(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(24_000, registry=registry.client(), visitors=4000, seed=31)
    emulator.set_faults(Faults(latency_ms=2, latency_jitter_ms=5))
    topic = stack.topic("rebalance", partitions=6)
    group = unique_name("group")
    config = stack.config([topic], group=group)
    # Events keep flowing while the group changes hands: produce in the background, a slice at a time.
    slices = [traffic.records[i : i + 2000] for i in range(0, len(traffic.records), 2000)]
    producing = threading.Thread(target=lambda: [_produce_slice(kafka_bootstrap, topic, s) for s in slices])
    first = relays(config, name="first")
    producing.start()
    wait_for(lambda: emulator.counters["events_accepted"] > 2000, deadline_s=60, what="first deliveries")

    second = relays(config, name="second")
    wait_for(lambda: second.log_events("intake.assigned"), deadline_s=60, what="the second member's share")
    assert first.terminate() == 0, first.output()[-2000:]
    producing.join(120)

    got = wait_delivered(emulator, traffic.expected, relays=[second])
    assert second.terminate() == 0
    duplicates = sum((got - traffic.expected).values())
    print(f"duplicates across the hand-over: {duplicates}")
    assert not traffic.expected - got, "zero lost across the hand-over"
    assert duplicates == 0, "a member joining and a member leaving cleanly send nothing twice"
    assert committed_offsets(kafka_bootstrap, group, topic, 6) == end_offsets(kafka_bootstrap, topic, 6)


def _produce_slice(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from tests.kafka import produce

    produce(bootstrap, topic, records)


def test_memory_stays_flat_while_a_large_backlog_drains_into_a_slow_api(
    kafka_bootstrap: str,
    topics: Topics,
    registry: SchemaRegistry,
    relays: Callable[..., RelayProcess],
    tmp_path: Path,
    stack: Stack,
) -> None:
    backlog = 200_000
    traffic = generate(backlog, registry=registry.client(), visitors=100_000, seed=41)
    # This emulator keeps no events (the test checks counts), so its own memory does not matter either.
    shops = [EmulatorShop(partner_id=pid, api_key=key) for pid, key in SHOPS.values()]
    with EmulatorThread(shops, Faults(latency_ms=40), max_events=0) as slow:
        topic = stack.topic("backlog", partitions=6)
        produce_traffic(kafka_bootstrap, topic, traffic)
        group = unique_name("group")
        config = write_config(
            tmp_path / "relay.toml",
            bootstrap=kafka_bootstrap,
            topics=[topic],
            group=group,
            emulator_url=slow.url,
            registry_url=registry.url,
            sections={"delivery": {"max_in_flight_records": 10_000, "max_concurrent_batches": 4}},
        )
        relay = relays(config)
        process = psutil.Process(relay.pid)
        samples: list[int] = []
        total_calls = sum(traffic.expected.values())

        def drained() -> bool:
            if not relay.running():
                raise AssertionError(relay.output()[-3000:])
            samples.append(process.memory_info().rss)
            return slow.counters["events_accepted"] >= total_calls

        wait_for(drained, deadline_s=300, what="the backlog to drain", interval_s=0.25)
        assert relay.terminate() == 0

    peak_mb = max(samples) / 2**20
    settled_mb = samples[len(samples) // 10] / 2**20
    print(f"backlog={backlog} samples={len(samples)} rss early={settled_mb:.0f} MB peak={peak_mb:.0f} MB")
    assert peak_mb < 200, f"resident memory peaked at {peak_mb:.0f} MB"
    assert committed_offsets(kafka_bootstrap, group, topic, 6) == end_offsets(kafka_bootstrap, topic, 6)


def test_a_replay_from_an_earlier_offset_resends_events_with_their_original_time(
    kafka_bootstrap: str,
    kafka_admin: AdminClient,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(400, registry=registry.client(), seed=53)
    topic = stack.topic("replay", partitions=1)
    produce_traffic(kafka_bootstrap, topic, traffic)
    group = unique_name("group")
    config = stack.config([topic], group=group)
    relay = relays(config)
    first_run = wait_delivered(emulator, traffic.expected, relays=[relay])
    assert relay.terminate() == 0
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 400}

    # Recovery: rewind the (now empty) group to offset 300 and run again.
    rewind = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, 300)])
    kafka_admin.alter_consumer_group_offsets([rewind])[group].result(timeout=30)
    emulator.reset()
    replay_traffic = generate(400, registry=registry.client(), seed=53)
    replayed = expected_calls(replay_traffic.events[300:])
    relay = relays(config, name="replay")
    got = wait_delivered(emulator, replayed, relays=[relay])
    assert relay.terminate() == 0

    # The expected bodies carry each event's own occurredAt as timestamp: equality means original times.
    assert got == replayed, "exactly the records from offset 300 on, nothing earlier, original timestamps"
    assert sum(first_run.values()) > sum(got.values())
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 400}


def test_sigterm_stops_cleanly_with_exit_status_zero(
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    topic = stack.topic("idle")
    config = stack.config([topic])
    relay = relays(config)
    wait_for(lambda: relay.log_events("intake.assigned"), deadline_s=60, what="the assignment")
    assert relay.terminate() == 0
    assert relay.log_events("relay.stopped")
    assert not received(emulator)
