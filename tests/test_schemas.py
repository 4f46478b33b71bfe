"""The Avro schemas (``consumer/schemas/``): one documented record per event, one namespace, common fields.

Schema evolution (a newer or older writer read with these schemas) is shown in ``test_decode.py``, where the
decoder that relies on it lives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest

from consumer import events
from consumer.decode import SCHEMAS_DIR, load_reader_schemas
from consumer.errors import ConfigError

pytestmark = pytest.mark.unit

SCHEMA_FILES = sorted(SCHEMAS_DIR.glob("*.avsc"))
COMMON_FIELDS = {
    "eventId": "string",
    "occurredAt": {"type": "long", "logicalType": "timestamp-millis"},
    "sessionId": "string",
    "shopId": "string",
    "stockId": ["null", "string"],
}


def raw(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / f"{name}.avsc").read_text(encoding="utf-8"))
    return schema


def records(schema: Any) -> Iterator[dict[str, Any]]:
    """Every record defined in a schema, nested ones included."""
    if isinstance(schema, list):
        for branch in schema:
            yield from records(branch)
    elif isinstance(schema, dict):
        if schema.get("type") == "record":
            yield schema
            for field in schema["fields"]:
                yield from records(field["type"])
        elif schema.get("type") == "array":
            yield from records(schema["items"])


def test_there_is_one_schema_file_per_event_named_after_its_record() -> None:
    assert sorted(path.stem for path in SCHEMA_FILES) == sorted(events.EVENT_TYPES)
    for path in SCHEMA_FILES:
        assert raw(path.stem)["name"] == path.stem


def test_every_record_is_in_the_shared_namespace() -> None:
    assert set(load_reader_schemas()) == {events.full_name(name) for name in events.EVENT_TYPES}
    for name in events.EVENT_TYPES:
        assert raw(name)["namespace"] == events.NAMESPACE


@pytest.mark.parametrize("name", events.EVENT_TYPES)
def test_every_record_and_field_has_a_doc(name: str) -> None:
    for record in records(raw(name)):
        assert record.get("doc", "").strip(), f"record {record['name']} has no doc"
        for field in record["fields"]:
            assert field.get("doc", "").strip(), f"field {record['name']}.{field['name']} has no doc"


@pytest.mark.parametrize("name", events.EVENT_TYPES)
def test_every_event_starts_with_the_common_fields(name: str) -> None:
    fields = raw(name)["fields"]
    assert {f["name"]: f["type"] for f in fields[: len(COMMON_FIELDS)]} == COMMON_FIELDS


@pytest.mark.parametrize("name", events.EVENT_TYPES)
def test_optional_fields_are_null_unions_defaulting_to_null(name: str) -> None:
    for record in records(raw(name)):
        for field in record["fields"]:
            if isinstance(field["type"], list):
                assert field["type"][0] == "null"
                assert "default" in field
                assert field["default"] is None


def test_event_specific_fields_are_what_a_platform_publishes() -> None:
    specific = {
        name: {f["name"]: f["type"] for f in raw(name)["fields"][len(COMMON_FIELDS) :]}
        for name in events.EVENT_TYPES
    }
    assert specific["ProductViewed"] == {"productId": "long", "groupId": ["null", "long"]}
    assert specific["CategoryViewed"] == {"categoryId": "long"}
    assert specific["SearchPerformed"] == {"phrase": "string"}
    assert specific["ItemAddedToBasket"] == {"productId": "long", "quantity": "int"}
    assert specific["OrderPlaced"]["orderId"] == "string"
    line = specific["OrderPlaced"]["lines"]
    assert line["type"] == "array"
    assert line["items"]["name"] == "OrderLine"
    assert {f["name"]: f["type"] for f in line["items"]["fields"]} == {
        "productId": "long",
        "quantity": "int",
        "unitPrice": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2},
    }


def test_every_schema_parses_and_has_a_distinct_canonical_form() -> None:
    parsed = [fastavro.parse_schema(raw(path.stem)) for path in SCHEMA_FILES]
    canonical = {fastavro.schema.to_parsing_canonical_form(schema) for schema in parsed}
    assert len(canonical) == len(SCHEMA_FILES)


def test_loading_a_folder_without_schemas_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \.avsc schema"):
        load_reader_schemas(tmp_path)


def test_loading_a_broken_schema_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "Broken.avsc").write_text('{"type": "record", "name": "Broken", "fields": [{"name": "a"}]}')
    with pytest.raises(ConfigError, match=r"Broken\.avsc"):
        load_reader_schemas(tmp_path)


def test_two_files_defining_one_record_is_a_config_error(tmp_path: Path) -> None:
    for stem in ("One", "Two"):
        (tmp_path / f"{stem}.avsc").write_text((SCHEMAS_DIR / "CategoryViewed.avsc").read_text())
    with pytest.raises(ConfigError, match="both define CategoryViewed"):
        load_reader_schemas(tmp_path)
