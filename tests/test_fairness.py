"""Fair service under a backlog (guarantee 9): every partition with work makes progress, whatever another
partition's backlog, because the in-flight budget is shared between the busy partitions.

The bound kept: with a skewed backlog (one partition ten times the others, one partition of another shop),
every partition gets its first delivery within FAIR_WAIT_S of the first delivery of all, and while it has
records left, never waits longer than FAIR_WAIT_S between two deliveries. Here a partition's share is about
a third of a 300-record budget, served within half a second; a partition behind the big one used to wait
until the big one's backlog was gone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from consumer_dev.emulator import EmulatorShop, EmulatorThread, Faults
from tests.kafka import committed_offsets, end_offsets, produce, unique_name, wait_for
from tests.relay import (
    SHOPS,
    RelayProcess,
    SchemaRegistry,
    Stack,
    delivered_records,
    delivery_times,
    numbered_views,
    write_config,
)

FAIR_WAIT_S = 3.0
#: A shop whose API refuses it (429, its breaker open) holds one sender: the others deliver within this.
SHOP_WAIT_S = 5.0

#: mode -> (records of the big partition, of each small one, delivery settings): each run about 5 s.
SETUPS = {
    "single": (5000, 500, {"max_concurrent_calls": 16}),
    "batch": (10_000, 1000, {"max_concurrent_batches": 2, "batch_max_events": 50, "batch_linger_ms": 5}),
}


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_under_a_skewed_backlog_every_partition_is_served_within_the_fairness_bound(
    mode: str,
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    big, small, delivery = SETUPS[mode]
    per_partition = {0: big, 1: small, 2: small}
    records = numbered_views(
        registry.client(),
        per_partition,
        shop_of=lambda partition, offset: "other" if partition == 2 else "demo",
    )
    expected = {(p, o) for p, n in per_partition.items() for o in range(n)}
    emulator.set_faults(Faults(latency_ms=20 if mode == "single" else 50))
    topic = stack.topic(f"skewed-{mode}", partitions=3)
    group = unique_name("group")
    produce(kafka_bootstrap, topic, records)  # the whole backlog is there before the relay starts
    config = stack.config(
        [topic],
        group=group,
        sections={
            "delivery": {"mode": mode, "max_in_flight_records": 300, **delivery},
            "kafka": {"consume_batch": 100},
        },
    )
    relay = relays(config)

    def all_delivered() -> bool:
        if not relay.running():
            raise AssertionError(relay.output()[-3000:])
        return emulator.counters["events_accepted"] >= len(expected)

    wait_for(all_delivered, deadline_s=120, what="the backlog delivered", interval_s=0.2)
    assert relay.terminate() == 0
    got = delivered_records(emulator)
    assert set(got) == expected, "nothing lost"
    assert committed_offsets(kafka_bootstrap, group, topic, 3) == end_offsets(kafka_bootstrap, topic, 3)

    times = delivery_times(emulator)
    start = min(min(arrivals) for arrivals in times.values())
    first_wait = {p: round(min(arrivals) - start, 2) for p, arrivals in times.items()}
    longest_gap = {
        p: round(max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0), 2)
        for p, arrivals in times.items()
    }
    print(
        f"mode={mode} first delivery after {first_wait}s, longest gap {longest_gap}s (bound {FAIR_WAIT_S}s)"
    )
    assert all(wait <= FAIR_WAIT_S for wait in first_wait.values()), first_wait
    assert all(gap <= FAIR_WAIT_S for gap in longest_gap.values()), longest_gap


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_a_shop_whose_api_throttles_it_keeps_one_sender_and_the_other_shop_is_served(
    mode: str,
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    # The API lets shop "other" make 2 requests a second; the relay is configured to allow far more, so its
    # calls are answered 429 with Retry-After, and retried. Shop "demo" answers everything, and alone its
    # records take about a second here (before: 20-30 s in batch mode, over 120 s in single mode, while
    # every sender waited for shop other).
    count = 1000
    records = numbered_views(
        registry.client(),
        {0: count, 1: count},
        shop_of=lambda partition, offset: "other" if partition == 1 else "demo",
    )
    shops = [
        EmulatorShop(*SHOPS["demo"]),
        EmulatorShop(*SHOPS["other"], rate_limit=2),
    ]
    with EmulatorThread(shops, Faults(latency_ms=20)) as api:
        topic = stack.topic(f"throttled-shop-{mode}", partitions=2)
        group = unique_name("group")
        produce(kafka_bootstrap, topic, records)
        config = write_config(
            stack.folder / "relay.toml",
            bootstrap=kafka_bootstrap,
            topics=[topic],
            group=group,
            emulator_url=api.url,
            registry_url=registry.url,
            sections={
                "delivery": {
                    "mode": mode,
                    "max_concurrent_calls": 16,
                    "max_concurrent_batches": 4,
                    "batch_max_events": 20,
                    "batch_linger_ms": 5,
                    "shutdown_grace_s": 0.5,
                },
                "retry": {"base_s": 0.05, "cap_s": 1.0, "breaker_probe_base_s": 0.5},
            },
        )
        relay = relays(config)

        def demo_delivered() -> bool:
            if not relay.running():
                raise AssertionError(relay.output()[-3000:])
            return api.counters["events_by_shop"].get(SHOPS["demo"][0], 0) >= count

        wait_for(demo_delivered, deadline_s=120, what="shop demo's records", interval_s=0.1)
        assert relay.terminate() == 0
        times = delivery_times(api)
        got = delivered_records(api)
        throttled = api.counters["rate_limited"]

    assert {(0, o) for o in range(count)} <= set(got), "nothing of demo lost"
    start = min(min(arrivals) for arrivals in times.values())
    demo_took = max(times[0]) - start
    print(f"mode={mode} demo delivered in {demo_took:.2f}s; other delivered {len(times.get(1, []))}")
    assert throttled > 0, "shop other was answered 429"
    assert demo_took <= SHOP_WAIT_S, "a throttled shop does not hold up the others"
