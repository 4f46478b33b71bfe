"""Helpers for end-to-end tests: the relay as its own process, its configuration, and the expected calls."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer
from confluent_kafka.schema_registry import record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from pydantic import SecretStr

from consumer.config import ShopConfig
from consumer.contract import TrackingCall
from consumer.decode import SCHEMAS_DIR, DomainEvent
from consumer.translate import Translator
from consumer_dev.sample import TrafficGenerator, build_encoder
from tests.kafka import Topics, produce, unique_name, wait_for

ROOT = Path(__file__).resolve().parent.parent
#: Shop key in the relay's configuration -> (partnerId, apiKey) known to the emulator.
SHOPS: Mapping[str, tuple[str, str]] = {
    "demo": ("p-demo", "k-demo-secret-1"),
    "other": ("p-other", "k-other-2"),
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


#: Settings of a registry client a test uses to set the scene, not to test the relay: it waits, and retries.
PATIENT: Mapping[str, Any] = {"timeout": 60.0, "max_retries": 2}


@dataclass
class SchemaRegistry:
    """The session's real Schema Registry (``tools.registry_local``, or ``SCHEMA_REGISTRY_URL``'s).

    :meth:`client` gives clients that stay open until the session ends (:meth:`close`): a real registry keeps
    its connections alive, so a client left to the garbage collector would leave an unclosed socket behind.
    """

    url: str
    _clients: list[Any] = field(default_factory=list, repr=False)

    def client(self) -> Any:
        """A new client of the registry (its own cache: what it reads, it asks the registry for).

        A test's own client registers and reads schemas to set the scene, so it waits for the registry: under
        a loaded CI run Apicurio once took over 5 s (the relay's timeout) to answer a first registration on
        a new subject. How the relay meets a slow registry is tested on its own (tests/test_faults.py).
        """
        from consumer.decode import registry_client

        self._clients.append(registry_client(self.url, **PATIENT))
        return self._clients[-1]

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


@dataclass
class Stack:
    """What an end-to-end test wires a relay to: the broker, the real registry, the emulator, a folder."""

    bootstrap: str
    topics: Topics
    registry_url: str
    emulator_url: str
    folder: Path

    def topic(self, purpose: str, partitions: int = 1) -> str:
        """A fresh topic and its dead-letter topic (``<name>.dlq``); returns the topic's name."""
        name = self.topics.create(purpose, partitions=partitions)
        self.topics.create_named(f"{name}.dlq")
        return name

    def config(
        self, topics: Iterable[str], *, group: str | None = None, name: str = "relay.toml", **settings: Any
    ) -> Path:
        """A relay configuration for ``topics`` on this stack; ``settings`` as :func:`write_config` takes."""
        return write_config(
            self.folder / name,
            bootstrap=self.bootstrap,
            topics=topics,
            group=group or unique_name("group"),
            emulator_url=self.emulator_url,
            registry_url=self.registry_url,
            **settings,
        )


def write_config(
    path: Path,
    *,
    bootstrap: str,
    topics: Iterable[str],
    group: str,
    emulator_url: str,
    registry_url: str | None = None,
    fmt: str = "confluent-avro",
    shops: Iterable[str] = ("demo", "other"),
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A relay configuration for a test: the given topics, shops and any extra settings per section."""
    extra = {name: dict(values) for name, values in (sections or {}).items()}
    kafka = {
        "bootstrap_servers": bootstrap,
        "group_id": group,
        "commit_interval_ms": 200,
        # A killed member is noticed after this long (the broker's minimum), not librdkafka's 45 s.
        "client": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        **extra.pop("kafka", {}),
    }
    tracking = {"base_url": emulator_url, **extra.pop("tracking", {})}
    lines = [_table("kafka", kafka), _table("tracking", tracking)]
    for topic in topics:
        lines.append(f'[[topics]]\nname = "{topic}"\nformat = "{fmt}"\n')
    if registry_url:
        lines.append(_table("schema_registry", {"url": registry_url, **extra.pop("schema_registry", {})}))
    for shop in shops:
        lines.append(f'[shops.{shop}]\npartner_id = "{SHOPS[shop][0]}"\nrate_limit = 100000\n')
    for name, values in extra.items():
        lines.append(_table(name, values))
    path.write_text("\n".join(lines))
    return path


def _table(name: str, values: Mapping[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


def relay_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RR_")}
    env.update({f"RR_API_KEY_{shop.upper()}": key for shop, (_, key) in SHOPS.items()})
    env["RR_OBSERVABILITY__LOG_FORMAT"] = "json"
    env.update(extra)
    return env


@dataclass
class RelayProcess:
    """``rr-consumer run`` as a child process, its output kept in a file."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=relay_env)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait for the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """kill -9: no drain, no commit, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def wait_exit(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.output().splitlines():
            if f'"{event}"' in line:
                try:
                    found.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
        return found

    def cleanup(self) -> None:
        if self.running():
            self.kill()


def test_shops() -> dict[str, ShopConfig]:
    return {name: ShopConfig(partner_id=pid, api_key=SecretStr(key)) for name, (pid, key) in SHOPS.items()}


test_shops.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


class PlatformEncoder:
    """``confluent-avro`` values as a platform writes them: confluent-kafka's own ``AvroSerializer``, one per
    record type, registering on first use. Subjects by ``RecordNameStrategy``: the generated traffic puts
    every event type on one topic, which ``TopicNameStrategy`` (one record type per subject under BACKWARD)
    cannot carry; tests of a single type use ``TopicNameStrategy`` (``tests/test_schema_evolution.py``)."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._serializers: dict[str, AvroSerializer] = {}
        self._context = SerializationContext("events", MessageField.VALUE)

    def encode(self, type_name: str, fields: dict[str, Any]) -> bytes:
        serialize = self._serializers.get(type_name)
        if serialize is None:
            short = type_name.rpartition(".")[2]
            serialize = self._serializers[type_name] = AvroSerializer(
                self._registry,
                (SCHEMAS_DIR / f"{short}.avsc").read_text(encoding="utf-8"),
                conf={"auto.register.schemas": True, "subject.name.strategy": record_subject_name_strategy},
            )
        value = serialize(fields, self._context)
        assert value is not None
        return value


@dataclass
class Traffic:
    """Generated events, their encoded records, and the calls the contract says they imply."""

    events: list[tuple[str, dict[str, Any]]]
    records: list[tuple[bytes, bytes]]
    expected: Counter[tuple[str, str, bytes]]
    expected_by_session: dict[str, list[tuple[str, bytes]]]


def generate(
    count: int,
    *,
    registry: Any = None,
    fmt: str = "confluent-avro",
    seed: int = 7,
    visitors: int = 2000,
    shops: Iterable[str] = ("demo", "other"),
) -> Traffic:
    generator = TrafficGenerator(seed=seed, shops=list(shops), visitors=visitors, now_ms=1_700_000_000_000)
    encoder: Any = (
        PlatformEncoder(registry) if fmt == "confluent-avro" else build_encoder(fmt, registry=registry)  # type: ignore[arg-type]
    )
    events = list(generator.events(count))
    records = [(fields["sessionId"].encode(), encoder.encode(name, fields)) for name, fields in events]
    by_session: dict[str, list[tuple[str, bytes]]] = {}
    for call in _sent_calls(events):
        by_session.setdefault(call.body["sessionExternalId"], []).append((call.method, canonical(call.body)))
    return Traffic(events, records, expected_calls(events), by_session)


def _sent_calls(events: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[TrackingCall]:
    """The calls the contract lets go for these events, in order (an order's bad items are withheld)."""
    translator = Translator(test_shops())
    for name, fields in events:
        calls, rejected = translator.translate_partial(DomainEvent(name, fields))
        bad = {index for index, _ in rejected}
        yield from (call for index, call in enumerate(calls) if index not in bad)


def calls_per_record(events: Iterable[tuple[str, dict[str, Any]]]) -> list[list[tuple[str, str, bytes]]]:
    """For each event, the calls it should put at the emulator, as :func:`expected_calls` counts them."""
    translator = Translator(test_shops())
    found = []
    for name, fields in events:
        calls, rejected = translator.translate_partial(DomainEvent(name, fields))
        bad = {index for index, _ in rejected}
        found.append(
            [(SHOPS[c.shop][0], c.method, canonical(c.body)) for i, c in enumerate(calls) if i not in bad]
        )
    return found


def expected_calls(events: Iterable[tuple[str, dict[str, Any]]]) -> Counter[tuple[str, str, bytes]]:
    """What the emulator should hold for these events: (partnerId, method, canonical body) with counts."""
    return Counter((SHOPS[call.shop][0], call.method, canonical(call.body)) for call in _sent_calls(events))


def canonical(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def received(emulator: Any) -> Counter[tuple[str, str, bytes]]:
    return Counter((e["partnerId"], e["method"], canonical(e["body"])) for e in emulator.events())


def wait_delivered(
    emulator: Any,
    expected: Counter[tuple[str, str, bytes]],
    *,
    deadline_s: float = 120,
    relays: Iterable[RelayProcess] = (),
) -> Counter[tuple[str, str, bytes]]:
    """Wait until every expected call reached the emulator; fail early if a relay died."""
    total = sum(expected.values())

    def arrived() -> Counter[tuple[str, str, bytes]] | None:
        for relay in relays:
            if relay.process is not None and relay.process.poll() not in (None, 0):
                raise AssertionError(
                    f"relay exited with {relay.process.returncode}:\n{relay.output()[-3000:]}"
                )
        if emulator.counters["events_accepted"] < total:
            return None
        got = received(emulator)
        return got if not expected - got else None

    result = wait_for(arrived, deadline_s=deadline_s, what=f"{total} calls at the emulator", interval_s=0.2)
    assert result is not None
    return result


def produce_traffic(bootstrap: str, topic: str, traffic: Traffic) -> int:
    return produce(bootstrap, topic, traffic.records)


def elapsed(start: float) -> float:
    return time.monotonic() - start


#: The time of hand-built test events (epoch milliseconds).
OCCURRED = 1_700_000_000_000


def dead_letters(bootstrap: str, topic: str, count: int, deadline_s: float = 60) -> list[dict[str, Any]]:
    """Read ``count`` records of a dead-letter topic from the start; each as key, value and headers."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique_name("dlq-reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    found: list[dict[str, Any]] = []
    try:
        consumer.subscribe([topic])

        def enough() -> bool:
            for message in consumer.consume(num_messages=100, timeout=0.5):
                assert message.error() is None, message.error()
                headers = {k: (v.decode() if v is not None else None) for k, v in message.headers() or []}
                found.append({"key": message.key(), "value": message.value(), "headers": headers})
            return len(found) >= count

        wait_for(enough, deadline_s=deadline_s, what=f"{count} dead-letter records", interval_s=0)
        # Nothing more than expected: one more short read finds nothing.
        extra = consumer.consume(num_messages=10, timeout=1.0)
        assert not [m for m in extra if m.error() is None], "a record was dead-lettered more than once"
    finally:
        consumer.close()
    return found


def event(type_name: str, **fields: Any) -> dict[str, Any]:
    common = {
        "eventId": "e-" + type_name,
        "occurredAt": OCCURRED,
        "sessionId": "visitor42",
        "shopId": "demo",
        "stockId": None,
    }
    return {**common, **fields}


#: A numbered view's productId is ``partition * NUMBERED + offset + 1``: each call names its own record.
NUMBERED = 10_000_000


def numbered_views(
    registry: Any,
    per_partition: Mapping[int, int],
    *,
    visitors: int = 40,
    shop_of: Callable[[int, int], str] = lambda partition, offset: "demo",
) -> list[tuple[bytes, bytes, int]]:
    """``ProductViewed`` records, ``(key, value, partition)``, each naming its partition and offset.

    Produced in this order to a fresh topic, the n-th record of partition p lands at offset n, and its one
    ``view`` call carries ``productId = p * NUMBERED + n + 1``: what reached the emulator, and how often,
    is then known per record (:func:`delivered_records`). ``visitors`` keys per partition, round robin;
    ``shop_of(partition, offset)`` names each record's shop. Partitions are interleaved, each in order.
    """
    encoder = PlatformEncoder(registry)
    records = []
    for offset in range(max(per_partition.values(), default=0)):
        for partition, count in per_partition.items():
            if offset >= count:
                continue
            session = f"p{partition}v{offset % visitors}"
            fields = {
                "eventId": f"e{partition}-{offset}",
                "occurredAt": OCCURRED + offset,
                "sessionId": session,
                "shopId": shop_of(partition, offset),
                "stockId": None,
                "productId": partition * NUMBERED + offset + 1,
                "groupId": None,
            }
            records.append((session.encode(), encoder.encode("ProductViewed", fields), partition))
    return records


def delivered_records(emulator: Any) -> Counter[tuple[int, int]]:
    """How often each numbered record's call reached the emulator, by ``(partition, offset)``."""
    return Counter(divmod(event["body"]["productId"] - 1, NUMBERED) for event in emulator.events())


def delivery_times(emulator: Any) -> dict[int, list[float]]:
    """When the emulator accepted each numbered record's call, per partition, in arrival order."""
    times: dict[int, list[float]] = {}
    for event in emulator.events():
        partition = (event["body"]["productId"] - 1) // NUMBERED
        times.setdefault(partition, []).append(event["received_at"])
    return times
