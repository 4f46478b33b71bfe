"""End to end: schema GUIDs (magic byte 1, and the GUID in the ``__value_schema_id`` header that
confluent-kafka's ``header_schema_id_serializer`` writes) reach the tracking API exactly.

Against the registry double: Apicurio Registry 3.3.3, the real registry the other tests use, has no
``/schemas/guids/{guid}`` endpoint (``tests/test_registry_local.py`` holds that it answers a bare 404), so a
registry that serves GUIDs, as Confluent's does from Confluent Platform 8.1 on, is stood in for by the double.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient, header_schema_id_serializer
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from consumer.decode import SCHEMAS_DIR, VALUE_SCHEMA_ID_HEADER, registry_client
from consumer_dev.emulator import EmulatorThread
from tests.kafka import committed_offsets, end_offsets, produce_with_headers, unique_name
from tests.relay import OCCURRED, RelayProcess, Stack, expected_calls, wait_delivered
from tools.registry_double import RegistryDouble


@pytest.fixture
def double_client(registry_double: RegistryDouble) -> Iterator[SchemaRegistryClient]:
    client = registry_client(registry_double.url)
    yield client
    client.close()


def view(n: int) -> dict[str, Any]:
    return {
        "eventId": f"guid-{n}",
        "occurredAt": OCCURRED + n,
        "sessionId": f"visitor{n % 5}",
        "shopId": "demo",
        "stockId": None,
        "productId": 5000 + n,
        "groupId": None,
    }


def test_guids_in_the_prefix_and_in_the_header_interleaved_with_ids_arrive_exactly(
    kafka_bootstrap: str,
    registry_double: RegistryDouble,
    double_client: SchemaRegistryClient,
    emulator: EmulatorThread,
    relays: Callable[..., RelayProcess],
    stack: Stack,
) -> None:
    stack = dataclasses.replace(stack, registry_url=registry_double.url)
    topic = stack.topic("guids")
    schema = (SCHEMAS_DIR / "ProductViewed.avsc").read_text(encoding="utf-8")
    in_prefix = AvroSerializer(double_client, schema, conf={"auto.register.schemas": True})
    in_header = AvroSerializer(
        double_client,
        schema,
        conf={"auto.register.schemas": True, "schema.id.serializer": header_schema_id_serializer},
    )
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    read = []
    for n in range(90):
        fields = view(n)
        headers: list[tuple[str, bytes]] = []
        if n % 3 == 0:  # the platform's default: magic 0, the id in the prefix
            value = in_prefix(fields, SerializationContext(topic, MessageField.VALUE, headers))
        elif n % 3 == 1:  # the GUID in the header, the value a bare body
            value = in_header(fields, SerializationContext(topic, MessageField.VALUE, headers))
            assert [(key, header[0]) for key, header in headers] == [(VALUE_SCHEMA_ID_HEADER, 1)]
        else:  # magic 1: the GUID in the prefix
            plain = in_prefix(fields, SerializationContext(topic, MessageField.VALUE, headers))
            assert plain is not None
            subject = double_client.get_latest_version(f"{topic}-value")
            assert subject.guid is not None
            value = b"\x01" + uuid.UUID(subject.guid).bytes + plain[5:]
        records.append((fields["sessionId"].encode(), value, headers))
        read.append(("ProductViewed", fields))
    produce_with_headers(kafka_bootstrap, topic, records)

    group = unique_name("group")
    relay = relays(stack.config([topic], group=group))
    expected = expected_calls(read)
    got = wait_delivered(emulator, expected, relays=[relay])
    assert relay.terminate() == 0
    assert got == expected
    assert end_offsets(kafka_bootstrap, f"{topic}.dlq", 1) == {0: 0}
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 90}
    guid_requests = [path for method, path in registry_double.requests if path.startswith("/schemas/guids/")]
    assert len(guid_requests) == 1, "the relay asked once for the GUID, then read it from its cache"
