"""Translation: each domain event becomes exactly the tracking calls the contract defines, or a named failure.

Golden tests use the contract page's own example values (session 60842392e4881c65e6c5e423, product 123456,
stock NewYork, 2018-09-15T15:53:00+00:00).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from consumer.config import ShopConfig
from consumer.contract import MAX_ID, TrackingCall, validate_call
from consumer.decode import DomainEvent
from consumer.errors import ConfigError, TranslateError
from consumer.translate import Translator

pytestmark = pytest.mark.unit

SESSION = "60842392e4881c65e6c5e423"
AT_MS = 1_537_026_780_000  # 2018-09-15T15:53:00Z
AT = "2018-09-15T15:53:00.000+00:00"
SECRET = "s3cr3t-api-key"
SHOPS = {
    "shop-eu": ShopConfig(partner_id="5ba0f6e797a5281f2c6d9a4e", api_key=SecretStr(SECRET)),
    "shop-us": ShopConfig(partner_id="5ba0f6e797a5281f2c6d9a4f", api_key=SecretStr(SECRET)),
}


@pytest.fixture
def translator() -> Translator:
    return Translator(SHOPS)


def event(type_name: str, **fields: Any) -> DomainEvent:
    common = {
        "eventId": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "occurredAt": AT_MS,
        "sessionId": SESSION,
        "shopId": "shop-eu",
        "stockId": "NewYork",
    }
    return DomainEvent(type_name, {**common, **fields})


def line(product: int, quantity: int, price: str) -> dict[str, Any]:
    return {"productId": product, "quantity": quantity, "unitPrice": Decimal(price)}


# --- golden: one event in, exact calls out ------------------------------------------------------------------


def test_product_viewed_becomes_view(translator: Translator) -> None:
    calls = translator.translate(event("ProductViewed", productId=123456, groupId=None))
    assert calls == [
        TrackingCall(
            "shop-eu",
            "view",
            {"sessionExternalId": SESSION, "productId": 123456, "stockId": "NewYork", "timestamp": AT},
        )
    ]


def test_product_viewed_in_a_group_becomes_group_view(translator: Translator) -> None:
    calls = translator.translate(event("ProductViewed", productId=123456, groupId=654321))
    assert calls == [
        TrackingCall(
            "shop-eu",
            "groupView",
            {
                "sessionExternalId": SESSION,
                "groupId": 654321,
                "productId": 123456,
                "stockId": "NewYork",
                "timestamp": AT,
            },
        )
    ]


def test_category_viewed_becomes_category_view_without_stock(translator: Translator) -> None:
    calls = translator.translate(event("CategoryViewed", categoryId=123456))
    assert calls == [
        TrackingCall(
            "shop-eu", "categoryView", {"sessionExternalId": SESSION, "categoryId": 123456, "timestamp": AT}
        )
    ]


def test_search_performed_becomes_search_without_stock(translator: Translator) -> None:
    calls = translator.translate(event("SearchPerformed", phrase="pampers"))
    assert calls == [
        TrackingCall(
            "shop-eu", "search", {"sessionExternalId": SESSION, "searchPhrase": "pampers", "timestamp": AT}
        )
    ]


def test_item_added_becomes_add_to_basket_without_quantity(translator: Translator) -> None:
    calls = translator.translate(event("ItemAddedToBasket", productId=123456, quantity=3))
    assert calls == [
        TrackingCall(
            "shop-eu",
            "addToBasket",
            {"sessionExternalId": SESSION, "productId": 123456, "stockId": "NewYork", "timestamp": AT},
        )
    ]


def test_order_with_one_line_becomes_one_order_call(translator: Translator) -> None:
    calls = translator.translate(event("OrderPlaced", orderId="135243", lines=[line(123456, 2, "234.00")]))
    assert calls == [
        TrackingCall(
            "shop-eu",
            "order",
            {
                "sessionExternalId": SESSION,
                "productId": 123456,
                "quantity": 2,
                "price": 234.0,
                "transaction": "135243",
                "stockId": "NewYork",
                "timestamp": AT,
            },
        )
    ]


def test_a_missing_stock_is_left_out_of_the_body(translator: Translator) -> None:
    (call,) = translator.translate(event("ProductViewed", productId=1, groupId=None, stockId=None))
    assert call.body == {"sessionExternalId": SESSION, "productId": 1, "timestamp": AT}


def test_the_golden_calls_pass_the_contract(translator: Translator) -> None:
    samples = [
        event("ProductViewed", productId=1, groupId=None),
        event("ProductViewed", productId=1, groupId=2),
        event("CategoryViewed", categoryId=3),
        event("SearchPerformed", phrase="x"),
        event("ItemAddedToBasket", productId=4, quantity=1),
        event("OrderPlaced", orderId="o", lines=[line(5, 1, "0.00")]),
    ]
    for sample in samples:
        assert all(validate_call(call) is None for call in translator.translate(sample))


# --- orders: fan-out and merge ------------------------------------------------------------------------------


def test_an_order_becomes_one_call_per_distinct_product_in_first_seen_order(translator: Translator) -> None:
    lines = [line(30, 1, "9.99"), line(10, 2, "5.00"), line(30, 2, "9.99"), line(20, 1, "19.50")]
    calls = translator.translate(event("OrderPlaced", orderId="A-17", lines=lines))
    assert [(c.body["productId"], c.body["quantity"], c.body["price"]) for c in calls] == [
        (30, 3, 9.99),
        (10, 2, 5.0),
        (20, 1, 19.5),
    ]
    assert {c.method for c in calls} == {"order"}
    assert {c.body["transaction"] for c in calls} == {"A-17"}
    assert {c.body["stockId"] for c in calls} == {"NewYork"}  # the order's stock applies to every item
    assert {c.body["timestamp"] for c in calls} == {AT}


def test_merged_lines_at_different_prices_keep_the_amount_paid(translator: Translator) -> None:
    lines = [line(7, 2, "10.00"), line(7, 1, "7.00")]  # two at full price, one discounted
    (call,) = translator.translate(event("OrderPlaced", orderId="A-18", lines=lines))
    assert call.body["quantity"] == 3
    assert call.body["price"] == 9.0  # (2 * 10.00 + 7.00) / 3
    assert type(call.body["price"]) is float


def test_prices_are_json_numbers_with_the_cents_intact(translator: Translator) -> None:
    (call,) = translator.translate(event("OrderPlaced", orderId="o", lines=[line(1, 1, "19.99")]))
    assert call.body["price"] == 19.99


def test_an_order_without_lines_is_a_translation_failure(translator: Translator) -> None:
    with pytest.raises(TranslateError, match="has no line items") as caught:
        translator.translate(event("OrderPlaced", orderId="empty", lines=[]))
    assert caught.value.field == "lines"


# --- timestamps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("millis", "text"),
    [
        (AT_MS + 7, "2018-09-15T15:53:00.007+00:00"),
        (AT_MS + 999, "2018-09-15T15:53:00.999+00:00"),
        (0, "1970-01-01T00:00:00.000+00:00"),
        (-1, "1969-12-31T23:59:59.999+00:00"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999+00:00"),
    ],
)
def test_the_timestamp_is_the_event_time_in_utc_with_milliseconds(
    translator: Translator, millis: int, text: str
) -> None:
    (call,) = translator.translate(event("CategoryViewed", categoryId=1, occurredAt=millis))
    assert call.body["timestamp"] == text


def test_an_aware_datetime_event_time_is_accepted_and_keeps_its_offset(translator: Translator) -> None:
    moment = datetime(2018, 9, 15, 18, 53, 0, 250_000, tzinfo=timezone(timedelta(hours=3)))
    (call,) = translator.translate(event("CategoryViewed", categoryId=1, occurredAt=moment))
    assert call.body["timestamp"] == "2018-09-15T18:53:00.250+03:00"


def test_a_replayed_event_keeps_its_original_time(translator: Translator) -> None:
    first = translator.translate(event("ProductViewed", productId=1, groupId=None))
    again = translator.translate(event("ProductViewed", productId=1, groupId=None))
    assert first == again
    assert first[0].body["timestamp"] == AT


@pytest.mark.parametrize("millis", [253_402_300_800_000, -62_135_596_800_001, 2**63 - 1])
def test_an_event_time_beyond_year_9999_or_before_year_1_fails_naming_timestamp(
    translator: Translator, millis: int
) -> None:
    with pytest.raises(TranslateError, match="outside years 1 to 9999") as caught:
        translator.translate(event("CategoryViewed", categoryId=1, occurredAt=millis))
    assert caught.value.field == "timestamp"


def test_a_naive_datetime_event_time_breaks_the_contract(translator: Translator) -> None:
    with pytest.raises(TranslateError, match="timestamp") as caught:
        translator.translate(event("CategoryViewed", categoryId=1, occurredAt=datetime(2018, 9, 15)))
    assert caught.value.field == "timestamp"


# --- every validation rule: a named, permanent failure, and no call -----------------------------------------


@pytest.mark.parametrize(
    ("type_name", "fields", "field", "reason"),
    [
        ("CategoryViewed", {"categoryId": 1, "sessionId": ""}, "sessionExternalId", "letters"),
        ("CategoryViewed", {"categoryId": 1, "sessionId": "a-b"}, "sessionExternalId", "letters"),
        ("CategoryViewed", {"categoryId": 1, "sessionId": "a" * 51}, "sessionExternalId", "51"),
        ("CategoryViewed", {"categoryId": 1, "sessionId": "ü"}, "sessionExternalId", "letters"),
        ("ProductViewed", {"productId": MAX_ID + 1, "groupId": None}, "productId", "between 0 and"),
        ("ProductViewed", {"productId": -1, "groupId": None}, "productId", "between 0 and"),
        ("ProductViewed", {"productId": 1, "groupId": MAX_ID + 1}, "groupId", "between 0 and"),
        ("ProductViewed", {"productId": 1, "groupId": None, "stockId": "s" * 51}, "stockId", "at most 50"),
        ("CategoryViewed", {"categoryId": -5}, "categoryId", "between 0 and"),
        ("SearchPerformed", {"phrase": ""}, "searchPhrase", "more than whitespace"),
        ("SearchPerformed", {"phrase": " \t\n"}, "searchPhrase", "more than whitespace"),
        ("ItemAddedToBasket", {"productId": MAX_ID + 1, "quantity": 1}, "productId", "between 0 and"),
        ("OrderPlaced", {"orderId": "o", "lines": [line(1, 0, "1.00")]}, "quantity", "greater than 0"),
        ("OrderPlaced", {"orderId": "o", "lines": [line(1, -2, "1.00")]}, "quantity", "greater than 0"),
        ("OrderPlaced", {"orderId": "o", "lines": [line(1, 1, "-0.01")]}, "price", "at least 0"),
        ("OrderPlaced", {"orderId": "o" * 51, "lines": [line(1, 1, "1.00")]}, "transaction", "at most 50"),
        ("OrderPlaced", {"orderId": "o", "lines": [line(MAX_ID + 1, 1, "1.00")]}, "productId", "between"),
    ],
)
def test_a_call_that_breaks_the_contract_fails_the_record_naming_the_field(
    translator: Translator, type_name: str, fields: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(TranslateError) as caught:
        translator.translate(event(type_name, **fields))
    assert caught.value.field == field
    assert field in caught.value.reason
    assert reason in caught.value.reason
    assert caught.value.stage == "translate"


def test_the_failure_reason_points_at_the_event_field_and_the_product(translator: Translator) -> None:
    lines = [line(1, 1, "1.00"), line(2, 0, "1.00")]
    with pytest.raises(TranslateError) as caught:
        translator.translate(event("OrderPlaced", orderId="o", lines=lines))
    assert caught.value.reason.startswith("order call for product 2 breaks the contract: quantity")
    assert "lines[].quantity" in caught.value.reason


def test_an_event_lacking_a_field_fails_naming_it(translator: Translator) -> None:
    broken = event("ProductViewed", groupId=None)  # no productId
    with pytest.raises(TranslateError, match="lacks the field 'productId'") as caught:
        translator.translate(broken)
    assert caught.value.field == "productId"


def test_an_event_type_without_a_translation_fails(translator: Translator) -> None:
    with pytest.raises(TranslateError, match="no translation for event type 'WishlistUpdated'"):
        translator.translate(event("WishlistUpdated"))


# --- shops --------------------------------------------------------------------------------------------------


def test_the_call_carries_the_events_shop(translator: Translator) -> None:
    (call,) = translator.translate(event("CategoryViewed", categoryId=1, shopId="shop-us"))
    assert call.shop == "shop-us"


def test_an_event_of_an_unconfigured_shop_fails_naming_the_shop(translator: Translator) -> None:
    with pytest.raises(TranslateError, match="shop 'shop-mars' is not configured") as caught:
        translator.translate(event("CategoryViewed", categoryId=1, shopId="shop-mars"))
    assert caught.value.field == "shopId"


def test_an_event_of_an_unconfigured_shop_goes_to_the_default_shop() -> None:
    translator = Translator(SHOPS, default_shop="shop-us")
    (call,) = translator.translate(event("CategoryViewed", categoryId=1, shopId="shop-mars"))
    assert call.shop == "shop-us"
    (call,) = translator.translate(event("CategoryViewed", categoryId=1, shopId="shop-eu"))
    assert call.shop == "shop-eu"


def test_a_default_shop_that_is_not_configured_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Translator(SHOPS, default_shop="shop-mars")
    assert caught.value.setting == "default_shop"


def test_no_failure_reason_or_call_carries_the_api_key(translator: Translator) -> None:
    failures = [
        event("CategoryViewed", categoryId=1, shopId="shop-mars"),
        event("ProductViewed", productId=-1, groupId=None),
        event("OrderPlaced", orderId="o", lines=[]),
    ]
    for failing in failures:
        with pytest.raises(TranslateError) as caught:
            translator.translate(failing)
        assert SECRET not in str(caught.value)
    (call,) = translator.translate(event("CategoryViewed", categoryId=1))
    assert SECRET not in repr(call)


def test_translation_does_not_change_the_event(translator: Translator) -> None:
    lines = [line(1, 1, "1.00"), line(1, 1, "1.00")]
    original = event("OrderPlaced", orderId="o", lines=lines, occurredAt=datetime(2020, 1, 1, tzinfo=UTC))
    snapshot = repr(original)
    translator.translate(original)
    assert repr(original) == snapshot


# --- the inline checks agree with the contract ----------------------------------------------------------


def _half_good(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    """A field's value: good half the time, else one of the values at or past the contract's edges."""
    return st.booleans().flatmap(lambda ok: st.sampled_from(good if ok else bad))


_BAD_ID = [-1, MAX_ID + 1, 2**63 - 1, True, 1.0, "1", None]
_BAD_TEXT = [None, 5, 1.5, b"bytes"]


@settings(max_examples=1000, deadline=None)
@given(
    type_name=st.sampled_from(["ProductViewed", "CategoryViewed", "SearchPerformed", "ItemAddedToBasket"]),
    values=st.fixed_dictionaries(
        {
            "sessionId": _half_good([SESSION, "a" * 50, "Z9"], ["", "a" * 51, "ü", "abc-1", *_BAD_TEXT]),
            "occurredAt": _half_good(
                [AT_MS, 0, -1, 253_402_300_799_999],
                [253_402_300_800_000, datetime(2018, 9, 15), datetime(2018, 9, 15, tzinfo=UTC), "now", None],
            ),
            "stockId": _half_good([None, "", "NewYork", "s" * 50], ["s" * 51, *_BAD_TEXT]),
            "productId": _half_good([0, 7, MAX_ID], _BAD_ID),
            "groupId": _half_good([None, 0, MAX_ID], _BAD_ID),
            "categoryId": _half_good([0, 3, MAX_ID], _BAD_ID),
            "phrase": _half_good(
                ["red shoes", " pampers ", "x", "\u00a0x"], ["", " ", "\t\n", "\u3000", "\u00a0", *_BAD_TEXT]
            ),
        }
    ),
)
def test_the_fast_checks_pass_exactly_what_the_contract_passes(
    type_name: str, values: dict[str, Any]
) -> None:
    """The common types skip ``validate_call`` when their inline checks pass: those checks must never let
    through a call the contract refuses, and the verdict must be the one full validation gives."""
    translator = Translator(SHOPS)
    ev = event(type_name, **values)
    try:
        calls = translator.translate(ev)
    except TranslateError as error:
        fast_verdict: str | None = error.field
    else:
        fast_verdict = None
        assert all(validate_call(call) is None for call in calls)
    try:
        built, _ = translator._build(ev)
    except TranslateError as error:
        full_verdict: str | None = error.field  # refused while building (e.g. a time out of range)
    else:
        violations = [v for v in (validate_call(call) for call in built) if v is not None]
        full_verdict = violations[0].field if violations else None
    assert fast_verdict == full_verdict
