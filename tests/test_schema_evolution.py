"""End to end against the real Schema Registry (BACKWARD compatibility, Confluent's default): what a platform
writes with confluent-kafka's ``AvroSerializer`` (subjects by ``TopicNameStrategy``) while its schemas evolve,
and with the schema id in a header, reaches the tracking API exactly: no call missing, none extra, nothing
dead-lettered.

The relay's reader schemas (``consumer/schemas/``) stay as they are: the producer moves on, the relay
does not.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from consumer.decode import SCHEMAS_DIR, VALUE_SCHEMA_ID_HEADER
from consumer_dev.emulator import EmulatorThread
from tests.kafka import committed_offsets, end_offsets, produce_with_headers, unique_name
from tests.relay import OCCURRED, RelayProcess, SchemaRegistry, Stack, expected_calls, wait_delivered

PV = "ProductViewed"


def product_viewed() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / "ProductViewed.avsc").read_text(encoding="utf-8"))
    return schema


def add_optional_referrer(schema: dict[str, Any]) -> dict[str, Any]:
    newer = copy.deepcopy(schema)
    newer["fields"].append({"name": "referrer", "type": ["null", "string"], "default": None})
    return newer


def drop_optional_group(schema: dict[str, Any]) -> dict[str, Any]:
    newer = copy.deepcopy(schema)
    newer["fields"] = [f for f in newer["fields"] if f["name"] != "groupId"]
    return newer


def rename_stock_with_alias(schema: dict[str, Any]) -> dict[str, Any]:
    newer = copy.deepcopy(schema)
    for field in newer["fields"]:
        if field["name"] == "stockId":
            field.update(name="warehouseId", aliases=["stockId"])
    return newer


#: Each version as the producer writes it: its schema, and the fields it writes for a view.
def versions() -> list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]]]:
    v1 = product_viewed()
    v2 = add_optional_referrer(v1)
    v3 = drop_optional_group(v2)
    v4 = rename_stock_with_alias(v3)

    def renamed(fields: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in fields.items() if k not in ("groupId", "stockId")}
        return out | {"warehouseId": fields["stockId"], "referrer": "search"}

    return [
        ("v1", v1, lambda f: f),
        ("v2 adds optional referrer", v2, lambda f: f | {"referrer": "newsletter"}),
        (
            "v3 drops optional groupId",
            v3,
            lambda f: {k: v for k, v in (f | {"referrer": None}).items() if k != "groupId"},
        ),
        ("v4 renames stockId, alias kept", v4, renamed),
    ]


def view(n: int) -> dict[str, Any]:
    return {
        "eventId": f"evolve-{n}",
        "occurredAt": OCCURRED + n,
        "sessionId": f"visitor{n % 7}",
        "shopId": "demo",
        "stockId": f"stock{n % 3}" if n % 2 else None,
        "productId": 1000 + n,
        "groupId": 2000 + n if n % 3 else None,
    }


def as_the_relay_reads(version: str, fields: dict[str, Any]) -> dict[str, Any]:
    """What the relay's reader schema makes of a view: groupId is gone from v3 on (its default, null)."""
    return fields | {"groupId": None} if version.startswith(("v3", "v4")) else fields


def test_a_producer_evolving_its_schema_in_backward_mode_interleaved_on_one_partition_loses_nothing(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    topic = stack.topic("evolving")
    client: SchemaRegistryClient = registry.client()
    assert client.get_compatibility() == "BACKWARD"
    serializers = [
        (label, AvroSerializer(client, json.dumps(schema), conf={"auto.register.schemas": True}), write)
        for label, schema, write in versions()
    ]
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    read: list[tuple[str, dict[str, Any]]] = []
    # Each version registers on its first record, in order (BACKWARD checks each against the one before);
    # then all four write in turn, old and new interleaved on the one partition.
    for n in range(200):
        label, serialize, write = serializers[n % 4 if n >= 4 else n]
        fields = view(n)
        value = serialize(write(fields), SerializationContext(topic, MessageField.VALUE))
        records.append((fields["sessionId"].encode(), value, []))
        read.append((PV, as_the_relay_reads(label, fields)))
    subject = f"{topic}-value"  # TopicNameStrategy
    assert client.get_versions(subject) == [1, 2, 3, 4]
    produce_with_headers(kafka_bootstrap, topic, records)

    group = unique_name("group")
    relay = relays(stack.config([topic], group=group))
    expected = expected_calls(read)
    got = wait_delivered(emulator, expected, relays=[relay])

    assert relay.terminate() == 0
    assert got == expected, "every call exact: none missing, none extra, none twice"
    assert end_offsets(kafka_bootstrap, f"{topic}.dlq", 1) == {0: 0}, "nothing dead-lettered"
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 200}


def test_the_registry_refuses_a_version_that_breaks_backward_compatibility(registry: SchemaRegistry) -> None:
    """What makes the test above meaningful: the registry does check, so each version passed a real check."""
    client: SchemaRegistryClient = registry.client()
    subject = f"{unique_name('strict')}-value"
    client.register_schema(subject, Schema(json.dumps(product_viewed()), "AVRO"))
    broken = product_viewed()
    broken["fields"].append({"name": "campaign", "type": "string"})  # required, no default: old data lacks it
    with pytest.raises(SchemaRegistryError) as caught:
        client.register_schema(subject, Schema(json.dumps(broken), "AVRO"))
    assert caught.value.http_status_code == 409


def test_ids_in_headers_and_in_prefixes_interleaved_on_one_partition_arrive_exactly(
    kafka_bootstrap: str,
    registry: SchemaRegistry,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    """A platform turning header ids on mid-stream: the id in ``__value_schema_id`` (0x00 + 4-byte id; the
    GUID form needs a registry that serves GUIDs, see tests/test_wire_format.py) and the value a bare body."""
    topic = stack.topic("header-ids")
    client: SchemaRegistryClient = registry.client()
    serialize = AvroSerializer(client, json.dumps(product_viewed()), conf={"auto.register.schemas": True})
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    read: list[tuple[str, dict[str, Any]]] = []
    for n in range(100):
        fields = view(n)
        value = serialize(fields, SerializationContext(topic, MessageField.VALUE))
        assert value is not None
        if n % 2:
            records.append((fields["sessionId"].encode(), value[5:], [(VALUE_SCHEMA_ID_HEADER, value[:5])]))
        else:
            records.append((fields["sessionId"].encode(), value, [("traceparent", b"00-1-2-01")]))
        read.append((PV, fields))
    produce_with_headers(kafka_bootstrap, topic, records)

    relay = relays(stack.config([topic]))
    expected = expected_calls(read)
    got = wait_delivered(emulator, expected, relays=[relay])
    assert relay.terminate() == 0
    assert got == expected
    assert end_offsets(kafka_bootstrap, f"{topic}.dlq", 1) == {0: 0}
