"""The whole Confluent wire format: magic byte 0 (schema id) and 1 (schema GUID), ids in the
``__value_schema_id`` header (both forms), and writer schemas with references.

Values are written by confluent-kafka's own ``AvroSerializer`` wherever it can write the form (the prefix, and
the GUID header of its ``header_schema_id_serializer``), so what the decoder reads is what a platform writes;
the forms it cannot write (a GUID prefix, a 4-byte id in a header) are framed by hand from the same body. The
registry is the client's in-memory ``mock://`` one (it serves GUIDs); the registry's HTTP failures are in
``tests/test_decode.py``, and the real registry's behaviour in ``tests/test_registry_local.py``.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import (
    Schema,
    SchemaReference,
    SchemaRegistryClient,
    header_schema_id_serializer,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from consumer.decode import (
    KEY_SCHEMA_ID_HEADER,
    SCHEMAS_DIR,
    VALUE_SCHEMA_ID_HEADER,
    DomainEvent,
    SchemaNotFound,
    build_decoder,
    registry_client,
)
from consumer.errors import DecodeError, PermanentError
from tests.test_decode import EVENTS

pytestmark = pytest.mark.unit

TOPIC = "shop-events"
NAMESPACE = "com.shopplatform.events"


@pytest.fixture
def registry() -> Iterator[SchemaRegistryClient]:
    client = registry_client(f"mock://{uuid.uuid4().hex}")
    yield client
    client.close()


def schema_text(name: str) -> str:
    return (SCHEMAS_DIR / f"{name}.avsc").read_text(encoding="utf-8")


def serializer(registry: SchemaRegistryClient, name: str, **conf: Any) -> AvroSerializer:
    """The platform's serializer: TopicNameStrategy subjects, schemas registered on first use."""
    return AvroSerializer(registry, schema_text(name), conf={"auto.register.schemas": True, **conf})


def serialize(
    registry: SchemaRegistryClient, name: str, field: str = MessageField.VALUE, **conf: Any
) -> tuple[bytes, list[tuple[str, bytes]]]:
    headers: list[tuple[str, bytes]] = []
    value = serializer(registry, name, **conf)(EVENTS[name], SerializationContext(TOPIC, field, headers))
    assert value is not None
    return value, headers


def guid_of(registry: SchemaRegistryClient, schema_id: int) -> uuid.UUID:
    subjects = registry.get_subjects()
    for subject in subjects:
        latest = registry.get_latest_version(subject)
        if latest.schema_id == schema_id:
            assert latest.guid is not None
            return uuid.UUID(latest.guid)
    raise AssertionError(f"no subject holds schema id {schema_id}")


# --- the schema's id: in the prefix or in a header ----------------------------------------------------------


@pytest.mark.parametrize("name", list(EVENTS))
def test_a_value_from_the_platforms_serializer_decodes(registry: SchemaRegistryClient, name: str) -> None:
    value, headers = serialize(registry, name)
    assert value[0] == 0
    assert not headers
    assert build_decoder("confluent-avro", registry=registry).decode(value, headers) == DomainEvent(
        name, EVENTS[name]
    )


def test_magic_byte_1_with_a_schema_guid_decodes(registry: SchemaRegistryClient) -> None:
    value, _ = serialize(registry, "OrderPlaced")
    guid = guid_of(registry, int.from_bytes(value[1:5], "big"))
    framed = b"\x01" + guid.bytes + value[5:]
    decoder = build_decoder("confluent-avro", registry=registry)
    assert decoder.decode(framed) == DomainEvent("OrderPlaced", EVENTS["OrderPlaced"])
    assert decoder.decode(framed) == decoder.decode(value)  # cached: the same plan, by GUID and by id


def test_a_guid_in_the_value_header_from_the_platforms_serializer_decodes(
    registry: SchemaRegistryClient,
) -> None:
    value, headers = serialize(
        registry, "ItemAddedToBasket", **{"schema.id.serializer": header_schema_id_serializer}
    )
    assert [key for key, _ in headers] == [VALUE_SCHEMA_ID_HEADER]
    assert headers[0][1][0] == 1  # 0x01 + GUID
    assert len(headers[0][1]) == 17
    event = build_decoder("confluent-avro", registry=registry).decode(value, headers)
    assert event == DomainEvent("ItemAddedToBasket", EVENTS["ItemAddedToBasket"])


def test_a_4_byte_id_in_the_value_header_decodes(registry: SchemaRegistryClient) -> None:
    value, _ = serialize(registry, "SearchPerformed")
    headers = [("traceparent", b"00-abc-01"), (VALUE_SCHEMA_ID_HEADER, value[:5])]
    event = build_decoder("confluent-avro", registry=registry).decode(value[5:], headers)
    assert event == DomainEvent("SearchPerformed", EVENTS["SearchPerformed"])


def test_the_value_header_wins_over_the_prefix_and_the_key_header_is_the_keys(
    registry: SchemaRegistryClient,
) -> None:
    """As in confluent-kafka's dual_schema_id_deserializer: the header first; the key's id is no value's."""
    category, _ = serialize(registry, "CategoryViewed")
    key_value, key_headers = serialize(
        registry, "ProductViewed", MessageField.KEY, **{"schema.id.serializer": header_schema_id_serializer}
    )
    assert [key for key, _ in key_headers] == [KEY_SCHEMA_ID_HEADER]
    decoder = build_decoder("confluent-avro", registry=registry)
    # The key's header alone: the value's id is in its prefix.
    assert decoder.decode(category, key_headers).type == "CategoryViewed"
    # Both headers: the value header names the value's schema, and the value is the bare body.
    both = [*key_headers, (VALUE_SCHEMA_ID_HEADER, category[:5])]
    assert decoder.decode(category[5:], both) == DomainEvent("CategoryViewed", EVENTS["CategoryViewed"])
    assert key_value  # the key decodes with its own schema; the relay reads values only


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"", r"0 bytes"),
        (b"\x00\x00\x01", r"3 bytes, first 0x00"),
        (b"\x01" + bytes(10), r"11 bytes, first 0x01"),
        (b"\x02" + bytes(4), r"5 bytes, first 0x02"),
        (None, r"0 bytes"),
    ],
    ids=["empty", "short-id", "short-guid", "magic-2", "null"],
)
def test_a_malformed_schema_id_header_is_a_permanent_decode_error(
    registry: SchemaRegistryClient, header: bytes | None, reason: str
) -> None:
    value, _ = serialize(registry, "ProductViewed")
    with pytest.raises(DecodeError, match=f"header __value_schema_id is not .*{reason}") as caught:
        build_decoder("confluent-avro", registry=registry).decode(
            value[5:], [(VALUE_SCHEMA_ID_HEADER, header)]
        )
    assert isinstance(caught.value, PermanentError)


def test_an_unknown_guid_is_schema_not_found(registry: SchemaRegistryClient) -> None:
    guid = uuid.uuid4()
    value = b"\x01" + guid.bytes + b"\x00"
    with pytest.raises(SchemaNotFound, match=f"schema GUID {guid} is not in the registry") as caught:
        build_decoder("confluent-avro", registry=registry).decode(value)
    assert caught.value.schema_id == str(guid)
    assert isinstance(caught.value, PermanentError)


def test_an_unknown_id_in_a_header_is_schema_not_found(registry: SchemaRegistryClient) -> None:
    headers = [(VALUE_SCHEMA_ID_HEADER, b"\x00" + (4242).to_bytes(4, "big"))]
    with pytest.raises(SchemaNotFound, match="schema id 4242 is not in the registry"):
        build_decoder("confluent-avro", registry=registry).decode(b"\x02\x00", headers)


# --- references ---------------------------------------------------------------------------------------------

MONEY = {
    "type": "record",
    "name": "Money",
    "namespace": "com.shopplatform.common",
    "fields": [
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}}
    ],
}


def register(registry: SchemaRegistryClient, subject: str, schema: Any, refs: list[SchemaReference]) -> int:
    return registry.register_schema(subject, Schema(json.dumps(schema), "AVRO", refs))


def order_with_references(registry: SchemaRegistryClient) -> tuple[int, dict[str, Any]]:
    """OrderPlaced written with its line type in a subject of its own, and the line's price a ``Money`` of a
    third subject (three levels). The writer has one more field of type ``Money`` than the reader, so the same
    named type is reached twice, along two paths."""
    register(registry, "com.shopplatform.common.Money", MONEY, [])
    order = json.loads(schema_text("OrderPlaced"))
    lines = next(f for f in order["fields"] if f["name"] == "lines")
    line = lines["type"]["items"] | {"namespace": NAMESPACE}
    # The reader's unitPrice is a decimal; the writer's Money wraps one: not the same, so resolution would
    # fail. Keep unitPrice and add Money as a new optional field of the line.
    line["fields"] = [
        *line["fields"],
        {"name": "listPrice", "type": ["null", "com.shopplatform.common.Money"], "default": None},
    ]
    money_ref = SchemaReference("com.shopplatform.common.Money", "com.shopplatform.common.Money", 1)
    register(registry, f"{NAMESPACE}.OrderLine", line, [money_ref])
    lines["type"]["items"] = f"{NAMESPACE}.OrderLine"
    order["fields"].append(
        {"name": "discount", "type": ["null", "com.shopplatform.common.Money"], "default": None}
    )
    refs = [SchemaReference(f"{NAMESPACE}.OrderLine", f"{NAMESPACE}.OrderLine", 1), money_ref]
    return register(registry, f"{TOPIC}-value", order, refs), order | {"__line": line}


def write(schema_id: int, schemas: list[Any], fields: dict[str, Any]) -> bytes:
    named: dict[str, Any] = {}
    parsed = None
    for schema in schemas:
        parsed = fastavro.parse_schema(schema, named_schemas=named)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, fields)
    return b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()


def test_a_writer_with_references_several_levels_deep_and_a_type_reached_twice_decodes(
    registry: SchemaRegistryClient,
) -> None:
    schema_id, order = order_with_references(registry)
    line = order.pop("__line")
    fields = {
        **EVENTS["OrderPlaced"],
        "lines": [
            item | {"listPrice": {"amount": item["unitPrice"]}} for item in EVENTS["OrderPlaced"]["lines"]
        ],
        "discount": {"amount": EVENTS["OrderPlaced"]["lines"][1]["unitPrice"]},
    }
    value = write(schema_id, [MONEY, line, order], fields)
    event = build_decoder("confluent-avro", registry=registry).decode(value)
    assert event == DomainEvent("OrderPlaced", EVENTS["OrderPlaced"])  # read in the reader's shape


def order_with_line_subject(
    registry: SchemaRegistryClient, edit_line: Callable[[dict[str, Any]], None] = lambda line: None
) -> tuple[int, list[Any]]:
    """OrderPlaced with its line type (``edit_line``'s edit of the reader's) in a subject of its own:
    the writer's schema id, and the schemas to write with."""
    order = json.loads(schema_text("OrderPlaced"))
    lines = next(f for f in order["fields"] if f["name"] == "lines")
    line = lines["type"]["items"] | {"namespace": NAMESPACE}
    edit_line(line)
    register(registry, "lines", line, [])
    lines["type"]["items"] = f"{NAMESPACE}.OrderLine"
    schema_id = register(
        registry, f"{TOPIC}-value", order, [SchemaReference(f"{NAMESPACE}.OrderLine", "lines", 1)]
    )
    return schema_id, [line, order]


def test_a_writer_whose_references_flatten_to_the_reader_decodes(registry: SchemaRegistryClient) -> None:
    """The common case: a shared type moved to its own subject, nothing else changed."""
    schema_id, schemas = order_with_line_subject(registry)
    value = write(schema_id, schemas, EVENTS["OrderPlaced"])
    assert build_decoder("confluent-avro", registry=registry).decode(value) == DomainEvent(
        "OrderPlaced", EVENTS["OrderPlaced"]
    )


def test_a_shared_type_that_renamed_a_field_keeping_the_old_name_as_an_alias_decodes_it_by_the_old_name(
    registry: SchemaRegistryClient,
) -> None:
    """The alias applies inside a referenced schema too: the line's ``quantity`` renamed ``count``."""

    def rename_quantity(line: dict[str, Any]) -> None:
        line["fields"] = [
            f | {"name": "count", "aliases": ["quantity"]} if f["name"] == "quantity" else f
            for f in line["fields"]
        ]

    schema_id, schemas = order_with_line_subject(registry, rename_quantity)
    written = EVENTS["OrderPlaced"] | {
        "lines": [
            {("count" if k == "quantity" else k): v for k, v in item.items()}
            for item in EVENTS["OrderPlaced"]["lines"]
        ]
    }
    value = write(schema_id, schemas, written)
    assert build_decoder("confluent-avro", registry=registry).decode(value) == DomainEvent(
        "OrderPlaced", EVENTS["OrderPlaced"]
    )


def test_a_reference_the_registry_does_not_know_is_a_permanent_decode_error(
    registry: SchemaRegistryClient,
) -> None:
    schema_id, schemas = order_with_line_subject(registry)
    value = write(schema_id, schemas, EVENTS["OrderPlaced"])
    registry.delete_subject("lines", permanent=True)
    with pytest.raises(
        DecodeError, match=r"reference lines version 1 of schema id \d+ is not in the registry"
    ) as caught:
        build_decoder("confluent-avro", registry=registry).decode(value)
    assert isinstance(caught.value, PermanentError)
    assert not isinstance(caught.value, SchemaNotFound)


# --- aliases: Avro resolves them on the reader's side only; the relay's reader is the older one -------------


def test_a_writer_that_renamed_a_field_keeping_the_old_name_as_an_alias_decodes_it_by_the_old_name(
    registry: SchemaRegistryClient,
) -> None:
    newer = json.loads(schema_text("ProductViewed"))
    stock = next(f for f in newer["fields"] if f["name"] == "stockId")
    stock.update(name="warehouseId", aliases=["stockId"])
    fields = {k: v for k, v in EVENTS["ProductViewed"].items() if k != "stockId"} | {"warehouseId": "Berlin"}
    value = write(register(registry, f"{TOPIC}-value", newer, []), [newer], fields)
    event = build_decoder("confluent-avro", registry=registry).decode(value)
    assert event == DomainEvent("ProductViewed", EVENTS["ProductViewed"] | {"stockId": "Berlin"})


def test_a_writer_that_renamed_its_record_keeping_the_old_name_as_an_alias_is_the_same_event(
    registry: SchemaRegistryClient,
) -> None:
    renamed = json.loads(schema_text("CategoryViewed")) | {
        "name": "CategoryOpened",
        "aliases": ["CategoryViewed"],
    }
    value = write(register(registry, f"{TOPIC}-value", renamed, []), [renamed], EVENTS["CategoryViewed"])
    event = build_decoder("confluent-avro", registry=registry).decode(value)
    assert event == DomainEvent("CategoryViewed", EVENTS["CategoryViewed"])


def test_an_alias_never_takes_a_name_the_writer_still_uses(registry: SchemaRegistryClient) -> None:
    """A writer with both ``stockId`` and a new field aliased to it keeps its own ``stockId``."""
    newer = json.loads(schema_text("ProductViewed"))
    newer["fields"].append(
        {"name": "depot", "type": ["null", "string"], "default": None, "aliases": ["stockId"]}
    )
    fields = EVENTS["ProductViewed"] | {"depot": "elsewhere"}
    value = write(register(registry, f"{TOPIC}-value", newer, []), [newer], fields)
    event = build_decoder("confluent-avro", registry=registry).decode(value)
    assert event == DomainEvent("ProductViewed", EVENTS["ProductViewed"])


def test_headers_given_as_a_mapping_are_read_too(registry: SchemaRegistryClient) -> None:
    """confluent-kafka gives a list of pairs; a mapping (as its serializers also accept) reads the same."""
    value, _ = serialize(registry, "CategoryViewed")
    headers = {VALUE_SCHEMA_ID_HEADER: value[:5], "traceparent": b"00-1-2-01"}
    event = build_decoder("confluent-avro", registry=registry).decode(value[5:], headers)
    assert event == DomainEvent("CategoryViewed", EVENTS["CategoryViewed"])


def test_a_record_with_other_headers_only_reads_its_id_from_the_value(registry: SchemaRegistryClient) -> None:
    value, _ = serialize(registry, "ProductViewed")
    decoder = build_decoder("confluent-avro", registry=registry)
    for _ in range(2):  # the second time from the cache
        event = decoder.decode(value, [("traceparent", b"00-1-2-01"), ("source", None)])
        assert event == DomainEvent("ProductViewed", EVENTS["ProductViewed"])
