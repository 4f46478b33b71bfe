"""Metrics, health and readiness, and logs: what an operator sees of a running relay."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from consumer.decode import registry_client
from consumer.emulator import EmulatorShop, EmulatorThread, Faults
from consumer.logs import SecretScrubber
from tests.kafka import Topics, produce, unique_name, wait_for
from tests.relay import SHOPS, RelayProcess, Stack, generate, write_config
from tools import kafka_local
from tools.registry_double import RegistryDouble

#: The samples of a /metrics page: (name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def samples(text: str) -> Samples:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: Samples, name: str, **labels: str) -> float:
    """The sample ``name{labels}``; a missing one fails, naming it (a metric the relay lost is not 0)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in metrics:
        present = sorted(str(dict(have)) for sample, have in metrics if sample == name)
        raise AssertionError(f"no sample {name}{labels} on /metrics (samples of {name}: {present or 'none'})")
    return metrics[key]


def value_or_zero(metrics: Samples, name: str, **labels: str) -> float:
    """The sample ``name{labels}``, or 0.0 when it is absent: only where absent means "none yet" (a counter
    appears with its first increment), such as inside a wait for it to appear."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_missing_metric_sample_fails_naming_it_instead_of_reading_as_zero() -> None:
    metrics = samples('# TYPE rr_x_total counter\nrr_x_total{topic="a",outcome="ok"} 3.0\n')
    assert value(metrics, "rr_x_total", topic="a", outcome="ok") == 3
    with pytest.raises(
        AssertionError, match=r"no sample rr_x_total\{'topic': 'b', 'outcome': 'ok'\}"
    ) as caught:
        value(metrics, "rr_x_total", topic="b", outcome="ok")
    assert "{'outcome': 'ok', 'topic': 'a'}" in str(caught.value), "it lists the samples the metric has"
    with pytest.raises(AssertionError, match="samples of rr_gone: none"):
        value(metrics, "rr_gone")
    assert value_or_zero(metrics, "rr_x_total", topic="b", outcome="ok") == 0.0  # only when asked for


def test_metrics_count_exactly_what_a_known_run_did(
    kafka_bootstrap: str,
    registry: RegistryDouble,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(500, registry=registry_client(registry.url), seed=101)
    topic = stack.topic("metrics", partitions=2)
    poison = [(b"bad1", b""), (b"bad2", b"\x00\x00\x00\x00\x63garbage")]
    produce(kafka_bootstrap, topic, [*traffic.records, *poison])
    port = kafka_local.free_port()
    config = stack.config([topic], sections={"observability": {"port": port, "host": "127.0.0.1"}})
    relay = relays(config)
    total = len(traffic.records) + len(poison)

    def settled() -> Samples | None:
        status, text = get(port, "/metrics")
        if status != 200:
            return None
        metrics = samples(text)
        done = sum(  # an outcome's counter is absent until its first record: none settled so far
            value_or_zero(metrics, "rr_records_settled_total", topic=topic, outcome=o)
            for o in ("delivered", "dead_lettered")
        )
        return metrics if done == total else None

    metrics = wait_for(settled, deadline_s=60, what="every record settled in the metrics", interval_s=0.2)
    assert relay.terminate() == 0

    assert value(metrics, "rr_records_consumed_total", topic=topic) == total
    assert value(metrics, "rr_records_settled_total", topic=topic, outcome="delivered") == len(
        traffic.records
    )
    assert value(metrics, "rr_records_settled_total", topic=topic, outcome="dead_lettered") == 2
    assert value(metrics, "rr_dead_lettered_total", topic=topic, stage="decode", reason="DecodeError") == 1
    assert value(metrics, "rr_dead_lettered_total", topic=topic, stage="decode", reason="SchemaNotFound") == 1
    expected_calls: Counter[tuple[str, str]] = Counter()
    for partner, method, _ in traffic.expected.elements():
        shop = next(name for name, (pid, _) in SHOPS.items() if pid == partner)
        expected_calls[(shop, method)] += 1
    for (shop, method), count in expected_calls.items():
        assert value(metrics, "rr_calls_total", shop=shop, method=method, outcome="delivered") == count
    requests = sum(v for (name, labels), v in metrics.items() if name == "rr_requests_total")
    assert requests == sum(sum(s.values()) for s in emulator.counters["requests"].values())
    assert value(metrics, "rr_in_flight_records") == 0
    assert value(metrics, "rr_partitions_assigned") == 2
    assert value(metrics, "rr_breaker_open", shop="demo") == 0
    assert any(name == "rr_build_info" for name, _ in metrics)
    assert value(metrics, "rr_batch_events_count") >= 1
    for key in (k for _, k in SHOPS.values()):
        assert key not in json.dumps([list(k) for k in metrics])


def test_an_open_breaker_pauses_the_partition_and_readiness_follows_while_liveness_stays_green(
    kafka_bootstrap: str,
    registry: RegistryDouble,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    topic = stack.topic("ready")
    port = kafka_local.free_port()
    config = stack.config(
        [topic],
        sections={
            "observability": {"port": port, "host": "127.0.0.1"},
            "kafka": {"statistics_interval_ms": 200},
            "retry": {
                "base_s": 0.05,
                "cap_s": 0.2,
                "breaker_threshold": 2,
                "breaker_probe_base_s": 0.2,
                "breaker_probe_cap_s": 0.5,
            },
        },
    )
    relay = relays(config)
    wait_for(lambda: get(port, "/readyz")[0] == 200, deadline_s=60, what="ready once partitions are assigned")
    assert get(port, "/healthz")[0] == 200

    emulator.set_faults(Faults(outage="503"))
    traffic = generate(50, registry=registry_client(registry.url), seed=7, shops=("demo",))
    produce(kafka_bootstrap, topic, traffic.records)
    _, body = wait_for(
        lambda: (r := get(port, "/readyz"))[0] == 503 and r,
        deadline_s=60,
        what="not ready while the breaker is open",
    )
    assert "circuit breaker open for shop 'demo'" in json.loads(body)["problems"]
    assert get(port, "/healthz")[0] == 200, "alive: an API outage is no reason to restart"

    # While the breaker is open the partition feeding the shop is paused: new events stay in Kafka.
    consumed = value(samples(get(port, "/metrics")[1]), "rr_records_consumed_total", topic=topic)
    more = generate(100, registry=registry_client(registry.url), seed=8, shops=("demo",))
    produce(kafka_bootstrap, topic, more.records)
    lagging = wait_for(
        lambda: (
            (m := samples(get(port, "/metrics")[1]))
            and value_or_zero(m, "rr_consumer_lag", topic=topic, partition="0") >= 100  # absent: not yet
            and m
        ),
        deadline_s=30,
        what="librdkafka to report the new events as lag",
    )
    assert value(lagging, "rr_records_consumed_total", topic=topic) == consumed, "nothing read while held"
    assert value(lagging, "rr_breaker_open", shop="demo") == 1

    emulator.set_faults(Faults())
    wait_for(lambda: get(port, "/readyz")[0] == 200, deadline_s=60, what="ready again after the outage")
    wait_for(
        lambda: (
            value_or_zero(  # absent: nothing delivered yet
                samples(get(port, "/metrics")[1]),
                "rr_records_settled_total",
                topic=topic,
                outcome="delivered",
            )
            == 150
        ),
        deadline_s=60,
        what="everything delivered once the breaker closed",
    )
    assert relay.terminate() == 0


def test_readiness_turns_red_when_the_broker_goes_away(
    registry: RegistryDouble,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    broker = kafka_local.start(data_root=tmp_path)  # a broker of its own: this test stops it
    try:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        try:
            for future in admin.create_topics([NewTopic("gone", 1, 1), NewTopic("gone.dlq", 1, 1)]).values():
                future.result(30)
        finally:
            del admin  # destroyed now, while its broker is up: never by a collection after it stopped
        port = kafka_local.free_port()
        config = write_config(
            tmp_path / "relay.toml",
            bootstrap=broker.bootstrap,
            topics=["gone"],
            group="g",
            emulator_url=emulator.url,
            registry_url=registry.url,
            sections={
                "observability": {"port": port, "host": "127.0.0.1"},
                "kafka": {"statistics_interval_ms": 200},
            },
        )
        relay = relays(config)
        wait_for(lambda: get(port, "/readyz")[0] == 200, deadline_s=60, what="ready")
    finally:
        kafka_local.stop(broker)
    _, body = wait_for(
        lambda: (r := get(port, "/readyz"))[0] == 503 and r, deadline_s=60, what="not ready without a broker"
    )
    assert "no Kafka broker reachable" in json.loads(body)["problems"]
    assert get(port, "/healthz")[0] == 200, "the process itself is fine"
    relay.terminate(90)


def test_no_secret_reaches_the_log_even_at_debug_level_on_failure_paths(
    kafka_bootstrap: str,
    topics: Topics,
    registry: RegistryDouble,
    relays: Callable[..., RelayProcess],
    tmp_path: Path,
    stack: Stack,
) -> None:
    secret = "sEcReT-key-that-must-not-leak-42"
    # Timeouts and resets carry aiohttp's full URL (with the key) inside their exceptions.
    shops = [EmulatorShop(partner_id="p-demo", api_key=secret)]
    with EmulatorThread(shops, Faults(latency_ms=300, error_rate=0.3, error_status=500)) as slow:
        topic = stack.topic("secrets")
        traffic = generate(30, registry=registry_client(registry.url), seed=3, shops=("demo",))
        produce(kafka_bootstrap, topic, traffic.records)
        config = write_config(
            tmp_path / "relay.toml",
            bootstrap=kafka_bootstrap,
            topics=[topic],
            group=unique_name("group"),
            emulator_url=slow.url,
            registry_url=registry.url,
            shops=("demo",),
            sections={
                "observability": {"log_level": "debug"},
                "tracking": {"single_timeout": 0.1},
                "delivery": {"mode": "single", "shutdown_grace_s": 1},
                "retry": {"base_s": 0.01, "cap_s": 0.05},
            },
        )
        relay = relays(config, RR_API_KEY_DEMO=secret)
        wait_for(
            lambda: len(relay.log_events("deliver.retry")) >= 5, deadline_s=60, what="failing calls logged"
        )
        assert relay.terminate() == 0
    output = relay.output()
    assert "timed out" in output or "timeout" in output.lower(), "the failure path was taken and logged"
    assert secret not in output


def test_the_secret_scrubber_masks_secrets_in_nested_log_values() -> None:
    scrub = SecretScrubber(["k3y"])
    event: Any = {"event": "x", "url": "http://h/?apiKey=k3y", "nested": {"list": ["a k3y b", 1]}}
    cleaned = scrub(None, "info", event)
    assert "k3y" not in json.dumps(cleaned)
    assert cleaned["nested"]["list"][1] == 1


def test_log_lines_are_json_with_the_event_name_when_not_in_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from consumer import logs

    logs.configure("info", "json", secrets=["hush"])
    structlog.get_logger("t").info("relay.test", topic="t", partition=1, offset=2, shop="demo", note="hush")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "relay.test"
    assert line["note"] == "***"
    structlog.reset_defaults()
