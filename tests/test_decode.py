"""Decoding: every value format gives the same domain event; every bad value is a typed, permanent decode
error; a registry that cannot answer is a transient error.

Registries: the client's in-memory ``mock://`` registry for most tests, and ``tools.registry_double`` (the
registry's REST API over real HTTP) where the client's HTTP behaviour matters: 404, 5xx, timeouts, a closed
port.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import events
from consumer.decode import (
    SCHEMAS_DIR,
    VALUE_FORMATS,
    Decoder,
    DomainEvent,
    SchemaNotFound,
    UnknownEventType,
    ValueFormat,
    build_decoder,
    load_reader_schemas,
    registry_client,
)
from consumer.errors import ConfigError, DecodeError, PermanentError, RegistryUnavailable, TransientError
from consumer_dev.sample import ConfluentAvroEncoder, build_encoder
from tools.registry_double import RegistryDouble

pytestmark = pytest.mark.unit

AT_MS = 1_537_026_780_123  # 2018-09-15T15:53:00.123Z
COMMON = {
    "eventId": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "occurredAt": AT_MS,
    "sessionId": "60842392e4881c65e6c5e423",
    "shopId": "shop-eu",
    "stockId": "NewYork",
}
EVENTS: dict[str, dict[str, Any]] = {
    "ProductViewed": {**COMMON, "productId": 123456, "groupId": 654321},
    "CategoryViewed": {**COMMON, "categoryId": 42},
    "SearchPerformed": {**COMMON, "stockId": None, "phrase": "pampers"},
    "ItemAddedToBasket": {**COMMON, "productId": 123456, "quantity": 2},
    "OrderPlaced": {
        **COMMON,
        "orderId": "135243",
        "lines": [
            {"productId": 123456, "quantity": 2, "unitPrice": Decimal("234.00")},
            {"productId": 7, "quantity": 1, "unitPrice": Decimal("19.99")},
        ],
    },
}


# --- helpers ----------------------------------------------------------------------------------------------


@pytest.fixture
def registry() -> Iterator[SchemaRegistryClient]:
    client = registry_client(f"mock://{uuid.uuid4().hex}")
    yield client
    client.close()


@pytest.fixture
def double() -> Iterator[RegistryDouble]:
    with RegistryDouble() as running:
        yield running


@pytest.fixture
def http_registry(double: RegistryDouble) -> Iterator[SchemaRegistryClient]:
    """A client of the double, for writing: it caches what it registers, so decoders need another."""
    client = registry_client(double.url, timeout=0.5)
    yield client
    client.close()


ClientFactory = Callable[..., SchemaRegistryClient]


@pytest.fixture
def fresh_client(double: RegistryDouble) -> Iterator[ClientFactory]:
    """New clients of the double with an empty cache, so their decoders ask the registry."""
    made: list[SchemaRegistryClient] = []

    def make(**settings: Any) -> SchemaRegistryClient:
        made.append(registry_client(double.url, **settings))
        return made[-1]

    yield make
    for client in made:
        client.close()


def raw_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / f"{name}.avsc").read_text(encoding="utf-8"))
    return schema


def register(registry: SchemaRegistryClient, schema: dict[str, Any] | str, kind: str = "AVRO") -> int:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return registry.register_schema(f"subject-{uuid.uuid4().hex}", Schema(text, kind))


def confluent_value(schema_id: int, schema: dict[str, Any] | str, fields: Any) -> bytes:
    """A Confluent wire-format value written with any writer schema (as another producer would)."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), fields)
    return b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()


def avro_decoder(type_name: str) -> Decoder:
    return build_decoder("avro", record_name=type_name)


def decoder_for(fmt: ValueFormat, type_name: str, registry: SchemaRegistryClient) -> Decoder:
    if fmt == "avro":
        return avro_decoder(type_name)
    return build_decoder(fmt, registry=registry if fmt == "confluent-avro" else None)


def json_value(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- the three formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", VALUE_FORMATS)
@pytest.mark.parametrize("type_name", events.EVENT_TYPES)
def test_every_format_decodes_every_event_to_the_same_domain_event(
    registry: SchemaRegistryClient, fmt: ValueFormat, type_name: str
) -> None:
    value = build_encoder(fmt, registry=registry).encode(type_name, EVENTS[type_name])
    assert decoder_for(fmt, type_name, registry).decode(value) == DomainEvent(type_name, EVENTS[type_name])


def test_timestamps_decode_as_epoch_milliseconds_and_decimals_as_decimals(
    registry: SchemaRegistryClient,
) -> None:
    value = build_encoder("confluent-avro", registry=registry).encode("OrderPlaced", EVENTS["OrderPlaced"])
    fields = build_decoder("confluent-avro", registry=registry).decode(value).fields
    assert type(fields["occurredAt"]) is int
    assert fields["occurredAt"] == AT_MS
    assert [line["unitPrice"] for line in fields["lines"]] == [Decimal("234.00"), Decimal("19.99")]


def test_one_confluent_topic_carries_every_event_type(registry: SchemaRegistryClient) -> None:
    encoder = build_encoder("confluent-avro", registry=registry)
    decoder = build_decoder("confluent-avro", registry=registry)
    values = [encoder.encode(name, fields) for name, fields in EVENTS.items()]
    assert [decoder.decode(value).type for value in values] == list(EVENTS)


def test_the_avro_format_accepts_short_and_full_record_names() -> None:
    value = build_encoder("avro").encode("CategoryViewed", EVENTS["CategoryViewed"])
    for name in ("CategoryViewed", "com.shopplatform.events.CategoryViewed"):
        assert build_decoder("avro", record_name=name).decode(value).type == "CategoryViewed"


# --- schema evolution (confluent-avro: the writer schema comes with the record) -----------------------------


def test_a_newer_writer_with_an_added_optional_field_still_decodes(registry: SchemaRegistryClient) -> None:
    newer = raw_schema("ProductViewed")
    newer["fields"].append(
        {
            "name": "referrer",
            "type": ["null", "string"],
            "default": None,
            "doc": "Where the visitor came from.",
        }
    )
    value = confluent_value(
        register(registry, newer), newer, {**EVENTS["ProductViewed"], "referrer": "search"}
    )
    event = build_decoder("confluent-avro", registry=registry).decode(value)
    assert event == DomainEvent("ProductViewed", EVENTS["ProductViewed"])  # read in the reader's shape


def test_a_newer_writer_with_a_field_added_in_the_middle_still_decodes(
    registry: SchemaRegistryClient,
) -> None:
    newer = raw_schema("OrderPlaced")
    newer["fields"].insert(
        5, {"name": "currency", "type": "string", "default": "EUR", "doc": "ISO 4217 code."}
    )
    fields = {**EVENTS["OrderPlaced"], "currency": "USD"}
    value = confluent_value(register(registry, newer), newer, fields)
    assert build_decoder("confluent-avro", registry=registry).decode(value).fields == EVENTS["OrderPlaced"]


def test_an_older_writer_without_an_optional_field_decodes_with_its_default(
    registry: SchemaRegistryClient,
) -> None:
    older = raw_schema("ProductViewed")
    older["fields"] = [f for f in older["fields"] if f["name"] != "groupId"]
    fields = {k: v for k, v in EVENTS["ProductViewed"].items() if k != "groupId"}
    value = confluent_value(register(registry, older), older, fields)
    event = build_decoder("confluent-avro", registry=registry).decode(value)
    assert event.fields == {**fields, "groupId": None}


def test_a_writer_with_a_promotable_type_decodes(registry: SchemaRegistryClient) -> None:
    narrower = raw_schema("CategoryViewed")
    narrower["fields"][-1]["type"] = "int"  # categoryId int → long
    value = confluent_value(register(registry, narrower), narrower, EVENTS["CategoryViewed"])
    assert build_decoder("confluent-avro", registry=registry).decode(value).fields == EVENTS["CategoryViewed"]


def test_an_incompatible_writer_is_a_decode_error(registry: SchemaRegistryClient) -> None:
    incompatible = raw_schema("CategoryViewed")
    incompatible["fields"][-1]["type"] = "string"
    value = confluent_value(register(registry, incompatible), incompatible, {**COMMON, "categoryId": "shoes"})
    with pytest.raises(DecodeError, match="does not fit the reader schema"):
        build_decoder("confluent-avro", registry=registry).decode(value)


# --- record types this service does not know ----------------------------------------------------------------


def test_an_unknown_record_type_is_an_unknown_event_type_error(registry: SchemaRegistryClient) -> None:
    other = raw_schema("CategoryViewed") | {"name": "WishlistUpdated"}
    value = confluent_value(register(registry, other), other, EVENTS["CategoryViewed"])
    with pytest.raises(UnknownEventType, match="is not an event this service knows") as caught:
        build_decoder("confluent-avro", registry=registry).decode(value)
    assert caught.value.type_name == "com.shopplatform.events.WishlistUpdated"
    assert isinstance(caught.value, DecodeError)  # dead-lettered unless the engine is told to skip


def test_a_known_short_name_in_another_namespace_is_unknown(registry: SchemaRegistryClient) -> None:
    foreign = raw_schema("CategoryViewed") | {"namespace": "com.othershop.events"}
    value = confluent_value(register(registry, foreign), foreign, EVENTS["CategoryViewed"])
    with pytest.raises(UnknownEventType) as caught:
        build_decoder("confluent-avro", registry=registry).decode(value)
    assert caught.value.type_name == "com.othershop.events.CategoryViewed"


def test_a_writer_schema_that_is_not_a_record_is_an_unknown_event_type(
    registry: SchemaRegistryClient,
) -> None:
    value = confluent_value(register(registry, '"string"'), "string", "hello")
    with pytest.raises(UnknownEventType, match="is an Avro string, not an event record") as caught:
        build_decoder("confluent-avro", registry=registry).decode(value)
    assert caught.value.type_name == "string"


def test_a_schema_that_is_not_avro_is_a_decode_error(registry: SchemaRegistryClient) -> None:
    schema_id = register(registry, '{"type": "object"}', kind="JSON")
    value = b"\x00" + schema_id.to_bytes(4, "big") + b"{}"
    with pytest.raises(DecodeError, match="is a JSON schema, not Avro"):
        build_decoder("confluent-avro", registry=registry).decode(value)


def test_an_unknown_json_event_type_is_an_unknown_event_type_error() -> None:
    with pytest.raises(UnknownEventType) as caught:
        build_decoder("json").decode(json_value({"eventType": "WishlistUpdated", **COMMON}))
    assert caught.value.type_name == "WishlistUpdated"


# --- bad values: each a permanent decode error with a precise reason ----------------------------------------


@pytest.mark.parametrize("fmt", VALUE_FORMATS)
@pytest.mark.parametrize(("value", "reason"), [(None, "null"), (b"", "empty")])
def test_null_and_empty_values_are_decode_errors(
    registry: SchemaRegistryClient, fmt: ValueFormat, value: bytes | None, reason: str
) -> None:
    with pytest.raises(DecodeError, match=reason):
        decoder_for(fmt, "ProductViewed", registry).decode(value)


def valid_confluent(registry: SchemaRegistryClient, type_name: str = "ProductViewed") -> bytes:
    return build_encoder("confluent-avro", registry=registry).encode(type_name, EVENTS[type_name])


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda v: b'{"productId": 1}', r"wrong magic byte 0x7b"),
        (lambda v: b"\x02" + v[1:], r"wrong magic byte 0x02"),
        (lambda v: v[:3], r"3 bytes ends inside the 5-byte Confluent header"),
        (lambda v: b"\x01" + v[1:9], r"9 bytes ends inside the 17-byte Confluent header"),
        (lambda v: v[:5], r"is truncated"),
        (lambda v: v[:-1], r"it ends inside a number"),  # inside the last varint
        (lambda v: v[:-4], r"is truncated"),  # inside a string
        (lambda v: v + b"\x00", r"1 bytes left after a complete record"),
    ],
    ids=[
        "json-bytes",
        "magic-2",
        "short-header",
        "short-guid-header",
        "header-only",
        "truncated-varint",
        "truncated-string",
        "trailing",
    ],
)
def test_malformed_confluent_values_are_decode_errors(
    registry: SchemaRegistryClient, mangle: Callable[[bytes], bytes], reason: str
) -> None:
    decoder = build_decoder("confluent-avro", registry=registry)
    with pytest.raises(DecodeError, match=reason):
        decoder.decode(mangle(valid_confluent(registry)))


def test_a_string_that_is_not_utf8_is_a_decode_error(registry: SchemaRegistryClient) -> None:
    value = bytearray(valid_confluent(registry, "SearchPerformed"))
    value[-3:] = b"\xff\xfe\xfd"  # inside the phrase "pampers"
    with pytest.raises(DecodeError, match="not UTF-8"):
        build_decoder("confluent-avro", registry=registry).decode(bytes(value))


def test_a_union_index_out_of_range_is_a_decode_error() -> None:
    value = bytearray(
        build_encoder("avro").encode("CategoryViewed", {**EVENTS["CategoryViewed"], "stockId": None})
    )
    value[value.index(b"\x0eshop-eu") + 8] = 0x0A  # the stockId branch index, after the shop: 5 of 2
    with pytest.raises(DecodeError, match="out-of-range union index"):
        avro_decoder("CategoryViewed").decode(bytes(value))


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda v: v[:-2], "is truncated"),
        (lambda v: v + b"\x02", "1 bytes left"),
        (lambda v: b"\xff" * 12, "ends inside a number"),
    ],
    ids=["truncated", "trailing", "garbage"],
)
def test_malformed_avro_bodies_are_decode_errors(mangle: Callable[[bytes], bytes], reason: str) -> None:
    value = build_encoder("avro").encode("OrderPlaced", EVENTS["OrderPlaced"])
    with pytest.raises(DecodeError, match=reason):
        avro_decoder("OrderPlaced").decode(mangle(value))


# --- JSON: shape and coercion -------------------------------------------------------------------------------


def json_event(type_name: str = "OrderPlaced", **changes: Any) -> dict[str, Any]:
    obj = json.loads(build_encoder("json").encode(type_name, EVENTS[type_name]))
    assert isinstance(obj, dict)
    obj.update(changes)
    return obj


def test_json_names_its_type_with_event_type_short_or_full() -> None:
    decoder = build_decoder("json")
    for name in ("CategoryViewed", "com.shopplatform.events.CategoryViewed"):
        event = decoder.decode(json_value(json_event("CategoryViewed", eventType=name)))
        assert event == DomainEvent("CategoryViewed", EVENTS["CategoryViewed"])


def test_json_with_a_configured_record_needs_no_event_type() -> None:
    obj = json_event("CategoryViewed")
    del obj["eventType"]
    event = build_decoder("json", record_name="CategoryViewed").decode(json_value(obj))
    assert event == DomainEvent("CategoryViewed", EVENTS["CategoryViewed"])


def test_json_event_type_contradicting_the_configured_record_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="contradicts the topic's record CategoryViewed"):
        build_decoder("json", record_name="CategoryViewed").decode(json_value(json_event("SearchPerformed")))


@pytest.mark.parametrize(
    ("occurred_at", "millis"),
    [
        (AT_MS, AT_MS),
        ("2018-09-15T15:53:00.123Z", AT_MS),
        ("2018-09-15T15:53:00.123+00:00", AT_MS),
        ("2018-09-15T18:53:00.123+03:00", AT_MS),
        ("2018-09-15T15:53:00.123999Z", AT_MS),  # below a millisecond is dropped, as Avro cannot carry it
    ],
)
def test_json_times_are_epoch_millis_or_iso_8601_with_an_offset(occurred_at: Any, millis: int) -> None:
    event = build_decoder("json").decode(json_value(json_event(occurredAt=occurred_at)))
    assert event.fields["occurredAt"] == millis


@pytest.mark.parametrize(
    ("price", "decimal"), [("19.99", "19.99"), (19.99, "19.99"), (20, "20.00"), ("1e2", "100.00")]
)
def test_json_prices_are_strings_or_numbers_and_become_decimals_of_the_schema_scale(
    price: Any, decimal: str
) -> None:
    obj = json_event(lines=[{"productId": 1, "quantity": 1, "unitPrice": price}])
    (line,) = build_decoder("json").decode(json_value(obj)).fields["lines"]
    assert line["unitPrice"] == Decimal(decimal)
    assert str(line["unitPrice"]) == decimal


def test_json_optional_fields_may_be_left_out_and_unknown_keys_are_ignored() -> None:
    obj = json_event("ProductViewed", referrer="search")
    del obj["groupId"], obj["stockId"]
    fields = build_decoder("json").decode(json_value(obj)).fields
    assert fields == {**EVENTS["ProductViewed"], "groupId": None, "stockId": None}


def test_json_fields_with_a_default_take_it_when_missing() -> None:
    obj = json_event("ItemAddedToBasket")
    del obj["quantity"]
    assert build_decoder("json").decode(json_value(obj)).fields["quantity"] == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "value is not JSON"),
        (b"[1, 2]", "must be an object, got an array"),
        (b'"ProductViewed"', "must be an object, got a string"),
        (json_value({**COMMON, "productId": 1}), "lacks the 'eventType' key"),
        (json_value({"eventType": 7}), "eventType must be a string, got an integer"),
    ],
)
def test_json_that_is_not_an_event_object_is_a_decode_error(value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        build_decoder("json").decode(value)


def without(obj: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != key}


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (without(json_event(), "orderId"), "field OrderPlaced.orderId is missing"),
        (
            json_event(lines=[{"productId": 1, "quantity": 1}]),
            r"field OrderPlaced.lines\[\].unitPrice is missing",
        ),
        (json_event(orderId=135243), "field OrderPlaced.orderId must be a string, got an integer"),
        (json_event(sessionId=None), "field OrderPlaced.sessionId must be a string, got null"),
        (json_event(lines={}), "field OrderPlaced.lines must be an array, got an object"),
        (json_event(lines=[7]), r"field OrderPlaced.lines\[\] must be an object, got an integer"),
        (json_event(lines=[{"productId": True, "quantity": 1, "unitPrice": "1"}]), "must be an Avro long"),
        (json_event(lines=[{"productId": 2**63, "quantity": 1, "unitPrice": "1"}]), "must be an Avro long"),
        (json_event(lines=[{"productId": 1, "quantity": 2**31, "unitPrice": "1"}]), "must be an Avro int"),
        (json_event(lines=[{"productId": 1, "quantity": 1.5, "unitPrice": "1"}]), "must be an Avro int"),
        (
            json_event(lines=[{"productId": 1, "quantity": 1, "unitPrice": "1.005"}]),
            "more than 2 decimal places",
        ),
        (json_event(lines=[{"productId": 1, "quantity": 1, "unitPrice": "NaN"}]), "must be a finite number"),
        (
            json_event(lines=[{"productId": 1, "quantity": 1, "unitPrice": "cheap"}]),
            "is not a decimal number",
        ),
        (json_event(lines=[{"productId": 1, "quantity": 1, "unitPrice": "1e12"}]), "more than 12 digits"),
        (json_event(lines=[{"productId": 1, "quantity": 1, "unitPrice": None}]), "must be a decimal string"),
        (json_event(stockId=5), "field OrderPlaced.stockId matches no type of its union"),
        (json_event(occurredAt="2018-09-15T15:53:00"), "must carry a UTC offset or Z"),
        (json_event(occurredAt="yesterday"), "is not an ISO 8601 time"),
        (json_event(occurredAt=1.5e12), "must be epoch milliseconds or an ISO 8601 string"),
    ],
)
def test_json_fields_of_the_wrong_shape_are_decode_errors_naming_the_field(
    obj: dict[str, Any], reason: str
) -> None:
    with pytest.raises(DecodeError, match=reason) as caught:
        build_decoder("json").decode(json_value(obj))
    assert caught.value.reason.startswith("JSON OrderPlaced: ")


# --- the schema registry ------------------------------------------------------------------------------------


def test_an_unknown_schema_id_is_schema_not_found(registry: SchemaRegistryClient) -> None:
    with pytest.raises(SchemaNotFound, match="schema id 4242 is not in the registry") as caught:
        build_decoder("confluent-avro", registry=registry).decode(b"\x00\x00\x00\x10\x92\x00")
    assert caught.value.schema_id == 4242
    assert isinstance(caught.value, PermanentError)


def test_the_http_registry_answers_what_the_client_asks(
    http_registry: SchemaRegistryClient, fresh_client: ClientFactory
) -> None:
    encoder = build_encoder("confluent-avro", registry=http_registry)
    values = [encoder.encode(name, fields) for name, fields in EVENTS.items()]
    reader = fresh_client()
    decoder = build_decoder("confluent-avro", registry=reader)
    assert [decoder.decode(v) for v in values] == [DomainEvent(n, f) for n, f in EVENTS.items()]
    latest = reader.get_latest_version("com.shopplatform.events.OrderPlaced")
    assert isinstance(encoder, ConfluentAvroEncoder)
    assert (latest.version, latest.schema_id) == (1, encoder.schema_id("OrderPlaced"))
    found = reader.lookup_schema("com.shopplatform.events.OrderPlaced", latest.schema)
    assert found.schema_id == latest.schema_id


def test_an_unknown_schema_id_over_http_is_schema_not_found(
    double: RegistryDouble, fresh_client: ClientFactory
) -> None:
    with pytest.raises(SchemaNotFound, match="schema id 9 is not in the registry"):
        build_decoder("confluent-avro", registry=fresh_client()).decode(b"\x00\x00\x00\x00\x09\x00")
    assert double.requests == [("GET", "/schemas/ids/9")]


def test_schema_not_found_is_not_cached(double: RegistryDouble, fresh_client: ClientFactory) -> None:
    decoder = build_decoder("confluent-avro", registry=fresh_client())
    for _ in range(2):
        with pytest.raises(SchemaNotFound):
            decoder.decode(b"\x00\x00\x00\x00\x09\x00")
    assert len(double.requests) == 2


def test_a_bare_404_from_a_url_that_is_no_registry_is_transient_never_schema_not_found(
    double: RegistryDouble, http_registry: SchemaRegistryClient
) -> None:
    """A wrong path in schema_registry.url answers 404 to every id: dead-lettering would drain the topic."""
    value = valid_confluent(http_registry)
    wrong_path = registry_client(double.url + "/not-the-registry", timeout=0.5)
    try:
        with pytest.raises(RegistryUnavailable, match="does not point at a Schema Registry API") as caught:
            build_decoder("confluent-avro", registry=wrong_path).decode(value)
    finally:
        wrong_path.close()
    assert not isinstance(caught.value, PermanentError)
    assert double.requests[-1][1].startswith("/not-the-registry/schemas/ids/")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 401])
def test_a_registry_answering_an_error_other_than_404_is_transient_and_retried_later(
    double: RegistryDouble, http_registry: SchemaRegistryClient, fresh_client: ClientFactory, status: int
) -> None:
    value = valid_confluent(http_registry)
    decoder = build_decoder("confluent-avro", registry=fresh_client())
    double.fail_with(status)
    with pytest.raises(RegistryUnavailable, match=f"HTTP {status}") as caught:
        decoder.decode(value)
    assert isinstance(caught.value, TransientError)
    assert not isinstance(caught.value, PermanentError)
    double.fail_with(None)
    assert decoder.decode(value) == DomainEvent("ProductViewed", EVENTS["ProductViewed"])


def test_the_registry_client_does_not_retry_on_its_own(
    double: RegistryDouble, http_registry: SchemaRegistryClient, fresh_client: ClientFactory
) -> None:
    value = valid_confluent(http_registry)
    decoder = build_decoder("confluent-avro", registry=fresh_client())
    double.fail_with(503)
    before = len(double.requests)
    with pytest.raises(RegistryUnavailable):
        decoder.decode(value)
    assert len(double.requests) == before + 1  # the relay's own backoff decides when to ask again


def test_a_stopped_registry_is_transient(
    double: RegistryDouble, http_registry: SchemaRegistryClient, fresh_client: ClientFactory
) -> None:
    value = valid_confluent(http_registry)
    decoder = build_decoder("confluent-avro", registry=fresh_client())
    double.stop()
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        decoder.decode(value)


def test_a_registry_on_a_closed_port_is_transient_and_fails_fast(registry: SchemaRegistryClient) -> None:
    value = valid_confluent(registry)  # schema id 1
    client = registry_client(f"http://127.0.0.1:{closed_port()}")
    try:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="ConnectError"):
            build_decoder("confluent-avro", registry=client).decode(value)
        assert time.monotonic() - started < 2.0  # no client-side retries with backoff
    finally:
        client.close()


def test_a_registry_that_does_not_answer_times_out_as_transient(
    double: RegistryDouble, http_registry: SchemaRegistryClient, fresh_client: ClientFactory
) -> None:
    value = valid_confluent(http_registry)
    decoder = build_decoder("confluent-avro", registry=fresh_client(timeout=0.2))
    double.stall()
    try:
        with pytest.raises(RegistryUnavailable, match="Timeout"):
            decoder.decode(value)
    finally:
        double.unstall()


def test_writer_schemas_are_fetched_once_per_id(
    double: RegistryDouble, http_registry: SchemaRegistryClient, fresh_client: ClientFactory
) -> None:
    values = [valid_confluent(http_registry, name) for name in EVENTS] * 20
    decoder = build_decoder("confluent-avro", registry=fresh_client())
    before = len(double.requests)
    for value in values:
        decoder.decode(value)
    assert sorted(double.requests[before:]) == [("GET", f"/schemas/ids/{i}") for i in range(1, 6)]


def test_refused_schemas_are_cached_too(
    double: RegistryDouble, http_registry: SchemaRegistryClient, fresh_client: ClientFactory
) -> None:
    other = raw_schema("CategoryViewed") | {"name": "WishlistUpdated"}
    value = confluent_value(register(http_registry, other), other, EVENTS["CategoryViewed"])
    decoder = build_decoder("confluent-avro", registry=fresh_client())
    before = len(double.requests)
    for _ in range(3):
        with pytest.raises(UnknownEventType):
            decoder.decode(value)
    assert len(double.requests) == before + 1


def test_the_registry_double_runs_as_a_script_and_stops_on_sigterm() -> None:
    root = str(Path(__file__).resolve().parents[1])  # the checkout, where tools/ is
    command = [sys.executable, "-m", "tools.registry_double", "--port", "0"]
    env = {**os.environ, "PYTHONPATH": root}
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        url = process.stdout.readline().rsplit(" ", 1)[-1].strip()
        with urllib.request.urlopen(f"{url}/schemas/types", timeout=5) as answer:
            assert json.loads(answer.read()) == ["AVRO", "JSON", "PROTOBUF"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


# --- building decoders --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs", "setting"),
    [
        ("confluent-avro", {}, "registry"),
        (
            "confluent-avro",
            {"registry": registry_client("mock://config"), "record_name": "ProductViewed"},
            "record_name",
        ),
        ("avro", {}, "record_name"),
        ("avro", {"record_name": "WishlistUpdated"}, "record_name"),
        ("json", {"record_name": "com.othershop.events.ProductViewed"}, "record_name"),
        ("protobuf", {}, "format"),
    ],
)
def test_impossible_decoder_settings_are_config_errors(
    fmt: Any, kwargs: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_decoder(fmt, **kwargs)
    assert caught.value.setting == setting


def test_decoders_can_read_schemas_from_another_folder(tmp_path: Any) -> None:
    schema = raw_schema("SearchPerformed") | {"name": "SiteSearch"}
    (tmp_path / "SiteSearch.avsc").write_text(json.dumps(schema))
    value = io.BytesIO()
    fastavro.schemaless_writer(value, fastavro.parse_schema(schema), EVENTS["SearchPerformed"])
    decoder = build_decoder("avro", record_name="SiteSearch", schemas_dir=tmp_path)
    assert decoder.decode(value.getvalue()) == DomainEvent("SiteSearch", EVENTS["SearchPerformed"])


# --- property: any bytes end as an event or a decode error --------------------------------------------------


class Decoders:
    """Every decoder, and a valid value for each, built once for the property tests."""

    def __init__(self) -> None:
        self.registry = registry_client(f"mock://{uuid.uuid4().hex}")
        encoders = {fmt: build_encoder(fmt, registry=self.registry) for fmt in VALUE_FORMATS}
        newer = copy.deepcopy(raw_schema("OrderPlaced"))
        newer["fields"].append({"name": "note", "type": ["null", "string"], "default": None, "doc": "Note."})
        self.confluent = build_decoder("confluent-avro", registry=self.registry)
        self.json = build_decoder("json")
        self.avro = {name: avro_decoder(name) for name in events.EVENT_TYPES}
        self.valid: list[tuple[Decoder, bytes]] = []
        for name, fields in EVENTS.items():
            self.valid.append((self.confluent, encoders["confluent-avro"].encode(name, fields)))
            self.valid.append((self.avro[name], encoders["avro"].encode(name, fields)))
            self.valid.append((self.json, encoders["json"].encode(name, fields)))
        evolved = confluent_value(
            register(self.registry, newer), newer, {**EVENTS["OrderPlaced"], "note": "gift"}
        )
        self.valid.append((self.confluent, evolved))
        self.all = [self.confluent, self.json, *self.avro.values()]


@pytest.fixture(scope="module")
def decoders() -> Iterator[Decoders]:
    built = Decoders()
    yield built
    built.registry.close()


READER_FIELDS = {
    events.short_name(name): [f["name"] for f in schema["fields"]]
    for name, schema in load_reader_schemas().items()
}


def decodes_or_fails_cleanly(decoder: Decoder, value: bytes) -> None:
    try:
        event = decoder.decode(value)
    except DecodeError as error:
        reason = error.reason
    else:
        assert list(event.fields) == READER_FIELDS[event.type]
        return
    assert reason  # a decode error always says why


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.binary(max_size=200), pick=st.integers(min_value=0))
def test_random_bytes_end_as_an_event_or_a_decode_error(decoders: Decoders, value: bytes, pick: int) -> None:
    decodes_or_fails_cleanly(decoders.all[pick % len(decoders.all)], value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_confluent_framed_random_bodies_end_as_an_event_or_a_decode_error(
    decoders: Decoders, data: st.DataObject
) -> None:
    schema_id = data.draw(st.integers(min_value=1, max_value=7))  # mostly ids the registry knows
    body = data.draw(st.binary(max_size=120))
    decodes_or_fails_cleanly(decoders.confluent, b"\x00" + schema_id.to_bytes(4, "big") + body)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=0, max_value=7)),
    st.tuples(st.just("set"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    st.tuples(st.just("cut"), st.integers(min_value=0), st.just(0)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.just(0)),
)


def mutate(value: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(value)
    for kind, where, what in mutations:
        at = where % (len(data) + 1)
        if kind == "insert":
            data.insert(at, what)
        elif kind == "cut":
            del data[at:]
        elif data and at < len(data):
            if kind == "flip":
                data[at] ^= 1 << what
            elif kind == "set":
                data[at] = what
            else:
                del data[at]
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pick=st.integers(min_value=0), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_valid_values_end_as_an_event_or_a_decode_error(
    decoders: Decoders, pick: int, mutations: list[tuple[str, int, int]]
) -> None:
    decoder, value = decoders.valid[pick % len(decoders.valid)]
    decodes_or_fails_cleanly(decoder, mutate(value, mutations))
