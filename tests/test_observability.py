"""Metrics, health and readiness, and logs: what an operator sees of a running relay."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from consumer.logs import FOLD_WINDOW_S, SecretScrubber
from consumer_dev.emulator import EmulatorShop, EmulatorThread, Faults
from tests.kafka import Topics, produce, unique_name, wait_for
from tests.relay import SHOPS, RelayProcess, SchemaRegistry, Stack, generate, write_config
from tools import kafka_local

#: How long a relay without its broker is watched before its librdkafka lines are counted.
OBSERVE_S = 5.0
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
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    traffic = generate(500, registry=registry.client(), seed=101)
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
    registry: SchemaRegistry,
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
    traffic = generate(50, registry=registry.client(), seed=7, shops=("demo",))
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
    more = generate(100, registry=registry.client(), seed=8, shops=("demo",))
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


def test_without_its_broker_a_relay_turns_unready_and_logs_librdkafkas_complaints_as_folded_json(
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    """A relay that lost its broker: /readyz turns red, and librdkafka's reconnect failures reach the relay's
    output only as JSON ``kafka.log`` events, folded (never raw ``%3|...|FAIL|`` lines, about 26 a second)."""
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
    lost_at = time.monotonic()
    _, body = wait_for(
        lambda: (r := get(port, "/readyz"))[0] == 503 and r, deadline_s=60, what="not ready without a broker"
    )
    problems = json.loads(body)["problems"]
    assert any(p.startswith("no Kafka broker reachable (kafka.bootstrap_servers = ") for p in problems), (
        problems
    )
    assert get(port, "/healthz")[0] == 200, "the process itself is fine"

    def complained_for_a_while() -> (
        bool
    ):  # an observation window of a few seconds, then its lines are counted
        fails = [e for e in relay.log_events("kafka.log") if e["facility"] == "FAIL" and e["broker"]]
        return bool(fails) and time.monotonic() - lost_at >= OBSERVE_S

    wait_for(complained_for_a_while, deadline_s=60, what="librdkafka's reconnect failures in the log")
    relay.terminate(90)
    observed_s = time.monotonic() - lost_at
    lines = relay.output().splitlines()
    assert not [line for line in lines if line.startswith("%")], "a raw librdkafka line reached the output"
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    kafka = [e for e in events if e["event"] == "kafka.log"]
    assert {e["client"] for e in kafka} >= {"consumer"}
    assert any(e.get("repeated") for e in kafka), "the repeated connect failures were folded"
    kinds = Counter(
        (e["client"], e["level"], e["facility"], e["broker"], re.sub(r"\d+", "#", e["message"]))
        for e in kafka
    )
    # A kind of line is logged once per window, plus once with the count of those held back.
    bound = 2 * (int(observed_s // FOLD_WINDOW_S) + 1)
    assert max(kinds.values()) <= bound, f"{kinds.most_common(3)} over {observed_s:.0f}s"


def test_no_secret_reaches_the_log_even_at_debug_level_on_failure_paths(
    kafka_bootstrap: str,
    topics: Topics,
    registry: SchemaRegistry,
    relays: Callable[..., RelayProcess],
    tmp_path: Path,
    stack: Stack,
) -> None:
    secret = "sEcReT-key-that-must-not-leak-42"
    # Timeouts and resets carry aiohttp's full URL (with the key) inside their exceptions.
    shops = [EmulatorShop(partner_id="p-demo", api_key=secret)]
    with EmulatorThread(shops, Faults(latency_ms=300, error_rate=0.3, error_status=500)) as slow:
        topic = stack.topic("secrets")
        traffic = generate(30, registry=registry.client(), seed=3, shops=("demo",))
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


# --- librdkafka's own lines: through the relay's JSON log, folded -----------------------------------------


class _Counting(logging.Handler):
    """Counts what librdkafka handed over, beside the handler under test."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def test_librdkafka_lines_become_folded_json_log_events_naming_client_and_broker(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A real client pointed at a closed port: librdkafka complains about 20 times a second; what reaches
    stderr is JSON, no raw ``%3|...|FAIL|`` line, one event per kind of line and one that counts the rest."""
    from confluent_kafka import Consumer

    from consumer import logs

    logs.configure("info", "json")
    port = kafka_local.free_port()  # nothing listens there
    kafka_log = logs.KafkaLog("consumer")
    counted = _Counting()
    kafka_log.addHandler(counted)
    client = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "g", "logger": kafka_log})
    try:
        client.subscribe(["t"])
        wait_for(
            lambda: client.consume(timeout=0.1) is not None and counted.count >= 20,
            deadline_s=30,
            what="librdkafka's connect failures",
            interval_s=0,
        )
    finally:
        client.close()
    kafka_log.flush()
    structlog.reset_defaults()
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert not [line for line in lines if line.startswith("%")], "a raw librdkafka line reached stderr"
    events = [json.loads(line) for line in lines]  # every line is JSON
    kafka = [e for e in events if e["event"] == "kafka.log"]
    assert kafka, err
    first = kafka[0]
    assert first["client"] == "consumer"
    assert first["facility"] == "FAIL"
    assert first["level"] == "error"
    assert first["broker"] == f"127.0.0.1:{port}/bootstrap"
    assert "Connection refused" in first["message"]
    assert not first["message"].startswith("[thrd:"), "the thread prefix is parsed off"
    # Nothing lost: each line is one of librdkafka's, or counts those held back (repeated).
    assert sum(e.get("repeated", 1) for e in kafka) == counted.count
    kinds = Counter((e["level"], e["facility"], e["broker"]) for e in kafka)
    assert all(n <= 2 for n in kinds.values()), f"not folded within the window: {kinds}"
    assert len(kafka) <= 2 * len(kinds) < counted.count


def test_repeats_are_counted_within_the_window_and_the_count_is_logged_after_it() -> None:
    from structlog.testing import capture_logs

    from consumer.logs import KafkaLog

    now = [0.0]
    kafka_log = KafkaLog("dead-letter-producer", clock=lambda: now[0])

    def fail(after_ms: int, broker: str = "127.0.0.1:9/1") -> None:
        line = f"[thrd:{broker}]: {broker}: Connect to ipv4#127.0.0.1:9 failed (after {after_ms}ms in X)"
        kafka_log.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", line)

    with capture_logs() as captured:
        for n in range(5):
            fail(n)  # the numbers vary, the kind does not
        fail(0, broker="127.0.0.1:8/2")  # another broker: a kind of its own
        assert [e.get("repeated") for e in captured] == [None, None]
        now[0] = FOLD_WINDOW_S + 0.1
        fail(7)  # the window is over: the count held back goes out, and this line starts a new one
        kafka_log.log(
            logging.WARNING, "%s [%s] %s", "REQTMOUT", "rdkafka#producer-1", "[thrd:main]: timed out"
        )
        kafka_log.flush()
    assert [(e["broker"], e.get("repeated"), e["log_level"]) for e in captured] == [
        ("127.0.0.1:9/1", None, "error"),
        ("127.0.0.1:8/2", None, "error"),
        ("127.0.0.1:9/1", 4, "error"),
        ("127.0.0.1:9/1", None, "error"),
        (None, None, "warning"),
    ]
    assert captured[0]["message"] == "Connect to ipv4#127.0.0.1:9 failed (after 0ms in X)"
    assert captured[-1]["facility"] == "REQTMOUT"
    assert {e["client"] for e in captured} == {"dead-letter-producer"}
