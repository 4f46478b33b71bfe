"""The traffic generator: seeded, shaped like Retail Rocket's public data set, always valid. The encoders."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import fastavro
import pytest
from pydantic import SecretStr

from consumer import events
from consumer.config import ShopConfig
from consumer.contract import MAX_STRING
from consumer.decode import DomainEvent, load_reader_schemas, registry_client
from consumer.errors import ConfigError
from consumer.translate import Translator
from consumer_dev.sample import Mix, TrafficGenerator, build_encoder

pytestmark = pytest.mark.unit

SHOPS = ("shop-eu", "shop-us", "shop-asia")
START_MS = 1_700_000_000_000
Event = tuple[str, dict[str, Any]]


def generate(n: int, seed: int = 7, **settings: Any) -> list[Event]:
    settings.setdefault("now_ms", START_MS)
    return list(TrafficGenerator(seed=seed, shops=SHOPS, **settings).events(n))


@pytest.fixture(scope="module")
def traffic() -> list[Event]:
    """50,000 events of the default shape, shared by the tests that only read them."""
    return generate(50_000)


def of_type(traffic: list[Event], type_name: str) -> list[dict[str, Any]]:
    return [fields for name, fields in traffic if name == type_name]


# --- reproducible -------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_events() -> None:
    assert generate(2_000) == generate(2_000)


def test_another_seed_gives_other_events() -> None:
    assert generate(200, seed=1) != generate(200, seed=2)


def test_events_continues_where_the_last_call_stopped() -> None:
    generator = TrafficGenerator(seed=7, shops=SHOPS, now_ms=START_MS)
    assert [*generator.events(700), *generator.events(300)] == generate(1_000)


# --- shaped like the data set -------------------------------------------------------------------------------


def test_the_mix_follows_the_data_set(traffic: list[Event]) -> None:
    shares = {name: count / len(traffic) for name, count in Counter(name for name, _ in traffic).items()}
    assert shares["ProductViewed"] == pytest.approx(0.937, abs=0.005)
    assert shares["ItemAddedToBasket"] == pytest.approx(0.025, abs=0.003)
    assert shares["OrderPlaced"] == pytest.approx(0.008, abs=0.002)
    assert shares["CategoryViewed"] == pytest.approx(0.020, abs=0.003)
    assert shares["SearchPerformed"] == pytest.approx(0.010, abs=0.002)


def test_some_product_views_are_group_views(traffic: list[Event]) -> None:
    views = of_type(traffic, "ProductViewed")
    grouped = [view for view in views if view["groupId"] is not None]
    assert len(grouped) / len(views) == pytest.approx(0.15, abs=0.01)


def test_most_visitors_have_one_or_two_events_and_a_few_have_very_many(traffic: list[Event]) -> None:
    per_visitor = Counter(fields["sessionId"] for _, fields in traffic)
    light = sum(1 for count in per_visitor.values() if count <= 2)
    assert light / len(per_visitor) > 0.7
    assert max(per_visitor.values()) > 100


def test_a_few_products_take_most_views(traffic: list[Event]) -> None:
    views = Counter(view["productId"] for view in of_type(traffic, "ProductViewed"))
    top = sorted(views.values(), reverse=True)
    assert sum(top[:500]) / sum(top) > 0.4  # the top 1 % of the 50,000 products


def prices_by_product(order: dict[str, Any]) -> dict[int, set[Decimal]]:
    prices: dict[int, set[Decimal]] = {}
    for line in order["lines"]:
        prices.setdefault(line["productId"], set()).add(line["unitPrice"])
    return prices


def test_some_orders_repeat_a_product_and_some_at_another_price(traffic: list[Event]) -> None:
    orders = of_type(traffic, "OrderPlaced")
    repeated = [o for o in orders if len(prices_by_product(o)) < len(o["lines"])]
    repriced = [o for o in orders if any(len(prices) > 1 for prices in prices_by_product(o).values())]
    assert 0.15 < len(repeated) / len(orders) < 0.35
    assert repriced


def test_a_visitor_keeps_one_shop_and_every_shop_has_visitors(traffic: list[Event]) -> None:
    shops_of: dict[str, set[str]] = {}
    for _, fields in traffic:
        shops_of.setdefault(fields["sessionId"], set()).add(fields["shopId"])
    assert all(len(shops) == 1 for shops in shops_of.values())
    assert set().union(*shops_of.values()) == set(SHOPS)


# --- valid, per schema and per contract ---------------------------------------------------------------------


def test_every_event_matches_its_avro_schema(traffic: list[Event]) -> None:
    schemas = {events.short_name(name): schema for name, schema in load_reader_schemas().items()}
    for name, fields in traffic[:5_000]:
        assert fastavro.validation.validate(fields, schemas[name], raise_errors=True)


def test_every_event_translates_into_calls_the_contract_accepts(traffic: list[Event]) -> None:
    translator = Translator({shop: ShopConfig(partner_id=shop, api_key=SecretStr("k")) for shop in SHOPS})
    calls = [call for name, fields in traffic for call in translator.translate(DomainEvent(name, fields))]
    assert len(calls) > len(traffic)  # orders fan out


def test_session_ids_are_letters_and_digits(traffic: list[Event]) -> None:
    for _, fields in traffic:
        assert fields["sessionId"].isalnum()
        assert fields["sessionId"].isascii()
        assert len(fields["sessionId"]) <= MAX_STRING


def test_event_ids_are_unique_uuids(traffic: list[Event]) -> None:
    ids = [fields["eventId"] for _, fields in traffic]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(event_id).version == 4 for event_id in ids[:100])


# --- time ---------------------------------------------------------------------------------------------------


def test_a_start_time_gives_times_that_advance_from_it(traffic: list[Event]) -> None:
    times = [fields["occurredAt"] for _, fields in traffic]
    assert times[0] >= START_MS
    assert times == sorted(times)
    assert times[-1] - START_MS > 10_000  # the clock moves


def test_a_clock_is_read_for_every_event() -> None:
    ticks = iter(range(START_MS, START_MS + 100))
    times = [fields["occurredAt"] for _, fields in generate(50, now_ms=lambda: next(ticks))]
    assert times == list(range(START_MS, START_MS + 50))


# --- settings -----------------------------------------------------------------------------------------------


def test_a_mix_that_does_not_sum_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        TrafficGenerator(seed=1, shops=SHOPS, now_ms=0, mix=Mix(product_viewed=0.5))


def test_no_shops_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one shop"):
        TrafficGenerator(seed=1, shops=[], now_ms=0)


def test_a_mix_of_only_orders_gives_only_orders() -> None:
    only_orders = Mix(
        product_viewed=0, category_viewed=0, search_performed=0, item_added_to_basket=0, order_placed=1
    )
    assert {name for name, _ in generate(100, mix=only_orders)} == {"OrderPlaced"}


# --- encoders -----------------------------------------------------------------------------------------------


@pytest.fixture
def registry() -> Iterator[Any]:
    client = registry_client(f"mock://{uuid.uuid4().hex}")
    yield client
    client.close()


def test_the_confluent_encoder_registers_each_record_under_its_full_name(registry: Any) -> None:
    encoder = build_encoder("confluent-avro", registry=registry)
    value = encoder.encode("SearchPerformed", generate(1, mix=Mix(0, 0, 1, 0, 0))[0][1])
    registered = registry.get_latest_version("com.shopplatform.events.SearchPerformed")
    assert value[:5] == b"\x00" + registered.schema_id.to_bytes(4, "big")
    assert json.loads(registered.schema.schema_str)["name"] == "SearchPerformed"


def test_the_json_encoder_names_the_type_and_keeps_prices_exact() -> None:
    name, fields = generate(1, mix=Mix(0, 0, 0, 0, 1))[0]
    obj = json.loads(build_encoder("json").encode(name, fields))
    assert obj["eventType"] == "OrderPlaced"
    assert [line["unitPrice"] for line in obj["lines"]] == [
        str(line["unitPrice"]) for line in fields["lines"]
    ]


@pytest.mark.parametrize("fmt", ["avro", "json"])
def test_encoding_an_unknown_type_is_refused(fmt: Any) -> None:
    with pytest.raises(ValueError, match="unknown record type 'WishlistUpdated'"):
        build_encoder(fmt).encode("WishlistUpdated", {})


def test_the_confluent_encoder_needs_a_registry() -> None:
    with pytest.raises(ConfigError) as caught:
        build_encoder("confluent-avro")
    assert caught.value.setting == "registry"
